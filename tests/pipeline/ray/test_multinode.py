"""Studies on a Ray cluster of several nodes: trials spread over nodes, a two-worker run across two nodes,
a node lost mid-trial, a driver lost mid-study, and a node that does not share ATTAMBA_HOME.

The nodes are real raylets on this host (`ray.cluster_utils.Cluster`): a head with no CPU, where the
driver connects (as on a cluster whose head trains nothing), and two worker nodes of one CPU each, so two
one-worker trials of 0.99 CPU can only run on different nodes. Each study runs as `attamba study --address`
in its own process; the runs are real micro models on DeepSpeed (gloo) tracked in SQLite MLflow. They all
share one disk, as nodes share an NFS folder; the last test gives one node another view of a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline import schema
from pipeline.ray.storage import PROBE_PREFIX
from pipeline.runs.markers import DONE_FILE, read_attempts
from pipeline.report.cluster import TITLE as CLUSTER_VIEW
from pipeline.study.spec import expand, load_study
from pipeline.train.loop import METRICS_FILE
from tests.helpers import REPO_ROOT as REPO
from tests.helpers import processes_under, stop_processes
from tests.pipeline.study.test_study import SMOKE, _wait_for

pytestmark = pytest.mark.slow

WORKER_NODES = 2
LONG = "tokens.tokens=102400"   # 400 steps, a checkpoint every 10: long enough to act mid-run


@pytest.fixture(scope="module")
def cluster():
    """A head (0 CPU) and WORKER_NODES nodes of 1 CPU, in a private temp dir; every process stopped at the end."""
    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    (Path(tmp) / "ray").mkdir()
    saved = {name: os.environ.get(name) for name in ("RAY_TMPDIR", "PYTHONPATH")}
    # Raylets (and the workers they start) take this process's environment: the package, and a temp dir of
    # our own (Ray writes the "current cluster" file there, not in the machine's shared /tmp/ray).
    os.environ["RAY_TMPDIR"] = tmp
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), saved["PYTHONPATH"]) if p)
    from ray.cluster_utils import Cluster

    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                          "temp_dir": tmp, "object_store_memory": 80 * 2**20})
    try:
        for _ in range(WORKER_NODES):
            nodes.add_node(num_cpus=1, object_store_memory=80 * 2**20)
        nodes.wait_for_nodes()
        nodes.tmp = tmp
        yield nodes
    finally:
        try:
            nodes.shutdown()
        finally:
            stop_processes(tmp)
            shutil.rmtree(tmp, ignore_errors=True)
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _restore_workers(cluster) -> None:
    """Back to WORKER_NODES worker nodes after a test removed one (a replacement node joins)."""
    while len(cluster.worker_nodes) < WORKER_NODES:
        cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    cluster.wait_for_nodes()


def _env(cluster, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "ATTAMBA_HOME", "MLFLOW_TRACKING_URI")}
    return env | {"RAY_TMPDIR": cluster.tmp} | extra


def _attamba() -> list[str]:
    attamba = shutil.which("attamba")
    return [attamba] if attamba else [sys.executable, "-m", "pipeline.cli"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(cluster, tmp_path: Path, *overrides: str) -> list[str]:
    return [*_attamba(), "study", str(SMOKE), f"out_dir={tmp_path / 'studies'}", f"run.data.cache_dir={tmp_path / 'cache'}",
            f"run.tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides, "--address", cluster.address]


def _driver(cluster, tmp_path: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(_command(cluster, tmp_path, *overrides), cwd=tmp_path, env=_env(cluster),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _result(out: str) -> dict:
    """The study's JSON from the driver's output (Ray may log a line after it)."""
    return json.JSONDecoder().raw_decode(out[out.index("{\n"):])[0]


def _trains(out_dir: Path) -> list[dict]:
    return [r for r in read_attempts(out_dir) if r["event"] == "train"]


def _rows(out_dir: Path) -> list[dict]:
    path = out_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _sealed(out_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.removeprefix("step_")) for p in out_dir.glob("checkpoints/step_*/manifest.json"))


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, grew = {pid}, True
    while grew:
        children = {p for p, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def _lose_node(cluster, node) -> None:
    """The node goes as a preempted machine does: its raylet and every process it started (the trial's
    workers) killed at once, then the cluster's bookkeeping of the node removed."""
    from ray._private import ray_constants

    raylet = node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    for pid in _descendants(raylet):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    cluster.remove_node(node, allow_graceful=False)


def _alive(pid: int) -> bool:
    """The process runs (a zombie, killed but not yet reaped, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _assert_once_in_mlflow_and_nothing_running(tmp_path: Path, names: list[str]) -> None:
    """Exactly one MLflow run per run folder, FINISHED, under the study's one parent; no run of the
    experiment (parent, children, any attempt's run) left RUNNING."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == "parent"]
    assert len(parents) == 1
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags.get(schema.TAG_TRIAL) for r in children) == sorted(names), \
        "one MLflow run per run folder"
    assert {r.info.run_id for r in runs} == {parents[0].info.run_id, *(r.info.run_id for r in children)}, \
        "no other run in the experiment (one per attempt would be)"
    assert [(r.data.tags.get(schema.TAG_TRIAL), r.info.status) for r in runs if r.info.status != "FINISHED"] == []
    assert all(schema.M_VAL_LOSS in r.data.metrics for r in children)


def test_trials_spread_over_nodes_and_a_lost_node_costs_only_the_steps_since_its_checkpoint(cluster, tmp_path):
    """Two trials start on the two worker nodes. The node of the longer one is removed mid-run (its raylet and
    every process on it killed, as a preempted spot instance): the trial is retried on the surviving node,
    resumes from its last checkpoint and replays the steps after it with the same losses; the study
    completes, each run once in MLflow, nothing RUNNING, and the report's cluster view shows the move."""
    specs = expand(load_study(SMOKE, [LONG]))
    names = [s.name for s in specs]
    victim = next(s for s in specs if s.config.model.attention == "attamba")   # the slower of the two
    folder = tmp_path / "studies" / "smoke"
    victim_dir, steps = folder / victim.name, victim.config.train.steps
    workers = {node.node_id: node for node in cluster.worker_nodes}
    proc = _driver(cluster, tmp_path, LONG, "report=true")
    try:
        first = _wait_for(lambda: len(t := [r for n in names for r in _trains(folder / n)]) == 2 and t,
                          proc, 300, "both runs training")
        assert len({t["node_id"] for t in first}) == 2 and {t["node_id"] for t in first} <= set(workers), \
            "the two trials run on the two worker nodes"

        def mid_run():
            rows, sealed = _rows(victim_dir), _sealed(victim_dir)
            return sealed and rows and sealed[-1] + 3 <= rows[-1]["step"] < steps - 50

        _wait_for(mid_run, proc, 300, "the victim mid-run, a few steps past a checkpoint")
        lost = _trains(victim_dir)[-1]
        _lose_node(cluster, workers[lost["node_id"]])
        removed_at = time.time()
        while _alive(lost["pid"]) and time.time() < removed_at + 10:   # a SIGKILL waits out a disk write (D)
            time.sleep(0.05)
        assert not _alive(lost["pid"]), "the trial process went with its node"
        before = _rows(victim_dir)                # the lost attempt's steps, before the retry trims them
        checkpoint = _sealed(victim_dir)[-1]
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        _restore_workers(cluster)
    assert proc.returncode == 0, out[-3000:]
    result = _result(out)
    assert result["trained"] == 2 and result["failed"] == []

    # Resumed on the surviving node from the checkpoint it had, each replayed step's loss the same.
    survivor = next(n for n in workers if n != lost["node_id"])
    tries = result["timing"]["per_run"][victim.name]["placements"]
    assert [(p["node_id"], p["status"], p["died"]) for p in tries] == [(lost["node_id"], "failed", True),
                                                                        (survivor, "finished", False)]
    reached = before[-1]["step"]
    assert tries[0]["last_step"] == reached and tries[1]["resume_step"] == checkpoint < reached
    done = json.loads((victim_dir / DONE_FILE).read_text())
    assert done["result"]["start_step"] == checkpoint
    after = _rows(victim_dir)
    assert [r["step"] for r in after] == list(range(1, steps + 1)), "every step once in the end"
    replayed = range(checkpoint + 1, reached + 1)
    assert [after[s - 1][schema.M_LOSS] for s in replayed] == [before[s - 1][schema.M_LOSS] for s in replayed]
    other = result["timing"]["per_run"][next(n for n in names if n != victim.name)]["placements"]
    assert len(other) == 1 and other[0]["status"] == "finished"

    _assert_once_in_mlflow_and_nothing_running(tmp_path, names)
    report = (tmp_path / "reports" / "smoke" / "report.html").read_text()
    view = report.split(CLUSTER_VIEW, 1)[1]
    assert lost["node_id"][:12] in view and survivor[:12] in view
    assert f"resumed from the checkpoint at step {checkpoint}; steps {checkpoint + 1}-{reached} replayed" in view
    print(f"\nnode-loss timeline: node {lost['node_id'][:12]} removed at step {reached} "
          f"({removed_at - tries[0]['start']:.1f} s into attempt 1); attempt 2 on node {survivor[:12]} started "
          f"{tries[1]['start'] - removed_at:.1f} s after the removal, resumed from the checkpoint at step "
          f"{checkpoint}, replayed {reached - checkpoint} steps; study wall {result['timing']['wall_s']:.1f} s")


def test_a_two_worker_run_spread_over_two_nodes_trains_as_it_does_on_one(cluster, tmp_path):
    """resources.placement=STRICT_SPREAD puts the two DeepSpeed workers of a run on the two worker nodes (gloo
    between them); the same run on one machine without Ray (two processes of a plain launcher: RANK,
    WORLD_SIZE) gives the same loss at every step."""
    overrides = ["baselines=[]", "resources.workers=2", "resources.cpus_per_worker=0.49",
                 "resources.max_concurrent=1", "resources.placement=STRICT_SPREAD"]
    (name,) = [s.name for s in expand(load_study(SMOKE, overrides))]
    done = subprocess.run(_command(cluster, tmp_path, *overrides), cwd=tmp_path, env=_env(cluster),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out_dir = tmp_path / "studies" / "smoke" / name
    (train,) = _trains(out_dir)
    assert len(train["nodes"]) == 2 and set(train["nodes"]) == {n.node_id for n in cluster.worker_nodes}, \
        "one worker per node"

    port, one_machine = _free_port(), tmp_path / "one_machine"
    # Ray gives a worker of 0.49 CPU one thread; so do these (a thread count can change a float reduction)
    env = {k: v for k, v in _env(cluster).items() if not k.startswith("RAY_")} | {
        "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([*_attamba(), "train", str(out_dir / "config.yaml"), f"train.out_dir={one_machine}",
                               "tracking.enabled=false"], env=env | {"RANK": str(rank), "LOCAL_RANK": str(rank)},
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    for proc in ranks:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
    spread, reference = ([(r["step"], r[schema.M_LOSS]) for r in _rows(d)] for d in (out_dir, one_machine))
    assert len(reference) == load_study(SMOKE, overrides).tokens.tokens // (2 * 4 * 64) and spread == reference


def test_a_killed_driver_run_again_resumes_without_retraining_finished_runs(cluster, tmp_path):
    """The driver (the head's job) is killed with SIGKILL after one run finished and while the other trains on
    a worker node; Ray ends the lost driver's trials, and the same command run again skips the finished run
    and resumes the other from its checkpoint."""
    specs = expand(load_study(SMOKE, [LONG]))
    names = [s.name for s in specs]
    folder = tmp_path / "studies" / "smoke"
    slow = next(s.name for s in specs if s.config.model.attention == "attamba")
    fast = next(n for n in names if n != slow)
    proc = _driver(cluster, tmp_path, LONG)
    try:
        _wait_for(lambda: (folder / fast / DONE_FILE).is_file() and _sealed(folder / slow)
                  and not (folder / slow / DONE_FILE).is_file(), proc, 300, "one run finished, the other mid-run")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    orphan = _trains(folder / slow)[-1]["pid"]
    deadline = time.time() + 60
    while _alive(orphan) and time.time() < deadline:
        time.sleep(0.5)
    assert not _alive(orphan), "Ray ended the trial of the killed driver"
    assert not (folder / slow / DONE_FILE).is_file()

    again = subprocess.run(_command(cluster, tmp_path, LONG), cwd=tmp_path, env=_env(cluster), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads(again.stdout)
    assert (result["skipped"], result["trained"], result["failed"]) == (1, 1, [])
    assert len(_trains(folder / fast)) == 1, "the finished run was not trained again"
    assert len(_trains(folder / slow)) == 2
    assert json.loads((folder / slow / DONE_FILE).read_text())["result"]["start_step"] == _trains(folder / slow)[1][
        "resume_step"] > 0
    _assert_once_in_mlflow_and_nothing_running(tmp_path, names)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "--", "true"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _live_nodes(cluster) -> dict[str, dict]:
    return {n["NodeID"]: n for n in cluster.global_state.node_table() if n["Alive"]}


def test_a_node_that_sees_another_attamba_home_is_refused_before_any_run(cluster, tmp_path):
    """One more node joins in a mount namespace of its own, where another folder is mounted at ATTAMBA_HOME:
    the same path on another disk, as on a node that lacks the shared volume. The study stops with one
    line naming ATTAMBA_HOME and that node, before any run or MLflow store is made."""
    if not _can_unshare():
        pytest.skip("needs `unshare --mount` (a mount namespace) to give one node another view of a folder")
    home, elsewhere = tmp_path / "home", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    before = set(_live_nodes(cluster))
    marker = tempfile.mkdtemp(prefix="rn", dir="/tmp")   # the extra node's temp dir, to find its processes
    script = (f"mount --bind {elsewhere} {home} && exec ray start --address={cluster.address} --num-cpus=1 "
              f"--object-store-memory={80 * 2**20} --temp-dir={marker} --disable-usage-stats --block")
    node = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script],
                            env=_env(cluster), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (joined := set(_live_nodes(cluster)) - before):
            assert node.poll() is None, node.stderr.read()[-2000:]
            assert time.time() < deadline, "the extra node did not join"
            time.sleep(0.5)
        (other,) = joined
        command = _command(cluster, tmp_path)
        command = [*command[:command.index(str(SMOKE)) + 1], "--address", cluster.address]  # under ATTAMBA_HOME
        refused = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=400,
                                 env=_env(cluster, ATTAMBA_HOME=str(home), ATTAMBA_CACHE=str(home / "cache")))
    finally:
        stop_processes(marker)
        shutil.rmtree(marker, ignore_errors=True)
        deadline = time.time() + 90   # later tests must not see it alive in the GCS
        while other_alive := set(_live_nodes(cluster)) - before:
            if time.time() > deadline:
                break
            time.sleep(1)
    assert not other_alive
    assert refused.returncode == 2, refused.stderr[-3000:]
    error = [line for line in refused.stderr.splitlines() if line.startswith("attamba study: error:")]
    assert len(error) == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert (f"the run folder '{home / 'studies' / 'smoke'}' (under ATTAMBA_HOME={home}) is not on storage every "
            f"Ray node shares: node ") in error[0]
    assert f"node id {other[:12]}) does not see the probe file the driver wrote there (no such file)" in error[0]
    assert "set ATTAMBA_HOME" in error[0] and "docs/cluster.md" in error[0]
    # nothing of the study was made: no run, no MLflow store, no token cache built; no probe left behind
    assert sorted(p.name for p in (home / "studies" / "smoke").iterdir()) == ["driver.lock"]
    assert list((home / "cache").iterdir()) == []
    assert not (home / "mlflow.db").exists() and not list(home.rglob("study_attempts.jsonl"))
    assert not list(tmp_path.rglob(f"{PROBE_PREFIX}*"))
    assert not processes_under(marker)
