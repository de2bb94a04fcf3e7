"""Kill timelines of a lone run (real DeepSpeed runs in their own processes, real SIGKILL, real MLflow): killed
before its first checkpoint while the MLflow server is down, killed again before its tracker delivered,
killed inside a checkpoint save. After each rerun MLflow holds one run for the folder, FINISHED, with
every step once; `attamba sync` afterwards changes nothing. (The final evaluation's timeline is in
test_finish.py, a study's SIGTERM in tests/pipeline/study/test_study.py.)"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import schema
from pipeline.cli import main
from pipeline import checkpoints
from tests.pipeline.tracking.mlflow_runs import assert_one_run_per_folder, client, steps
from tests.pipeline.train.runs import TRAIN_CHILD, child_env, rows, tiny

EXPERIMENT = "timelines"


def _command(out, *overrides):
    return [sys.executable, "-c", TRAIN_CHILD, *tiny(out, "train.steps=12", "train.eval_every=6",
                                                     "tracking.enabled=true", f"tracking.experiment={EXPERIMENT}",
                                                     *overrides)]


def _kill_when(command, ready, what: str, timeout: float = 300) -> None:
    """Start `command`, SIGKILL it once `ready()` holds."""
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended ({proc.returncode}) before {what}: {proc.stderr.read()[-3000:]}")
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait(60)


def _finish(command) -> dict:
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _steps_done(out) -> list[int]:
    return [r["step"] for r in rows(out)] if (out / "metrics.jsonl").is_file() else []


@pytest.mark.slow
def test_killed_before_its_first_checkpoint_with_mlflow_down_then_before_delivery(env, capsys):
    from tests.pipeline.tracking.test_tracking import MlflowServer

    server = MlflowServer(env / "server")
    (env / "server").mkdir()
    out = env / "run"
    command = _command(out, "train.ckpt_every=6")
    os.environ["MLFLOW_TRACKING_URI"] = server.uri   # restored by the env fixture's monkeypatch
    try:
        # 1. the server is down: the run's MLflow run cannot be created; killed at step 3, no checkpoint
        _kill_when(command, lambda: len(_steps_done(out)) >= 3, "step 3")
        assert not any(out.glob("checkpoints/*/manifest.json"))
        server.start()
        # 2. the server is up; this attempt delivers once at its start, then sits on what it logs; killed two
        #    steps after its checkpoint at step 6
        _kill_when([*command, "tracking.flush_interval_s=600"],
                   lambda: any(out.glob("checkpoints/*/manifest.json")) and len(_steps_done(out)) >= 8, "step 8")
        # 3. the rerun resumes from step 6 and delivers both killed attempts' journals first
        result = _finish(command)
        assert result["start_step"] == 6 and result["step"] == 12
        (run,) = assert_one_run_per_folder(server.uri, EXPERIMENT, [out]).values()
        mlflow = client(server.uri)
        assert steps(mlflow, run.info.run_id, schema.M_LOSS) == list(range(1, 13))
        assert steps(mlflow, run.info.run_id, schema.M_VAL_LOSS) == [6, 12]
        assert run.info.run_id == result["run_id"]
        # nothing is left for a sync, and it opens no second run
        assert main(["sync", str(out)]) == 0
        synced = json.loads(capsys.readouterr().out)
        assert synced["delivered"] == synced["pending"] == synced["killed"] == 0
        assert_one_run_per_folder(server.uri, EXPERIMENT, [out])
    finally:
        server.kill()


def _stop_inside_a_save(proc, root, deadline) -> str | None:
    """Watch `root` (a run's checkpoints folder) and SIGSTOP the process as soon as a checkpoint folder
    without a manifest appears. Caught mid-save (still no manifest while stopped): its name, the process
    left stopped. Sealed meanwhile: SIGCONT, watch for the next one; None if the run ends first."""
    sealed = set()
    while time.time() < deadline and proc.poll() is None:
        try:
            names = os.listdir(root)
        except FileNotFoundError:
            names = []
        for name in names:
            if not name.startswith("step_") or name in sealed:
                continue
            if not (root / name / checkpoints.MANIFEST).exists():
                os.kill(proc.pid, signal.SIGSTOP)
                if not (root / name / checkpoints.MANIFEST).exists():
                    return name
                os.kill(proc.pid, signal.SIGCONT)
            sealed.add(name)
        time.sleep(0.0005)
    return None


@pytest.mark.slow
def test_killed_inside_a_checkpoint_save_resumes_from_the_one_before(env):
    out = env / "run"
    command = _command(out, "train.ckpt_every=2", "train.keep_last=0")
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:   # six saves to catch one in: each takes tens of milliseconds (hashing and fsyncing its files)
        caught = _stop_inside_a_save(proc, out / "checkpoints", time.time() + 300)
    finally:
        proc.kill()
        proc.wait(60)
    assert caught, "no checkpoint save was caught in progress"
    step = int(caught.split("_")[1])
    partial = out / "checkpoints" / caught
    assert partial.is_dir() and not (partial / checkpoints.MANIFEST).exists()
    result = _finish(command)
    assert result["start_step"] == step - 2 and result["step"] == 12
    assert checkpoints.verify(partial)["step"] == step          # saved again, whole, by the rerun
    assert _steps_done(out) == list(range(1, 13))
    uri = os.environ["MLFLOW_TRACKING_URI"]
    (run,) = assert_one_run_per_folder(uri, EXPERIMENT, [out]).values()
    assert steps(client(uri), run.info.run_id, schema.M_LOSS) == list(range(1, 13))
