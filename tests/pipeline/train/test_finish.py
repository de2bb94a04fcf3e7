"""A finished run stays finished: the final evaluation is stored with the final checkpoint, a run killed
during it completes on rerun with its metrics in the result and in MLflow (one run, each step once), and a
resumed run continues its own MLflow run and its own metrics.jsonl."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pipeline import schema
from pipeline.config import load_run_config
from pipeline import checkpoints
from pipeline.train import checkpoint as ckpt
from pipeline.train.loop import StopTraining, train
from pipeline.tracking.tracker import sync_journal
from pipeline.tracking import identity
from tests.pipeline.tracking.mlflow_runs import assert_one_run_per_folder
from tests.pipeline.train.runs import TRAIN_CHILD, child_env, rows, tiny

CHILD = TRAIN_CHILD


def _mlflow():
    from mlflow.tracking import MlflowClient

    return MlflowClient(os.environ["MLFLOW_TRACKING_URI"])


def _steps(client, run_id, key):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_sigkill_during_the_final_evaluation_then_rerun_has_the_final_metrics(env):
    out = env / "run"
    # eval.batches=0 scores the whole validation split: seconds, time enough to kill the process inside it
    command = [sys.executable, "-c", CHILD, *tiny(out, "train.steps=8", "train.ckpt_every=4", "train.eval_every=4",
                                                  "eval.batches=0", "tracking.enabled=true")]
    proc = subprocess.Popen(command, env=child_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    deadline = time.time() + 300
    for line in proc.stderr:   # blocks until the child writes; the deadline is checked between lines
        seen.append(line)
        if "evaluating at step 8 (final)" in line:
            proc.send_signal(signal.SIGKILL)
            break
        assert time.time() < deadline, "no final evaluation began"
    assert proc.wait(60) == -signal.SIGKILL, "".join(seen[-30:])
    # killed inside the final evaluation: no final checkpoint, no val/* at step 8 in MLflow
    assert not (out / "checkpoints" / "step_00000008" / checkpoints.MANIFEST).exists()
    run_id = identity.read(out / identity.RUN_FILE).mlflow_run_id
    client = _mlflow()
    assert 8 not in _steps(client, run_id, schema.M_VAL_LOSS)

    rerun = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert result["step"] == 8 and result["start_step"] == 4 and result["run_id"] == run_id
    assert schema.M_VAL_LOSS in result and schema.M_VAL_PPL in result
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[schema.TAG_STATUS] == "finished"
    # what the killed attempt journaled but had not delivered (step 4's evaluation, its last steps) was
    # delivered by the rerun itself, and the steps it replayed from the checkpoint are there once
    assert _steps(client, run_id, schema.M_VAL_LOSS) == [4, 8]
    assert _steps(client, run_id, schema.M_LOSS) == list(range(1, 9))
    assert run.data.metrics[schema.M_VAL_LOSS] == pytest.approx(result[schema.M_VAL_LOSS], rel=1e-12)
    assert_one_run_per_folder(os.environ["MLFLOW_TRACKING_URI"], "attamba", [out])
    assert [r["step"] for r in rows(out)] == list(range(1, 9))
    counts = sync_journal(out / "tracking")
    assert counts["delivered"] == counts["pending"] == counts["killed"] == 0

    # a finished run, run again: the stored final evaluation, no training, the same MLflow run, no second point
    torch.set_num_threads(1)
    again = train(load_run_config(None, command[3:]))
    assert again["step"] == again["start_step"] == 8 and again["steps_s"] == 0 and again["run_id"] == run_id
    assert again[schema.M_VAL_LOSS] == result[schema.M_VAL_LOSS]
    assert_one_run_per_folder(os.environ["MLFLOW_TRACKING_URI"], "attamba", [out])


def test_a_final_checkpoint_without_stored_metrics_is_evaluated_again(env, caplog):
    cfg = load_run_config(None, tiny(env / "run", "train.steps=4", "train.ckpt_every=4", "train.eval_every=0"))
    first = train(cfg)
    # make it a checkpoint from before evaluations were stored: drop them from DeepSpeed's client state, reseal
    final = env / "run" / "checkpoints" / "step_00000004"
    states = final / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    assert schema.M_VAL_LOSS in state.pop("eval")
    torch.save(state, states)
    manifest = checkpoints.read_manifest(final)
    (final / checkpoints.MANIFEST).unlink()
    ckpt.write_manifest(final, 4, manifest["config_hash"], manifest["world_size"],
                        {k: manifest[k] for k in ("train_steps", "data")})
    seen = []
    with caplog.at_level(logging.WARNING, logger="pipeline.train.loop"):
        again = train(cfg, on_eval=lambda step, metrics, checkpoint: seen.append((step, checkpoint)))
    assert "holds no evaluation metrics; evaluating it" in caplog.text
    assert seen == [(4, str(final))] and again["steps_s"] == 0
    assert again[schema.M_VAL_LOSS] == pytest.approx(first[schema.M_VAL_LOSS], abs=1e-6, rel=0)


def test_resume_continues_its_mlflow_run_from_the_checkpoint_and_trims_metrics(env):
    """A lost run file is restored from the checkpoint: its key and MLflow run id."""
    out = env / "run"
    cfg = load_run_config(None, tiny(out, "train.steps=6", "train.ckpt_every=2", "train.eval_every=3",
                                     "tracking.enabled=true"))

    def stop(step, metrics, checkpoint):
        raise StopTraining   # at step 3, one step after the checkpoint at 2

    first = train(cfg, on_eval=stop)
    assert first["step"] == 3 and [r["step"] for r in rows(out)] == [1, 2, 3]
    key = identity.read(out / identity.RUN_FILE).key
    (out / identity.RUN_FILE).unlink()
    second = train(cfg)
    assert second["step"] == 6 and second["start_step"] == 2 and second["run_id"] == first["run_id"]
    assert identity.read(out / identity.RUN_FILE).mlflow_run_id == first["run_id"]
    assert identity.read(out / identity.RUN_FILE).key == key   # both restored from the checkpoint
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4, 5, 6]   # step 3 of the first attempt is gone
    client = _mlflow()
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert sorted(set(_steps(client, first["run_id"], schema.M_LOSS))) == [1, 2, 3, 4, 5, 6]
