"""Tracking against real MLflow: a SQLite store, and a real `mlflow server` killed and restarted mid-run."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipeline.tracking.tracker import (
    PARENT_RUN_TAG, MlflowTracker, NoopTracker, TrackingConfig, end_run, find_runs, flatten_config,
    log_config, make_tracker, resolve_uri, start_parent_run, sync_journal,
)
from tests.pipeline.tracking.mlflow_runs import client as mlflow_client


def _history(client, run_id, key):
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- config and no-op


def test_file_uris_are_refused_with_a_fix(monkeypatch):
    for bad in ("file:///tmp/mlruns", "./mlruns", "mlruns"):
        with pytest.raises(ValueError, match=r"tracking\.uri.*sqlite:///"):
            TrackingConfig(uri=bad)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "file:./mlruns")
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI.*file store"):
        resolve_uri(None)
    with pytest.raises(ValueError, match="unknown scheme"):
        TrackingConfig(uri="ftp://host/x")


def test_uri_resolution_order(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_uri(None) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(None) == "http://127.0.0.1:5999"
    assert resolve_uri("sqlite:///x.db") == "sqlite:///x.db"


@pytest.mark.parametrize("field, value, match", [
    ("experiment", "", "tracking.experiment"),
    ("flush_interval_s", 0, "tracking.flush_interval_s must be > 0"),
    ("flush_timeout_s", -1, "tracking.flush_timeout_s"),
    ("run_name", " ", "tracking.run_name"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrackingConfig(**{field: value})


def test_noop_tracker_touches_nothing(monkeypatch, tmp_path):
    def no_network(*args, **kwargs):
        raise AssertionError("NoopTracker opened a connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.chdir(tmp_path)
    artifact = tmp_path / "a.txt"
    artifact.write_text("x")
    for tracker in (NoopTracker(), make_tracker(TrackingConfig(uri="http://127.0.0.1:1"), rank=1),
                    make_tracker(TrackingConfig(enabled=False, uri="http://127.0.0.1:1"))):
        assert isinstance(tracker, NoopTracker)
        with tracker as t:
            t.log_params({"a": 1})
            t.set_tags({"b": "c"})
            t.log_metrics({"loss": 1.0}, step=0)
            t.log_artifact(artifact)
            t.log_text("hello", "x.txt")
        with pytest.raises(ValueError, match="status must be one of"):
            t.finish("DONE")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_flatten_config():
    nested = {"model": {"dim": 64, "ssm": {"state_dim": 16}}, "seed": 0, "tags": [1, 2], "empty": {}}
    assert flatten_config(nested) == {"model.dim": "64", "model.ssm.state_dim": "16", "seed": "0",
                                      "tags": "[1, 2]", "empty": "{}"}


# ---------------------------------------------------------------- SQLite store


def test_everything_logged_is_read_back(store, tmp_path):
    config = TrackingConfig(uri=store, experiment="roundtrip", run_name="r1", flush_interval_s=0.1)
    many = {f"p{i:03d}": i for i in range(150)}  # more than MLflow's 100 params per batch
    nested = {"model": {"dim": 64, "chunk_size": 8}, "optim": {"lr": 3e-3}, "many": many,
              "long": "y" * 7000}
    artifact = tmp_path / "weights.txt"
    artifact.write_text("w=1\n")
    with MlflowTracker(config, journal_dir=tmp_path / "journal", tags={"study": "s1"}) as t:
        assert t.run_id is not None
        log_config(t, nested)
        t.set_tags({"model_size": "tiny", "seed": 3})
        for step in range(5):
            t.log_metrics({"train/loss": 10.0 - step, "train/lr": 0.1 * step}, step=step)
        t.log_artifact(artifact, artifact_path="files")
        artifact.write_text("changed after logging\n")  # the journal keeps the logged copy
        t.log_text("some notes", "notes/readme.md")
    client = mlflow_client(store)
    run = client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    params = run.data.params
    assert params["model.dim"] == "64" and params["model.chunk_size"] == "8"
    assert params["optim.lr"] == "0.003"
    assert all(params[f"many.p{i:03d}"] == str(i) for i in range(150))
    assert len(params["long"]) == 6000 and params["long"].endswith("...")
    assert run.data.tags["study"] == "s1" and run.data.tags["model_size"] == "tiny"
    assert run.data.tags["seed"] == "3"
    assert _history(client, t.run_id, "train/loss") == [(s, 10.0 - s) for s in range(5)]
    assert _history(client, t.run_id, "train/lr") == [(s, 0.1 * s) for s in range(5)]
    root = Path(client.download_artifacts(t.run_id, "", str(tmp_path / "dl")))
    assert (root / "files" / "weights.txt").read_text() == "w=1\n"
    assert (root / "notes" / "readme.md").read_text() == "some notes"
    import yaml

    assert yaml.safe_load((root / "config.yaml").read_text()) == nested
    assert t.pending() == 0


def test_a_run_logs_its_config_yaml_once(store, tmp_path):
    """The run directory's config.yaml is the tracked one, logged once (params beside it)."""
    from pipeline.config import RunConfig
    from pipeline.loader import dump_yaml
    from pipeline.train.run_tracking import log_run_start

    cfg = RunConfig()
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text(dump_yaml(cfg))
    config = TrackingConfig(uri=store, experiment="config-once", run_name="c1", flush_interval_s=0.1)
    with MlflowTracker(config, journal_dir=tmp_path / "journal") as t:
        log_run_start(t, cfg, path, 1)
    records = [json.loads(line) for journal in (tmp_path / "journal").glob("*.jsonl")
               for line in journal.read_text().splitlines() if line.strip()]
    logged = [r for r in records if (r["op"] == "text" and r["name"] == "config.yaml")
              or (r["op"] == "artifact" and Path(r["spool"]).name == "config.yaml")]
    assert len(logged) == 1, logged
    root = Path(mlflow_client(store).download_artifacts(t.run_id, "", str(tmp_path / "dl")))
    assert (root / "config.yaml").read_text() == path.read_text()
    assert mlflow_client(store).get_run(t.run_id).data.params["model.dim"] == str(cfg.model.dim)
    with pytest.raises(ValueError, match="log_config path must name a config.yaml file"):
        log_config(NoopTracker(), {}, tmp_path / "other.yaml")


def test_nested_run_and_find_runs(store, tmp_path):
    parent = start_parent_run("nested", "study-a", tags={"study": "a"}, uri=store)
    config = TrackingConfig(uri=store, experiment="nested", run_name="trial-1", parent_run_id=parent)
    with MlflowTracker(config, journal_dir=tmp_path, tags={"trial": "t1"}) as t:
        t.log_metrics({"val/loss": 2.5}, step=10)
    end_run(parent, "FINISHED", uri=store)
    client = mlflow_client(store)
    assert client.get_run(t.run_id).data.tags[PARENT_RUN_TAG] == parent
    assert client.get_run(parent).info.status == "FINISHED"
    children = find_runs("nested", uri=store, parent_run_id=parent)
    assert [r.info.run_id for r in children] == [t.run_id]
    assert [r.info.run_id for r in find_runs("nested", {"study": "a"}, uri=store)] == [parent]
    assert find_runs("nested", {"trial": "no-such"}, uri=store) == []
    assert find_runs("no-such-experiment", uri=store) == []


def test_resume_continues_the_same_run(store, tmp_path):
    config = TrackingConfig(uri=store, experiment="resume", run_name="r")
    first = MlflowTracker(config, journal_dir=tmp_path)
    first.log_params({"a": 1})
    for step in range(3):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.finish("KILLED")  # the job died; a restart resumes from its checkpoint
    resumed = MlflowTracker(TrackingConfig(uri=store, experiment="resume", resume_run_id=first.run_id),
                            journal_dir=tmp_path)
    assert resumed.run_id == first.run_id
    assert mlflow_client(store).get_run(first.run_id).info.status == "RUNNING"
    resumed.log_params({"a": 2})  # MLflow refuses a changed param for good; it must not block the rest
    for step in range(3, 6):
        resumed.log_metrics({"train/loss": float(step)}, step=step)
    resumed.finish()
    assert resumed.pending() == 0
    (rejected,) = tmp_path.glob("*.rejected.jsonl")
    assert [(r["key"], r["value"]) for r in map(json.loads, rejected.read_text().splitlines())] == [("a", "2")]
    client = mlflow_client(store)
    assert _history(client, first.run_id, "train/loss") == [(s, float(s)) for s in range(6)]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(find_runs("resume", uri=store)) == 1
    with pytest.raises(ValueError, match="resume_run_id='0123456789abcdef'"):
        MlflowTracker(TrackingConfig(uri=store, resume_run_id="0123456789abcdef"), journal_dir=tmp_path)


def test_exception_marks_the_run_failed(store, tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with make_tracker(TrackingConfig(uri=store, experiment="fail"), journal_dir=tmp_path) as t:
            t.log_metrics({"train/loss": 1.0}, step=0)
            raise RuntimeError("boom")
    run = mlflow_client(store).get_run(t.run_id)
    assert run.info.status == "FAILED"
    assert _history(mlflow_client(store), t.run_id, "train/loss") == [(0, 1.0)]


def test_resending_a_delivered_journal_adds_no_duplicates(store, tmp_path):
    with MlflowTracker(TrackingConfig(uri=store, experiment="dup"), journal_dir=tmp_path) as t:
        t.log_params({"a": 1})
        for step in range(4):
            t.log_metrics({"m": step * 1.5}, step=step)
    # A crash between MLflow accepting a batch and the offset being saved: the whole journal is re-sent.
    (state_path,) = tmp_path.glob("*.state.json")
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "offset": 0}))
    counts = sync_journal(tmp_path)
    assert counts["delivered"] == 7 and counts["pending"] == 0 and counts["rejected"] == 0
    assert _history(mlflow_client(store), t.run_id, "m") == [(s, s * 1.5) for s in range(4)]
    assert sync_journal(tmp_path)["delivered"] == 0


def test_system_metrics_are_journaled(store, tmp_path):
    config = TrackingConfig(uri=store, experiment="sys", system_metrics=True, system_metrics_interval_s=0.2)
    with MlflowTracker(config, journal_dir=tmp_path) as t:
        time.sleep(1.0)
    history = mlflow_client(store).get_metric_history(t.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2
    assert all(0.0 <= m.value <= 100.0 for m in history)


# ---------------------------------------------------------------- a real server, killed mid-run


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` in its own process group (it forks uvicorn workers), SIGKILLed as a whole."""

    def __init__(self, root: Path):
        self.root, self.port = root, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc = None

    def start(self, timeout_s=240.0):
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]
        log = open(self.root / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server did not answer /health within {timeout_s} s")

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    try:
        srv.start()
        yield srv
    finally:
        srv.kill()


def _timed_log(tracker, step, timings):
    start = time.perf_counter()
    tracker.log_metrics({"train/loss": 1.0 / (step + 1), "train/step_sq": float(step * step)}, step=step)
    timings.append(time.perf_counter() - start)


def test_server_killed_mid_run_loses_nothing(server, tmp_path):
    if server.proc is None:
        server.start()
    config = TrackingConfig(uri=server.uri, experiment="outage", run_name="killed", flush_interval_s=0.1,
                            flush_timeout_s=120)
    tracker = MlflowTracker(config, journal_dir=tmp_path)
    assert tracker.run_id is not None
    # The server (not the SQLite store) enforces MLflow's 100 params per batch: 150 must be split.
    log_config(tracker, {"many": {f"p{i:03d}": i for i in range(150)}})
    timings = []
    for step in range(20):
        _timed_log(tracker, step, timings)
        time.sleep(0.02)
    tracker.log_text("before the outage", "notes.txt")
    time.sleep(0.5)
    server.kill()
    for step in range(20, 60):
        _timed_log(tracker, step, timings)
        time.sleep(0.02)
    assert tracker.pending() > 0  # really undelivered while the server was down
    server.start()
    for step in range(60, 70):
        _timed_log(tracker, step, timings)
    tracker.finish()
    assert max(timings) < 0.5, f"a log call blocked for {max(timings):.3f} s"
    assert tracker.pending() == 0
    client = mlflow_client(server.uri)
    assert _history(client, tracker.run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(70)]
    assert _history(client, tracker.run_id, "train/step_sq") == [(s, float(s * s)) for s in range(70)]
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {f"many.p{i:03d}": str(i) for i in range(150)}
    local = client.download_artifacts(tracker.run_id, "notes.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "before the outage"


@pytest.mark.slow
def test_server_down_until_after_finish_then_sync(server, tmp_path):
    server.kill()
    config = TrackingConfig(uri=server.uri, experiment="outage", run_name="never-up", flush_timeout_s=1)
    started = time.perf_counter()
    tracker = MlflowTracker(config, journal_dir=tmp_path)
    assert time.perf_counter() - started < 20.0  # a refused connection fails at once; this is import time
    assert tracker.run_id is None  # the run itself is created later, by the sync
    timings = []
    tracker.log_params({"model.dim": 64})
    for step in range(30):
        _timed_log(tracker, step, timings)
    tracker.finish()
    assert max(timings) < 0.5
    assert tracker.pending() == 33  # start, params, 30 metric records, finish
    assert sync_journal(tmp_path)["failed"] == 1  # still down: nothing lost, nothing sent
    server.start()
    first = sync_journal(tmp_path)
    counts = {"journals": 1, "delivered": 33, "pending": 0, "rejected": 0, "quarantined": 0, "skipped": 0, "busy": 0,
              "failed": 0, "killed": 0}
    assert first == {**counts, "folders": [{"folder": str(tmp_path), **counts}]}
    second = sync_journal(tmp_path)
    assert second["delivered"] == 0 and second["pending"] == 0
    (run,) = [r for r in find_runs("outage", uri=server.uri) if r.info.run_name == "never-up"]
    client = mlflow_client(server.uri)
    assert _history(client, run.info.run_id, "train/loss") == [(s, 1.0 / (s + 1)) for s in range(30)]
    assert run.data.params == {"model.dim": "64"}
    assert run.info.status == "FINISHED"
