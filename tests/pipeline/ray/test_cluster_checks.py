"""Checks made before a study or search trains on a cluster of several nodes: the workers' placement against
each node's resources, and the shared-storage probe (its node-side reading, its one-line refusal, which
clusters need it and which folders it covers), and Ray's worker-start warning hidden while the study's
own trials explain it. The whole check on real raylets is in test_multinode.py."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.ray.cluster import RAY_TRAIN_HELPERS, QuietRayStdout, expected_processes
from pipeline.ray.storage import look, needs_check, refusal
from pipeline.runs.outputs import output_folders
from pipeline.runs.resources import PLACEMENTS, Resources, check_placement

NODE = {"CPU": 1.0}


def test_placement_is_one_of_rays_strategies():
    assert PLACEMENTS == ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    assert Resources().placement == "PACK"
    with pytest.raises(ValueError, match=r"resources.placement: unknown placement strategy 'spread'; choose from "
                                         r"PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"):
        Resources(placement="spread")


def test_a_worker_needs_its_cpus_and_gpus_on_one_node_whatever_the_cluster_total():
    check_placement(Resources(cpus_per_worker=0.99), [{"CPU": 0.0}, NODE, NODE])
    # 2 CPUs in all, but no node holds a 1.5-CPU worker: Ray would wait for ever
    with pytest.raises(ValueError, match=r"one worker asks resources.cpus_per_worker=1.5 CPU on one node but no node "
                                         r"of the Ray cluster has that \(nodes: 0 CPU, 1 CPU, 1 CPU\)"):
        check_placement(Resources(cpus_per_worker=1.5), [{"CPU": 0.0}, NODE, NODE])
    with pytest.raises(ValueError, match=r"and resources.gpus_per_worker=1 GPU on one node"):
        check_placement(Resources(gpus_per_worker=1), [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 0.5}])
    check_placement(Resources(gpus_per_worker=1), [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}])


@pytest.mark.parametrize("placement, nodes, words", [
    ("STRICT_SPREAD", [NODE], "STRICT_SPREAD puts each of resources.workers=2 workers on its own node, but only 1 "
                              "node(s) fit"),
    ("STRICT_PACK", [NODE, NODE], "STRICT_PACK puts all resources.workers=2 workers on one node, but a node fits "
                                  "at most 1"),
    ("PACK", [NODE], "resources.workers=2 workers of resources.cpus_per_worker=0.6 CPU each do not fit"),
])
def test_a_placement_the_nodes_cannot_give_is_refused(placement, nodes, words):
    with pytest.raises(ValueError) as info:
        check_placement(Resources(workers=2, cpus_per_worker=0.6, placement=placement), nodes)
    assert words in str(info.value)


def test_placements_the_nodes_can_give_pass():
    two = [{"CPU": 0.0}, NODE, NODE]
    for placement in PLACEMENTS:
        check_placement(Resources(workers=2, cpus_per_worker=0.49, placement=placement), two)
    check_placement(Resources(workers=2, cpus_per_worker=0.6, placement="STRICT_SPREAD"), two)
    check_placement(Resources(workers=2, cpus_per_worker=0.6, placement="SPREAD"), two)


def test_a_node_reads_the_probes_it_shares_and_names_the_others(tmp_path):
    shared, other = tmp_path / "shared", tmp_path / "other"
    shared.write_text("token-a")
    other.write_text("not the driver's token")
    seen = look({str(shared): "token-a", str(other): "token-b", str(tmp_path / "gone"): "token-c"})
    assert seen["host"] and seen["missing"] == [
        (str(other), "another file of that name (a different disk mounted at the same path)"),
        (str(tmp_path / "gone"), "no such file")]
    assert look({str(shared): "token-a"})["missing"] == []


def test_only_a_cluster_that_is_the_drivers_one_node_skips_the_check():
    head, worker = {"NodeID": "a" * 56}, {"NodeID": "b" * 56}
    assert not needs_check([head], head["NodeID"], None)
    assert not needs_check([head], head["NodeID"], "127.0.0.1:6379")
    assert needs_check([head, worker], head["NodeID"], None)
    assert needs_check([worker], head["NodeID"], None)         # the driver is not on the only node
    assert needs_check([head], head["NodeID"], "ray://head:10001")   # Ray Client: the driver runs elsewhere


def test_the_refusal_is_one_line_naming_the_folder_attamba_home_the_node_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTAMBA_HOME", str(tmp_path))
    node = {"NodeID": "c" * 56, "NodeManagerAddress": "10.0.0.7"}
    line = refusal("the run folder", tmp_path / "studies" / "smoke", node, "gpu-worker-1", "no such file")
    assert "\n" not in line
    assert line == (f"the run folder '{tmp_path / 'studies' / 'smoke'}' (under ATTAMBA_HOME={tmp_path}) is not on "
                    f"storage every Ray node shares: node 10.0.0.7 (gpu-worker-1, node id {'c' * 12}) does not see "
                    f"the probe file the driver wrote there (no such file); mount one shared folder (NFS, EFS, "
                    f"Filestore, a ReadWriteMany volume) at the same path on every node and set ATTAMBA_HOME to it "
                    f"(docs/cluster.md)")
    monkeypatch.delenv("ATTAMBA_HOME")
    line = refusal("the token cache (data.cache_dir / ATTAMBA_CACHE)", Path("/c"), node, "h", "no such file")
    assert "(under ATTAMBA_HOME" not in line and "set ATTAMBA_HOME and ATTAMBA_CACHE to it" in line


def test_the_probed_folders_are_what_trials_write_or_read(tmp_path):
    folders = output_folders(tmp_path / "studies" / "s", tmp_path / "cache", f"sqlite:///{tmp_path}/db/mlflow.db")
    assert list(folders.values()) == [tmp_path / "studies" / "s", tmp_path / "cache", tmp_path / "db"]
    # a tracking server is reached over the network, not through a folder
    assert len(output_folders(tmp_path / "s", tmp_path / "c", "http://mlflow:5000")) == 2
    assert len(output_folders(tmp_path / "s", tmp_path / "c", None)) == 2


def test_a_local_study_whose_placement_needs_more_nodes_fails_before_anything_is_written(tmp_path, monkeypatch):
    """A local Ray is one node: two workers each on its own node cannot be placed, and the study says so in its
    pre-flight, before a folder, a store or a Ray exists."""
    import ray

    from pipeline.study.driver import run_study
    from tests.pipeline.study.test_study import _study_file

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)
    path = _study_file(tmp_path, resources={"workers": 2, "cpus_per_worker": 0.4, "max_concurrent": 1,
                                            "placement": "STRICT_SPREAD"})
    with pytest.raises(ValueError, match=r"resources.placement=STRICT_SPREAD puts each of resources.workers=2 "
                                         r"workers on its own node, but only 1 node\(s\) fit"):
        run_study(path)
    assert not ray.is_initialized()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]


RAYLET_WARNING = ("\x1b[33m(raylet)\x1b[0m WARNING: {n} PYTHON worker processes have been started on node: abc with "
                  "address: 127.0.0.1, which is 4x the maximum expected startup concurrency (2). This could be ...")



def test_ray_worker_start_warning_is_hidden_while_the_trials_explain_it():
    expected = expected_processes(Resources(workers=1), slots=2)   # two trial processes
    assert expected == 2 and expected_processes(Resources(workers=2), slots=1) == 1 + 2 + RAY_TRAIN_HELPERS
    out = io.StringIO()
    quiet = QuietRayStdout(out, expected)
    quiet.write("before\n")
    print(RAYLET_WARNING.format(n=4), file=quiet)          # 4 <= 2 x 2: what two trials explain
    quiet.write("part of a line ")
    quiet.write("and its end\n")
    assert out.getvalue() == "before\npart of a line and its end\n"
    print(RAYLET_WARNING.format(n=8), file=quiet, flush=True)  # twice more than the trials need: shown
    assert out.getvalue().endswith(RAYLET_WARNING.format(n=8) + "\n")
    quiet.write("no newline yet")
    quiet.flush()
    assert out.getvalue().endswith("no newline yet")
