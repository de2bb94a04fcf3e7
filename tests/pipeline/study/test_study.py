"""Studies on Ray: expansion, validation before any trial, job submission, retries and resumption.

The Ray tests start real (local) Ray clusters and train real micro models; each stops its Ray in teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import yaml

from attamba import costs
from pipeline import schema
from pipeline.preflight import machine
from pipeline.runs.resources import TRIAL_CPU, check_resources, trainable_resources, trial_slots
from pipeline.runs.markers import DONE_FILE, read_attempts
from pipeline.study.spec import DISPLAY_NAME_MAX, Resources, expand, load_study
from tests.helpers import REPO_ROOT as REPO, stop_processes

SMOKE = REPO / "configs" / "studies" / "smoke.yaml"
STUDIES = REPO / "configs" / "studies"


def _study_file(tmp_path: Path, **changes) -> Path:
    """The smoke study with `changes` merged at the top level, writing into tmp_path."""
    data = yaml.safe_load(SMOKE.read_text())
    data["out_dir"] = str(tmp_path / "studies")
    data["run"]["data"]["cache_dir"] = str(tmp_path / "cache")
    data["run"]["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- expansion ------------------------------------------------------------------------------------------

def test_a_relative_out_dir_lies_under_attamba_home_and_an_absolute_one_stays(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTAMBA_HOME", str(tmp_path / "home"))
    study = load_study(SMOKE)
    assert study.out_dir == "studies" and study.folder == tmp_path / "home" / "studies" / "smoke"
    assert {spec.out_dir.parent for spec in expand(study)} == {study.folder}
    absolute = load_study(SMOKE, [f"out_dir={tmp_path / 'elsewhere'}"])
    assert {spec.out_dir.parent for spec in expand(absolute)} == {tmp_path / "elsewhere" / "smoke"}


@pytest.mark.parametrize("name", ["smoke", "quickstart", "paper_60m"])
def test_expand_is_pure_deterministic_and_names_are_unique(name):
    study = load_study(STUDIES / f"{name}.yaml")
    before = repr(study)
    first, second = expand(study), expand(study)
    assert [s.name for s in first] == [s.name for s in second]
    assert [s.config for s in first] == [s.config for s in second]
    assert repr(study) == before
    names = [s.name for s in first]
    assert len(names) == len(set(names))
    for spec in first:
        # the name is derived from the parameters, and so is the output folder
        assert spec.name.startswith(f"{spec.size}__") and f"__s{spec.seed}__" in spec.name
        assert spec.name.endswith(f"__D{spec.tokens}")
        assert spec.out_dir == study.folder / spec.name == Path.cwd() / study.out_dir / study.name / spec.name
        assert spec.config.tracking.experiment == study.name and spec.config.train.trial == spec.name
        # what the run trains, as the one-day bound of the pre-flight counts it
        assert (spec.tokens, spec.flops) == machine.training_flops(spec.config, study.resources.workers)
        if spec.config.model.attention == "attamba":
            assert f"P{spec.config.model.chunk_size}-L{spec.config.model.leading_tokens}" in spec.name


@pytest.mark.parametrize("path", sorted(STUDIES.glob("*.yaml")), ids=lambda p: p.stem)
def test_mlflow_run_names_are_short_unique_and_show_size_p_and_l(path):
    specs = expand(load_study(path))
    shown = [s.config.tracking.run_name for s in specs]
    assert len(set(shown)) == len(specs)
    for spec, name in zip(specs, shown):
        assert len(name) <= DISPLAY_NAME_MAX, name
        assert name.startswith(f"{spec.size}-") and f"-s{spec.seed}" in name
        kind = spec.variant.split("-")[0]     # attamba-P4-L16-cyclic, iso_kv-P4-L16-cyclic, full, swa-W17
        if kind != "attamba":
            assert f"-{kind.replace('_', '')}-" in name
        p_and_l = re.search(r"-P\d+-L\d+-", spec.variant)
        assert p_and_l is None or p_and_l.group() in name
        assert spec.out_dir.name == spec.name != name   # the folder keeps the full name


def test_mlflow_run_names_tell_boundaries_iso_baselines_and_budgets_apart(tmp_path):
    path = _study_file(tmp_path, attamba={"chunk_size": [4, 8], "leading_tokens": [4],
                                          "boundaries": ["cyclic", "uniform"]},
                       baselines=["full", "swa", "iso_kv", "iso_flop"], seeds=[0, 1],
                       tokens={"rule": "fixed", "tokens": 100_000, "budgets": [1.0, 2.0]})
    specs = expand(load_study(path))
    shown = {s.config.tracking.run_name for s in specs}
    # iso baselines are named by their own width F and run once per distinct model (issue 14)
    attamba = [s.config for s in specs if s.config.model.attention == "attamba"]
    iso_kv = {costs.iso_kv_config(c.model, c.data.seq_len).kv_dim for c in attamba}
    iso_flop = {costs.iso_flop_config(c.model, c.data.seq_len).kv_dim for c in attamba}
    assert len(shown) == len(specs) == (1 + 1 + 4 + len(iso_kv) + len(iso_flop)) * 2 * 2
    assert max(map(len, shown)) <= DISPLAY_NAME_MAX
    p8_uniform = next(c for c in attamba if c.model.chunk_size == 8 and c.model.boundaries == "uniform")
    f = costs.iso_kv_config(p8_uniform.model, p8_uniform.data.seq_len).kv_dim
    assert {"micro-P4-L4-cyc-s0-D100k", f"micro-isokv-F{f}-s1-D200k", "micro-swa-W5-s0-D100k"} <= shown, \
        sorted(shown)
    with pytest.raises(ValueError, match=r"tokens.budgets.*1%"):
        expand(load_study(path, ["tokens.budgets=[1.0, 1.001]"]))


def test_quickstart_pairs_three_seeds_of_each_variant_at_one_size():
    """The main job answers one question with an interval: every Attamba variant and the transformer at the
    same size and token budget, each with the same >= 3 seeds, so the report's gap is seed-paired."""
    specs = expand(load_study(STUDIES / "quickstart.yaml"))
    variants = {(s.config.model.attention, s.config.model.chunk_size if s.config.model.attention == "attamba"
                 else None) for s in specs}
    assert variants == {("full", None), ("attamba", 4), ("attamba", 8)}
    assert len({(s.size, s.tokens) for s in specs}) == 1
    seeds = {v: sorted(s.config.train.seed for s in specs
                       if (s.config.model.attention, s.config.model.chunk_size
                           if s.config.model.attention == "attamba" else None) == v) for v in variants}
    assert len(set(map(tuple, seeds.values()))) == 1 and len(seeds[("full", None)]) >= 3


def test_names_stay_unique_across_boundaries_and_iso_baselines(tmp_path):
    path = _study_file(tmp_path, attamba={"chunk_size": [4, 8], "leading_tokens": [4],
                                          "boundaries": ["cyclic", "uniform"]},
                       baselines=["full", "iso_kv", "iso_flop"])
    specs = expand(load_study(path))
    attamba = [s.config for s in specs if s.config.model.attention == "attamba"]
    iso = {solver(c.model, c.data.seq_len).variant() for c in attamba
           for solver in (costs.iso_kv_config, costs.iso_flop_config)}   # each distinct iso model runs once
    assert len(specs) == 1 + 4 + len(iso)
    assert len({s.name for s in specs}) == len(specs)


def test_changing_a_parameter_changes_only_that_runs_name(tmp_path):
    a = {s.name for s in expand(load_study(_study_file(tmp_path)))}
    b = {s.name for s in expand(load_study(_study_file(tmp_path), ["attamba.chunk_size=[4, 8]"]))}
    assert a < b and len(b - a) == 1


# ---- validation before any trial -------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"sizes": ["micro", "huge"]}, ["sizes", "'huge'", "micro"]),
    ({"attamba": {"chunk_size": [0]}}, ["chunk_size", "0", ">= 1"]),
    ({"resources": {"workers": 0}}, ["resources.workers", "0"]),
    ({"seeds": [0, 0]}, ["seeds", "distinct"]),
])
def test_bad_study_files_fail_before_ray_starts(tmp_path, change, words):
    from pipeline.study.driver import run_study

    with pytest.raises(ValueError) as info:
        run_study(_study_file(tmp_path, **change), address="127.0.0.1:1")  # would fail to connect
    for word in words:
        assert word in str(info.value)
    assert not (tmp_path / "studies").exists()


def test_a_ray_job_without_attamba_home_refuses_relative_outputs_before_ray_starts(tmp_path):
    """`ray job submit` runs the entrypoint in a temporary package folder with RAY_JOB_CONFIG_JSON_ENV_VAR set
    (seen with Ray 2.60): the smoke study's `out_dir: studies` would vanish with the session. Exit code 2,
    one line naming out_dir and ATTAMBA_HOME, nothing written, no Ray started."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATTAMBA_HOME", "MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    env.update(RAY_JOB_CONFIG_JSON_ENV_VAR="{}", PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "study", str(SMOKE), "--address", "127.0.0.1:1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert ("attamba study: error: out_dir='studies' is a relative path and this runs as a Ray job" in result.stderr
            and "set ATTAMBA_HOME to an absolute folder" in result.stderr and "Traceback" not in result.stderr)
    assert list(tmp_path.iterdir()) == []


def test_check_resources_names_the_field_and_the_cluster():
    check_resources(Resources(workers=1, cpus_per_worker=1), {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"resources.cpus_per_worker=1 x resources.workers=3 asks 3.01 CPU"):
        check_resources(Resources(workers=3), {"CPU": 2.0})
    with pytest.raises(ValueError, match=r"resources.gpus_per_worker=1 .* has 0 GPU"):
        check_resources(Resources(gpus_per_worker=1), {"CPU": 8.0})
    # A one-worker trial trains in its Tune trainable: 1 CPU per trial, nothing on top.
    assert trial_slots(Resources(max_concurrent=0), {"CPU": 2.0}) == 2
    assert trial_slots(Resources(max_concurrent=2, cpus_per_worker=0.5), {"CPU": 2.0}) == 2
    assert trial_slots(Resources(max_concurrent=8, cpus_per_worker=0.5), {"CPU": 2.0}) == 4
    # 2+ workers: the workers' CPUs plus the trainable that waits on its TorchTrainer
    assert trial_slots(Resources(workers=2, cpus_per_worker=0.5), {"CPU": 2.0}) == 1   # 1.01 CPU per trial
    assert trial_slots(Resources(workers=2, cpus_per_worker=0.49), {"CPU": 2.0}) == 2  # 0.99 CPU per trial
    with pytest.raises(ValueError, match=r"resources.cpus_per_worker=1 x resources.workers=2 asks 2.01 CPU"):
        check_resources(Resources(workers=2), {"CPU": 2.0})
    check_resources(Resources(workers=1, cpus_per_worker=2), {"CPU": 2.0})


def test_trainable_holds_the_workers_resources_only_for_one_worker_trials():
    assert trainable_resources(Resources(cpus_per_worker=0.99)) == {"CPU": 0.99}
    assert trainable_resources(Resources(cpus_per_worker=4, gpus_per_worker=0.5)) == {"CPU": 4, "GPU": 0.5}
    assert trainable_resources(Resources(workers=2, gpus_per_worker=1)) == {"CPU": TRIAL_CPU}
    # the slots agree with what the trainables and workers ask
    assert trial_slots(Resources(cpus_per_worker=4, gpus_per_worker=0.5), {"CPU": 16.0, "GPU": 1.0}) == 2
    assert trial_slots(Resources(workers=2, cpus_per_worker=4, gpus_per_worker=1), {"CPU": 16.0, "GPU": 4.0}) == 1


def test_resources_beyond_the_cluster_fail_before_any_trial(tmp_path, monkeypatch):
    """A real local Ray with 2 CPUs refuses a study that wants 4 workers per trial."""
    from pipeline.study.driver import run_study

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    path = _study_file(tmp_path, resources={"workers": 4})
    with pytest.raises(ValueError, match=r"resources.workers=4 asks 3.97 CPU per trial but the Ray cluster has"):
        run_study(path)
    import ray

    assert not ray.is_initialized()
    assert _started(tmp_path) == [] and not list(tmp_path.glob("studies/**/study_attempts.jsonl"))


# ---- real Ray clusters ----------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _study_command(tmp_path: Path, *overrides: str) -> list[str]:
    attamba = shutil.which("attamba")
    head = [attamba] if attamba else [sys.executable, "-m", "pipeline.cli"]
    return [*head, "study", str(SMOKE), f"out_dir={tmp_path / 'studies'}",
            f"run.data.cache_dir={tmp_path / 'cache'}",
            f"run.tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", *overrides]


def _mlflow_children(tmp_path: Path, study: str = "smoke") -> tuple[list, list]:
    from pipeline.tracking.mlflow_client import find_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents = find_runs(study, tags={schema.TAG_STUDY: study, "study_role": "parent"}, uri=uri)
    assert len(parents) == 1, "one parent run per study"
    return parents, find_runs(study, uri=uri, parent_run_id=parents[0].info.run_id)


def _assert_each_run_once(tmp_path: Path, names: list[str]) -> None:
    parents, children = _mlflow_children(tmp_path)
    trials = sorted(r.data.tags.get(schema.TAG_TRIAL) for r in children)
    assert trials == sorted(names), "every run exactly once under the parent"
    for run in children:
        assert run.info.status == "FINISHED"
        assert run.data.tags.get(schema.TAG_STUDY) == "smoke"
        assert schema.M_VAL_LOSS in run.data.metrics


def _trains(out_dir: Path) -> list[dict]:
    """The run's calls of `train` (rank 0), oldest first, from its attempt records."""
    return [r for r in read_attempts(out_dir) if r["event"] == "train"]


def _started(tmp_path: Path) -> list[str]:
    """The runs whose `train` was called, one entry per call, in the order of the calls."""
    calls = [r for out_dir in (tmp_path / "studies" / "smoke").glob("*/") for r in _trains(out_dir)]
    return [r["run"] for r in sorted(calls, key=lambda r: r["time"])]


def _driver_env(ray_tmp: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
    return env


def test_job_submitted_to_a_local_cluster_tracks_every_run_under_its_parent(tmp_path, ray_tmp, monkeypatch):
    port, dashboard = _free_port(), _free_port()
    # Token authentication is on by default for new clusters: give the cluster, the job client and the job
    # one token through the environment rather than ~/.ray/auth_token.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", uuid.uuid4().hex)
    from ray._raylet import AuthenticationTokenLoader, Config

    # An earlier local ray.init in this process cached its own token, and its RayConfig read the mode the
    # environment had then: the job client must send ours, in token mode.
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    env = _driver_env(ray_tmp) | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.environ["RAY_AUTH_TOKEN"]}
    subprocess.run(["ray", "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                    "--disable-usage-stats", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", f"--temp-dir={ray_tmp}",
                    # fixed default ports would collide with another Ray on the same machine
                    f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                    f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                    "--object-store-memory=100000000"], env=env, check=True, capture_output=True, timeout=120)
    try:
        from ray.job_submission import JobStatus, JobSubmissionClient

        client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}")
        # Relative outputs, as in the shipped configs: they must land under the job's ATTAMBA_HOME.
        command = " ".join(_study_command(tmp_path, "out_dir=studies", "run.tracking.uri=sqlite:///mlflow.db",
                                            "report=true"))
        deadline = time.time() + 90
        while True:  # the dashboard answers before its job agent is up
            try:
                job = client.submit_job(entrypoint=f"cd {REPO} && {command}",
                                        runtime_env={"env_vars": {"PYTHONPATH": str(REPO),
                                                                  "ATTAMBA_HOME": str(tmp_path)}})
                break
            except RuntimeError as error:
                if "No available agent" not in str(error) or time.time() > deadline:
                    raise
                time.sleep(2)
        deadline = time.time() + 400
        while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.time() < deadline, client.get_job_logs(job)[-3000:]
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        stop_processes(ray_tmp)
        # Forget our token, or later local Rays in this process would be sent it and refuse the driver.
        AuthenticationTokenLoader.instance().reset_cache()
    names = [s.name for s in expand(load_study(SMOKE))]
    _assert_each_run_once(tmp_path, names)
    assert sorted(_started(tmp_path)) == sorted(names)
    # the CLI prints the study's dict last; Ray may still log a line after it
    result, _ = json.JSONDecoder().raw_decode(logs[logs.index("{\n"):])
    assert result["trained"] == 2 and result["failed"] == []
    assert result["timing"]["trials_timed"] == 2 and 0 < result["timing"]["step_fraction"] < 1
    # The JSON says where everything went, and it is there.
    assert result["outputs"] == {"home": str(tmp_path), "runs": str(tmp_path / "studies" / "smoke"),
                                 "report": str(tmp_path / "reports" / "smoke"),
                                 "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    assert (tmp_path / "reports" / "smoke" / "report.html").is_file()
    # The study as resolved: its relative out_dir written where the runs went, under ATTAMBA_HOME.
    assert yaml.safe_load((tmp_path / "studies" / "smoke" / "study.yaml").read_text())["out_dir"] == \
        str(tmp_path / "studies")
    # Where the UI shows the study: its parent run, in the model-training view, after serving the store.
    assert result["mlflow_ui"]["run"].endswith(f"/runs/{result['parent_run_id']}?workflowType=machine_learning")
    assert result["mlflow_ui"]["serve"] == f"mlflow ui --backend-store-uri sqlite:///{tmp_path / 'mlflow.db'}"
    assert "MLflow UI: run `mlflow ui --backend-store-uri" in logs
    _assert_the_answer_is_in_mlflow(tmp_path, load_study(SMOKE, ["report=true"]))


def _assert_the_answer_is_in_mlflow(tmp_path: Path, study) -> None:
    """The parent run holds the study's params, its resolved config and the report; every run carries the
    code version and its short name; the experiment opens in MLflow's model-training view."""
    from mlflow import MlflowClient

    from pipeline.study.driver import study_params
    from pipeline.tracking.mlflow_client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from pipeline.tracking.version import code_version

    (parent,), children = _mlflow_children(tmp_path)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    specs = expand(study)
    assert parent.data.params == {k: str(v) for k, v in study_params(study, specs).items()}
    assert parent.data.params["sizes"] == "micro" and parent.data.params["resources.workers"] == "1"
    config = client.download_artifacts(parent.info.run_id, "study/study.yaml", str(tmp_path / "back"))
    assert yaml.safe_load(Path(config).read_text())["name"] == "smoke"
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/summary.md", "report/fits.json"} <= report
    assert client.get_experiment_by_name("smoke").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    # The parent's description is the report's answer, which the report opens with.
    note = parent.data.tags["mlflow.note.content"]
    assert note.startswith("**The answer** (report: ") and "report.html" in note
    answer = (tmp_path / "reports" / "smoke" / "summary.md").read_text().split("## The answer\n", 1)[1]
    assert all(line in answer for line in note.split("\n\n", 1)[1].splitlines() if line.strip())
    assert {r.info.run_name for r in children} == {s.config.tracking.run_name for s in specs}
    for run in [parent, *children]:
        assert run.data.tags[schema.TAG_CODE_VERSION] == code_version()


def _default_sigint():
    # A shell starts background jobs with SIGINT ignored, children inherit that, and Python then installs
    # no KeyboardInterrupt handler: give the driver the default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"driver exited ({proc.returncode}) before {what}:\n{out[-3000:]}")
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _checkpointed(out_dir: Path) -> bool:
    return any(out_dir.glob("checkpoints/*/manifest.json"))


KILL_CASES = {
    # one worker: the run trains inside its Tune trial process, which is the process killed
    1: ["tokens.tokens=102400"],
    # two workers through Ray Train (half a CPU each, one run at a time on two cores): rank 0 is killed
    2: ["tokens.tokens=102400", "resources.workers=2", "resources.cpus_per_worker=0.49", "resources.max_concurrent=1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("workers", sorted(KILL_CASES))
def test_killed_worker_is_retried_from_its_checkpoint_and_tracked_once(tmp_path, ray_tmp, workers):
    overrides = KILL_CASES[workers]
    specs = expand(load_study(SMOKE, overrides))
    names, steps = [s.name for s in specs], specs[0].config.train.steps
    victim = tmp_path / "studies" / "smoke" / names[0]
    # A few hundred steps with a checkpoint every 10: long enough to kill the worker mid-run.
    assert steps >= 200 and specs[0].config.train.ckpt_every == 10
    proc = subprocess.Popen(_study_command(tmp_path, *overrides), cwd=tmp_path,
                            env=_driver_env(ray_tmp), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        _wait_for(lambda: _checkpointed(victim) and _trains(victim), proc, 300, "a checkpoint")
        worker = _trains(victim)[-1]
        assert worker["host"] == socket.gethostname() and worker["workers"] == workers
        os.kill(worker["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert not (victim / DONE_FILE).read_text() == ""
    assert _started(tmp_path).count(names[0]) == 2, "the killed run was trained again"
    assert _started(tmp_path).count(names[1]) == 1
    attempts = [a for a in read_attempts(victim) if a["event"] == "attempt"]
    assert [a["status"] for a in attempts] == ["failed", "finished"]
    assert [t["pid"] for t in _trains(victim)][0] == worker["pid"], "the attempt records name the killed process"
    # Ray Train keeps a run folder (named by the run) under the study's Ray storage only for 2+ workers.
    assert (tmp_path / "studies" / "smoke" / "_ray" / names[0]).is_dir() == (workers > 1)
    # The retry went on from a checkpoint (metrics.jsonl is rewritten up to the checkpoint's step on
    # resume, so the rows alone cannot tell a restart from scratch): every step ran once, the last is the planned last.
    assert json.loads((victim / DONE_FILE).read_text())["result"]["start_step"] > 0
    done = [json.loads(line)["step"] for line in (victim / "metrics.jsonl").read_text().splitlines()]
    assert done == list(range(1, steps + 1))
    _assert_each_run_once(tmp_path, names)
    # The study's timing: wall time, the share of it in training steps, start-up per trial and attempts.
    result, _ = json.JSONDecoder().raw_decode(out[out.index("{\n"):])
    timing = result["timing"]
    assert result["trained"] == 2 and result["failed"] == [] and timing["trials_timed"] == 2
    assert 0 < timing["step_fraction"] < 1 and timing["wall_s"] > timing["steps_s"] / timing["slots"]
    assert 0 < timing["startup_s_mean"] <= timing["startup_s_max"] < timing["wall_s"]
    assert timing["per_run"][names[0]]["attempts"] == 2 and timing["per_run"][names[1]]["attempts"] == 1


@pytest.mark.slow
def test_interrupted_study_trains_only_the_missing_runs_when_run_again(tmp_path, ray_tmp):
    names = [s.name for s in expand(load_study(SMOKE, ["tokens.tokens=51200"]))]
    command = _study_command(tmp_path, "resources.max_concurrent=1", "tokens.tokens=51200")
    proc = subprocess.Popen(command, cwd=tmp_path, env=_driver_env(ray_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    try:
        first = _wait_for(lambda: [n for n in names if (tmp_path / "studies" / "smoke" / n / DONE_FILE).is_file()],
                          proc, 300, "a finished run")
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    assert "run the same command again" in out
    started_before = _started(tmp_path)
    missing = [n for n in names if not (tmp_path / "studies" / "smoke" / n / DONE_FILE).is_file()]
    assert missing, "the interrupt came after every run had finished; nothing left to resume"

    again = subprocess.run(command, cwd=tmp_path, env=_driver_env(ray_tmp), capture_output=True, text=True,
                           timeout=400)
    assert again.returncode == 0, again.stderr[-3000:]
    started_after = _started(tmp_path)[len(started_before):]
    assert sorted(started_after) == sorted(missing), "only the missing runs are trained again"
    for name in first:
        assert _started(tmp_path).count(name) == 1
    assert json.loads(again.stdout)["skipped"] == len(names) - len(missing)
    _assert_each_run_once(tmp_path, names)
    # Submitted once more with every run finished: nothing to train, and it says so without a NaN.
    third = subprocess.run(command, cwd=tmp_path, env=_driver_env(ray_tmp), capture_output=True, text=True,
                           timeout=400)
    assert third.returncode == 0, third.stderr[-3000:]
    result = json.loads(third.stdout, parse_constant=lambda name: pytest.fail(f"non-strict constant {name}"))
    assert result["trained"] == 0 and result["timing"]["startup_s_mean"] is None
    line = next(line for line in third.stderr.splitlines() if "study smoke: wall" in line)
    assert f"nothing trained (all {len(names)} runs had already finished)" in line and "nan" not in line
    assert result["mlflow_ui"]["run"].endswith(f"/runs/{result['parent_run_id']}?workflowType=machine_learning")


def test_an_attempt_whose_process_died_is_recorded_as_failed_by_the_next(tmp_path):
    from pipeline.ray.trainer import _close_dead_attempt
    from pipeline.runs.markers import ATTEMPTS_FILE

    def line(**record):
        with open(tmp_path / ATTEMPTS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")

    line(event="train", run="r", time=100.0, pid=1, host="h", workers=1, attempt_start=90.0)
    _close_dead_attempt(tmp_path, "r")
    died = read_attempts(tmp_path)[-1]
    # no step line: it ended at its last record
    assert died == {"event": "attempt", "run": "r", "start": 90.0, "end": 100.0, "status": "failed", "died": True,
                    "last_step": None}
    _close_dead_attempt(tmp_path, "r")                        # closed once only
    assert len(read_attempts(tmp_path)) == 2
    line(event="train", run="r", time=200.0, pid=2, host="h", workers=1, attempt_start=190.0)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    os.utime(tmp_path / "metrics.jsonl", (250.0, 250.0))      # its last step's line
    _close_dead_attempt(tmp_path, "r")
    assert read_attempts(tmp_path)[-1]["end"] == 250.0 and read_attempts(tmp_path)[-1]["last_step"] == 1
    line(event="attempt", run="r", start=300.0, end=310.0, status="finished")  # ended normally: nothing to add
    _close_dead_attempt(tmp_path, "r")
    assert [a["status"] for a in read_attempts(tmp_path) if a["event"] == "attempt"] == ["failed", "failed", "finished"]


@pytest.mark.slow
def test_sigterm_ends_the_study_its_running_runs_killed_and_a_rerun_finishes_each_once(tmp_path, ray_tmp):
    """SIGTERM while both runs train: the driver ends the parent KILLED and, once its Ray stopped, delivers what
    the killed trials journaled and ends their runs KILLED (none left RUNNING). The rerun resumes them into
    the same runs, FINISHED, every logged step once."""
    from tests.pipeline.tracking.mlflow_runs import assert_one_run_per_folder, steps

    overrides = ["tokens.tokens=102400"]                       # 400 steps a run
    specs = expand(load_study(SMOKE, overrides))
    folders = [tmp_path / "studies" / "smoke" / s.name for s in specs]
    total, log_every = specs[0].config.train.steps, specs[0].config.train.log_every
    command = _study_command(tmp_path, *overrides)
    proc = subprocess.Popen(command, cwd=tmp_path, env=_driver_env(ray_tmp), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def training() -> bool:   # both runs past their first checkpoint, neither finished
        logged = [len((f / "metrics.jsonl").read_text().splitlines()) if (f / "metrics.jsonl").is_file() else 0
                  for f in folders]
        return all(20 <= n < total - 20 for n in logged)

    try:
        _wait_for(training, proc, 400, "both runs training")
        os.kill(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, out[-3000:]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert_one_run_per_folder(uri, "smoke", folders, status="KILLED")
    (parent,), _ = _mlflow_children(tmp_path)
    assert parent.info.status == "KILLED"

    again = subprocess.run(command, cwd=tmp_path, env=_driver_env(ray_tmp), capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout)["trained"] == 2
    runs = assert_one_run_per_folder(uri, "smoke", folders)
    from mlflow import MlflowClient

    for folder, run in runs.items():
        assert steps(MlflowClient(uri), run.info.run_id, schema.M_LOSS) == list(range(log_every, total + 1, log_every))
        assert json.loads((folder / DONE_FILE).read_text())["result"]["start_step"] > 0, "resumed, not restarted"
    _assert_each_run_once(tmp_path, [s.name for s in specs])
