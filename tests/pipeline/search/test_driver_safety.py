"""A search driver among faults: one driver per study, stale trials decided by heartbeats, a trial whose
run finished before its driver could tell it, a driver stopped by SIGTERM, and an MLflow outage."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from pipeline import schema
from pipeline.runs import lease
from pipeline.search.space import load_search, param_names, suggest
from pipeline.search.store import (DRIVER_ATTR, RETRY_OF_ATTR, RUN_NAME_ATTR, beat, claim, open_study,
                                   recover_stale_trials)
from tests.helpers import REPO_ROOT as ROOT
from tests.pipeline.search.test_search import _count, _session_pids

SMOKE = ROOT / "configs" / "search" / "smoke.yaml"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def _in_child(script: str, *args: str) -> subprocess.Popen:
    """`script` in a fresh Python process that prints one line when ready; returns once it has."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *args], stdout=subprocess.PIPE,
                            text=True, env=ENV)
    assert proc.stdout.readline().strip() == "ready", "the child process failed"
    return proc


# ---- one driver per study -------------------------------------------------------------------------------

def test_a_second_driver_on_the_same_storage_refuses_to_start(tmp_path):
    from pipeline.search.driver import run_search

    url = f"sqlite:///{tmp_path}/o.db"
    holder = _in_child("""
        import sys, time
        from pipeline.runs import lease
        with lease.search_lease(sys.argv[1], "smoke", sys.argv[2], sys.argv[1]):
            print("ready", flush=True); time.sleep(600)
        """, url, str(tmp_path / "a"))
    try:
        # another out_dir, same storage and study: still the same study, so refused, before any work
        start = time.perf_counter()
        with pytest.raises(ValueError, match=rf"search 'smoke' in {url} is in use by process {holder.pid} "
                                             rf"on host {socket.gethostname()}"):
            run_search(SMOKE, [f"storage={url}", f"out_dir={tmp_path}/b"])
        assert time.perf_counter() - start < 10
        assert not (tmp_path / "b").exists()
    finally:
        holder.kill()
        holder.wait()
    # another study name in the same storage is another study: its own lease
    assert lease.search_lock_path(url, "smoke", tmp_path) != lease.search_lock_path(url, "other", tmp_path)


# ---- stale trials: heartbeats and the driver's stamp ----------------------------------------------------

def test_stale_trials_are_those_without_a_live_driver_or_heartbeat(tmp_path):
    search = load_search(SMOKE, [f"storage=sqlite:///{tmp_path}/o.db", f"out_dir={tmp_path}"])
    names = param_names(search.space)
    def reopen(grace=2):  # a new driver's view of the study (heartbeat settings belong to the storage)
        return open_study(search, heartbeat_interval=1, grace_period=grace)

    study = reopen()

    def running(study):
        trial = study.ask()
        claim(study, trial)
        suggest(trial, search.space)
        trial.set_user_attr(RUN_NAME_ATTR, f"smoke-t{trial.number:04d}")
        return trial

    silent, beating = running(study), running(study)  # this process is their live driver
    # a driver process that ran a trial and is gone (killed): its trial is stale at once
    gone = _in_child("""
        import sys
        from pipeline.search.space import load_search, suggest
        from pipeline.search.store import claim, open_study
        search = load_search(sys.argv[1], [f"storage=sqlite:///{sys.argv[2]}/o.db"])
        study = open_study(search, heartbeat_interval=1, grace_period=2)
        trial = study.ask(); claim(study, trial); suggest(trial, search.space)
        trial.set_user_attr("run_name", "smoke-t0002")
        print("ready", flush=True)
        """, str(SMOKE), str(tmp_path))
    assert gone.wait(60) == 0
    assert study.trials[2].user_attrs[DRIVER_ATTR] == {"host": socket.gethostname(), "pid": gone.pid}
    assert recover_stale_trials(reopen(grace=120), names) == [2]  # 0 and 1: fresh heartbeats, live driver
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {0: TrialState.RUNNING, 1: TrialState.RUNNING, 2: TrialState.FAIL, 3: TrialState.WAITING}
    assert study.trials[3].user_attrs[RETRY_OF_ATTR] == 2 and study.trials[3].user_attrs[RUN_NAME_ATTR] == "smoke-t0002"
    # a driver alive but silent past the grace period (hung, or cut off on another machine) loses its trial;
    # a trial whose heartbeat goes on is left alone
    for _ in range(8):
        beat(study, [beating])
        time.sleep(0.5)
    assert recover_stale_trials(reopen(), names) == [silent.number]
    states = {t.number: t.state for t in study.get_trials()}
    assert states[silent.number] == TrialState.FAIL and states[beating.number] == TrialState.RUNNING
    # a trial with no stamp (asked before its first heartbeat) is stale at once
    bare = study.ask()
    assert recover_stale_trials(reopen(), names) == [bare.number]


# ---- real searches on Ray -----------------------------------------------------------------------------

def _search_args(env_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "search", str(SMOKE), f"storage=sqlite:///{env_dir}/optuna.db",
            f"out_dir={env_dir}/searches", *overrides]


def _kill_session(proc: subprocess.Popen) -> None:
    for pid in _session_pids(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(30)


def _mlflow_runs(uri: str, experiment: str, run_name: str) -> list:
    from pipeline.tracking.mlflow_client import find_runs

    return find_runs(experiment, tags={"mlflow.runName": run_name}, uri=uri)


@pytest.mark.slow
def test_trial_finished_but_not_told_is_told_on_rerun_without_retraining(search_env):
    """The driver is frozen (SIGSTOP) the moment the trial's done marker appears, before Tune reports the
    trial's end to it, then the whole session is killed: the trial is RUNNING in Optuna with a finished run."""
    db = search_env / "optuna.db"
    args = _search_args(search_env, "n_trials=1", "resources.max_concurrent=1")
    proc = subprocess.Popen(args, cwd=search_env, env=ENV, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=open(search_env / "first.log", "w"))
    trials = search_env / "searches" / "smoke" / "trials"
    try:
        deadline = time.time() + 480
        while not list(trials.glob("*/study_done.json")):
            assert proc.poll() is None, (search_env / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial finished in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGSTOP)
        assert _count(db, "COMPLETE") == 0 and _count(db, "RUNNING") == 1, "frozen too late: already told"
    finally:
        _kill_session(proc)
    (done_file,) = trials.glob("*/study_done.json")
    run_name = done_file.parent.name
    result = subprocess.run(args, cwd=search_env, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{db}")
    (trial,) = study.get_trials()
    assert trial.state == TrialState.COMPLETE and trial.user_attrs[RUN_NAME_ATTR] == run_name
    assert trial.values[0] == pytest.approx(json.loads(done_file.read_text())["result"][schema.M_VAL_PPL])
    attempts = [json.loads(line) for line in (done_file.parent / "study_attempts.jsonl").read_text().splitlines()]
    assert [a["event"] for a in attempts].count("train") == 1, "trained once, never again"
    (run,) = _mlflow_runs(os.environ["MLFLOW_TRACKING_URI"], "smoke", run_name)  # one MLflow run of that name
    assert run.info.status == "FINISHED" and run.data.tags[schema.TAG_OPTUNA_TRIAL] == str(trial.number)
    assert trial.user_attrs["mlflow_run_id"] == run.info.run_id


@pytest.mark.slow
def test_second_driver_refused_and_sigterm_stops_the_driver_and_its_ray(search_env):
    db = search_env / "optuna.db"
    first = subprocess.Popen(_search_args(search_env), cwd=search_env, env=ENV, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=open(search_env / "first.log", "w"))
    try:
        deadline = time.time() + 480
        while _count(db, "RUNNING") < 1:  # Ray is up and a trial is being trained
            assert first.poll() is None, (search_env / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "no trial started in time"
            time.sleep(0.5)
        second = subprocess.run(_search_args(search_env, f"out_dir={search_env}/elsewhere"), cwd=search_env,
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"is in use by process {first.pid} on host {socket.gethostname()}" in second.stderr
        assert _count(db, "RUNNING") >= 1 and _count(db, "FAIL") == 0, "the first driver's trials untouched"
        helpers = set(_session_pids(first.pid)) - {first.pid}
        assert helpers, "the driver started Ray processes"
        first.send_signal(signal.SIGTERM)
        assert first.wait(180) == 130, (search_env / "first.log").read_text()[-3000:]
        deadline = time.time() + 60
        while _session_pids(first.pid):
            assert time.time() < deadline, f"Ray processes left running: {_session_pids(first.pid)}"
            time.sleep(1)
    finally:
        _kill_session(first)


@pytest.mark.slow
def test_mlflow_down_before_a_trial_completes_the_driver_survives_and_tags_arrive_after_sync(search_env):
    from tests.pipeline.tracking.test_tracking import MlflowServer

    from pipeline.tracking.journal import sync_journal
    from pipeline.tracking.mlflow_client import find_runs

    server = MlflowServer(search_env / "server")
    server.root.mkdir()
    server.start()
    env = {**ENV, "MLFLOW_TRACKING_URI": server.uri}
    db = search_env / "optuna.db"
    # A trial long enough for the server to be stopped while it trains (the smoke search's 6 steps take ~1 s).
    proc = subprocess.Popen(_search_args(search_env, "n_trials=1", "resources.max_concurrent=1",
                                         "run.train.steps=1500"), cwd=search_env,
                            env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=open(search_env / "first.log", "w"), text=True)
    try:
        deadline = time.time() + 480
        while not (_count(db, "RUNNING") and len(find_runs("smoke", uri=server.uri)) >= 2):  # parent and trial
            assert proc.poll() is None, (search_env / "first.log").read_text()[-3000:]
            assert time.time() < deadline, "the trial's MLflow run never appeared"
            time.sleep(1)
        assert _count(db, "COMPLETE") == 0
        server.kill()
        stdout, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, (search_env / "first.log").read_text()[-3000:]
        result = json.loads(stdout[stdout.index("{\n"):])  # after the progress lines
        assert result["complete"] == 1, "the driver survived the outage and told the trial"
        server.start()
        folder = search_env / "searches" / "smoke"
        (run_dir,) = (folder / "trials").iterdir()
        sync_journal(run_dir / "tracking")     # the trial's own points first: its run, then the driver's tags
        counts = sync_journal(folder / "tracking")
        assert counts["journals"] >= 1 and counts["pending"] == 0 and counts["failed"] == 0, counts
    finally:
        _kill_session(proc) if proc.poll() is None else None
        server.kill()
    server.start()
    try:
        (run,) = _mlflow_runs(server.uri, "smoke", run_dir.name)
        assert run.data.tags[schema.TAG_OPTUNA_TRIAL] == "0" and run.info.status == "FINISHED"
        (parent,) = [r for r in find_runs("smoke", uri=server.uri) if r.info.run_id == run.data.tags["mlflow.parentRunId"]]
        assert parent.info.status == "FINISHED"
        assert {a.path for a in _artifacts(server.uri, parent.info.run_id, "search")} >= {"search/pareto.json"}
    finally:
        server.kill()


def _artifacts(uri: str, run_id: str, path: str) -> list:
    from pipeline.tracking.mlflow_client import client

    return client(uri).list_artifacts(run_id, path)


def test_ray_that_cannot_start_is_one_clear_error(tmp_path):
    """A real start failure (Ray's temporary folder cannot be created): exit 2 and one error line, no traceback."""
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    result = subprocess.run(_search_args(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**ENV, "RAY_TMPDIR": str(not_a_folder), "ATTAMBA_CACHE": str(tmp_path / "cache"),
                                 "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("attamba search: error: could not start a local Ray: NotADirectoryError"), last
    assert "--address" in last
