"""One MLflow run per run folder: attempts of a folder (real processes, SIGKILLed) share its run.json's run,
replayed steps are not logged twice, a dead attempt's journal is delivered by the next attempt or a sync,
and a sync ends a run nobody writes any more KILLED. Against a real SQLite store."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import schema
from pipeline.cli import main
from pipeline.tracking import identity
from pipeline.tracking.tracker import MlflowTracker, TrackingConfig, sync_journal
from tests.helpers import REPO_ROOT
from tests.pipeline.tracking.mlflow_runs import assert_one_run_per_folder, client, duplicate_steps, steps

EXPERIMENT = "identity"

# One attempt of a run: its tracker logs train/loss at the given steps, then it finishes, or kills itself
# once everything was delivered ("delivered-kill"), or at once with what it logged still in its journal
# ("kill": a delivery interval far longer than the attempt; "created-kill": the same once its run exists).
ATTEMPT = """
import json, os, signal, sys, time
from pathlib import Path
from pipeline.tracking import identity
from pipeline.tracking.tracker import MlflowTracker, TrackingConfig
folder, uri, logged, end = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
identity.ensure(folder)
tracker = MlflowTracker(TrackingConfig(uri=uri, experiment="identity", run_name="r",
                                       flush_interval_s=600 if end.endswith("kill") and end != "delivered-kill" else 0.1),
                        journal_dir=folder / "tracking", run_file=identity.path_in(folder), start_timeout_s=5)
while end == "created-kill" and tracker.run_id is None:
    time.sleep(0.05)
for step in logged:
    tracker.log_metrics({"train/loss": 10.0 - step}, step=step)
if end == "finish":
    tracker.finish()
    sys.exit(0)
while end == "delivered-kill" and tracker.pending():
    time.sleep(0.05)
os.kill(os.getpid(), signal.SIGKILL)
"""


def _attempt(folder: Path, uri: str, logged, end: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", ATTEMPT, str(folder), uri, json.dumps(list(logged)), end],
                          env=env, capture_output=True, text=True, timeout=120)
    wanted = 0 if end == "finish" else -signal.SIGKILL
    assert proc.returncode == wanted, proc.stderr[-3000:]


def _closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"   # nothing listens there once the socket closes


def _loss_history(uri: str, folder: Path) -> list[tuple[int, float]]:
    run_id = identity.read(identity.path_in(folder)).mlflow_run_id
    return sorted((m.step, m.value) for m in client(uri).get_metric_history(run_id, "train/loss"))


@pytest.fixture()
def store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client(uri).search_experiments()
    return uri


def test_ensure_writes_the_run_file_once_and_adopts_a_legacy_id(tmp_path):
    first = identity.ensure(tmp_path / "a", config_hash="h1")
    assert len(first.key) == 32 and first.mlflow_run_id is None
    assert identity.ensure(tmp_path / "a") == first                       # kept, not replaced
    assert json.loads((tmp_path / "a" / identity.RUN_FILE).read_text())["key"] == first.key
    assert not list((tmp_path / "a").glob(".run.json.tmp*"))           # written through a temporary file
    legacy = tmp_path / "b"
    legacy.mkdir()
    (legacy / identity.LEGACY_RUN_ID_FILE).write_text("abc123\n")       # a folder made before run.json
    assert identity.ensure(legacy).mlflow_run_id == "abc123"
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / identity.RUN_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="run.json is not a readable run file"):
        identity.ensure(tmp_path / "c")


def test_attempts_share_one_run_and_replayed_steps_are_logged_once(store, tmp_path):
    folder = tmp_path / "run"
    _attempt(folder, store, range(1, 6), "delivered-kill")     # killed after step 5 was delivered
    run_id = identity.read(identity.path_in(folder)).mlflow_run_id
    assert client(store).get_run(run_id).info.status == "RUNNING"
    _attempt(folder, store, range(4, 9), "finish")             # resumed from a checkpoint at step 3
    assert_one_run_per_folder(store, EXPERIMENT, [folder])
    assert _loss_history(store, folder) == [(s, 10.0 - s) for s in range(1, 9)]
    assert identity.read(identity.path_in(folder)).mlflow_run_id == run_id


def test_a_run_never_created_while_mlflow_was_down_is_created_once_by_the_next_attempt(store, tmp_path):
    folder = tmp_path / "run"
    _attempt(folder, _closed_port_uri(), range(1, 4), "kill")   # MLflow down: the run does not exist yet
    assert identity.read(identity.path_in(folder)).mlflow_run_id is None
    _attempt(folder, store, range(1, 7), "finish")              # started over (no checkpoint): steps 1-3 again
    assert_one_run_per_folder(store, EXPERIMENT, [folder])
    assert _loss_history(store, folder) == [(s, 10.0 - s) for s in range(1, 7)]
    counts = sync_journal(folder, uri=store)                     # nothing is left, nothing opens a second run
    assert counts["delivered"] == counts["pending"] == counts["killed"] == 0
    assert_one_run_per_folder(store, EXPERIMENT, [folder])


def test_sync_delivers_a_killed_attempt_and_ends_its_run_killed_then_a_rerun_finishes_it(store, tmp_path, capsys):
    folder = tmp_path / "run"
    _attempt(folder, store, range(1, 6), "created-kill")        # the run exists; steps 1-5 wait in the journal
    run_id = identity.read(identity.path_in(folder)).mlflow_run_id
    assert steps(client(store), run_id, "train/loss") == []
    assert main(["sync", str(folder)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["killed"] == 1 and out["pending"] == out["failed"] == 0
    run = client(store).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags[schema.TAG_STATUS] == "killed"
    assert steps(client(store), run_id, "train/loss") == [1, 2, 3, 4, 5]
    assert sync_journal(folder)["killed"] == 0                   # ended once
    _attempt(folder, store, range(3, 9), "finish")              # a rerun from step 2 completes the same run
    assert_one_run_per_folder(store, EXPERIMENT, [folder])
    assert _loss_history(store, folder) == [(s, 10.0 - s) for s in range(1, 9)]


def test_sync_leaves_a_live_run_running(store, tmp_path):
    folder = tmp_path / "run"
    identity.ensure(folder)
    tracker = MlflowTracker(TrackingConfig(uri=store, experiment=EXPERIMENT, flush_interval_s=0.1),
                            journal_dir=folder / "tracking", run_file=identity.path_in(folder))
    try:
        tracker.log_metrics({"train/loss": 1.0}, step=1)
        counts = sync_journal(folder)
        assert counts["busy"] == 1 and counts["killed"] == 0
        assert client(store).get_run(tracker.run_id).info.status == "RUNNING"
    finally:
        tracker.finish()
    assert client(store).get_run(tracker.run_id).info.status == "FINISHED"
    assert sync_journal(folder)["killed"] == 0                   # a finished run is left as it is


def test_a_step_already_logged_is_not_logged_again_by_a_rerun_or_a_resend(store, tmp_path):
    folder = tmp_path / "run"
    identity.ensure(folder)
    for attempt in range(2):   # a finished run run again re-logs its stored final evaluation
        with MlflowTracker(TrackingConfig(uri=store, experiment=EXPERIMENT, flush_interval_s=0.1),
                           journal_dir=folder / "tracking", run_file=identity.path_in(folder)) as t:
            t.log_metrics({"val/loss": 2.5, "train/loss": 3.0}, step=40)
            t.log_metrics({"system/cpu_utilization_percentage": 10.0 + attempt}, step=0)   # a sample index
    for state in (folder / "tracking").glob("*.state.json"):   # every journal sent again from its start
        state.write_text(json.dumps({**json.loads(state.read_text()), "offset": 0}))
    counts = sync_journal(folder)
    assert counts["skipped"] == 4 and counts["killed"] == 0
    run_id = identity.read(identity.path_in(folder)).mlflow_run_id
    assert duplicate_steps(client(store), run_id) == {}
    assert steps(client(store), run_id, "val/loss") == [40]
    assert len(client(store).get_metric_history(run_id, "system/cpu_utilization_percentage")) == 2


def test_sync_exit_codes_and_refused_uris(store, tmp_path, capsys):
    folder = tmp_path / "run"
    _attempt(folder, store, range(1, 3), "created-kill")
    # a URI that cannot be a tracking store: refused before anything is read or sent
    assert main(["sync", str(folder), "--tracking-uri", "ftp://x"]) == 2
    assert "unknown scheme 'ftp'" in capsys.readouterr().err
    started = time.monotonic()
    assert main(["sync", str(folder), "--tracking-uri", f"sqlite:///{tmp_path}"]) == 2   # a folder
    err = capsys.readouterr().err
    assert "names a folder, not a SQLite database file" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "plain").write_text("x")
    assert main(["sync", str(folder), "--tracking-uri", f"sqlite:///{tmp_path / 'plain' / 'm.db'}"]) == 2
    assert "is a file, so the database cannot be created below it" in capsys.readouterr().err
    assert time.monotonic() - started < 10, "a local store that cannot open is not retried"
    # something to deliver and the server unreachable: exit 1, nothing lost
    assert main(["sync", str(folder), "--tracking-uri", _closed_port_uri()]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["failed"] == 1 and out["pending"] > 0 and out["delivered"] == 0
    assert main(["sync", str(folder)]) == 0                     # delivered to its own store
    assert json.loads(capsys.readouterr().out)["pending"] == 0


def test_an_unusable_sqlite_store_fails_at_once(tmp_path):
    started = time.monotonic()
    with pytest.raises(ValueError, match="names a folder, not a SQLite database file"):
        MlflowTracker(TrackingConfig(uri=f"sqlite:///{tmp_path}"), journal_dir=tmp_path / "j")
    assert time.monotonic() - started < 5
    readonly = tmp_path / "ro"
    readonly.mkdir()
    if os.geteuid() == 0:   # root writes through permission bits: a read-only mount is what stops it
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(readonly)],
                                 capture_output=True).returncode == 0
        if not mounted:
            pytest.skip("no read-only folder here: root cannot mount a tmpfs")
    else:
        readonly.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=r"the folder .*ro does not take new files"):
            MlflowTracker(TrackingConfig(uri=f"sqlite:///{readonly / 'mlflow.db'}"), journal_dir=tmp_path / "j")
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", str(readonly)], check=True)
        else:
            readonly.chmod(0o700)
