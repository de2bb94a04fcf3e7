"""Training on `data.source: mqar` through the real loop (DeepSpeed on CPU): the loss on the answers, recall
logged at each evaluation with no text metrics, a checkpoint that `attamba eval` scores, and a resume after a
kill that reproduces the uninterrupted run."""

import json
import os
import subprocess

import pytest
import torch

from pipeline import schema
from pipeline.config import load_run_config
from pipeline.data.mqar import IGNORE
from pipeline.data.prepare import prepare
from pipeline.eval.checkpoint import evaluate_checkpoint
from pipeline.checkpoints import latest_checkpoint, load_model
from pipeline.train.loop import StopTraining, train
from tests.pipeline.train.runs import child_env, kill_after_first_checkpoint, losses, rows


def mqar_run(out_dir, *overrides):
    return ["size=micro", "model.attention=full", "model.max_seq_len=32", "data.source=mqar", "data.seq_len=32",
            "data.mqar.pairs=4", "data.mqar.vocab_size=64", "data.mqar.val_examples=24", "optim.lr=1.0e-3",
            "optim.warmup_steps=2", "train.batch_size=8", "train.progress=false", "train.log_every=1",
            f"train.out_dir={out_dir}", "eval.batches=2", "tracking.enabled=false", *overrides]


def test_an_mqar_run_logs_recall_and_no_text_metrics(env):
    from mlflow.tracking import MlflowClient

    cfg = load_run_config(None, mqar_run(env / "run", "train.steps=4", "train.eval_every=2", "train.ckpt_every=4",
                                         "tracking.enabled=true", "eval.mqar_lengths=[32]", "eval.mqar_pairs=4"))
    seen = []
    out = train(cfg, on_eval=lambda step, m, c: seen.append((step, m)))
    periodic, final = seen[0][1], seen[1][1]
    assert [s for s, _ in seen] == [2, 4]
    # periodic evaluations score eval.batches x batch_size sequences of the fixed set, the final one all of it
    assert periodic[schema.M_VAL_TOKENS] == 2 * 8 * 4 and final[schema.M_VAL_TOKENS] == 24 * 4
    for metrics in (periodic, final):
        assert 0 <= metrics[schema.M_VAL_RECALL] <= 1 and metrics[schema.M_VAL_LOSS] > 0
        assert any(k.startswith("val/recall_d") for k in metrics)
        assert f"{schema.M_MQAR_PREFIX}32" in metrics            # the probe still runs beside the task's recall
        assert schema.M_VAL_PPL not in metrics and schema.M_VAL_BPB not in metrics
    run = MlflowClient(os.environ["MLFLOW_TRACKING_URI"]).get_run(out["run_id"])
    assert run.data.params["data.source"] == "mqar" and run.data.params["model.vocab_size"] == "64"
    assert run.data.params["data.mqar.pairs"] == "4"
    logged = run.data.metrics
    assert schema.M_VAL_RECALL in logged and "val/recall_d1-8" in logged
    assert schema.M_VAL_PPL not in logged and schema.M_VAL_BPB not in logged
    # the first step's loss is on the answers only: about ln(64) for an untrained model, not the mean over
    # every position (which a model could lower by predicting fillers)
    assert abs(rows(env / "run")[0][schema.M_LOSS] - torch.log(torch.tensor(64.0)).item()) < 0.3

    checkpoint = latest_checkpoint(env / "run")
    again = evaluate_checkpoint(checkpoint)
    assert again[schema.M_VAL_RECALL] == final[schema.M_VAL_RECALL]
    assert again[schema.M_VAL_LOSS] == pytest.approx(final[schema.M_VAL_LOSS], rel=1e-6)
    assert again["n_sequences"] == 24 and schema.M_VAL_PPL not in again
    assert schema.split_metric("test", "recall") in evaluate_checkpoint(checkpoint, split="test")
    with pytest.raises(ValueError, match="--paper-metric scores text documents"):
        evaluate_checkpoint(checkpoint, paper_metric=True)
    variants = evaluate_checkpoint(checkpoint, variants=[{"window": 9}])   # the same weights through a window
    assert 0 <= variants["evalvar/swa-W9/recall"] <= 1 and "evalvar/swa-W9/ppl" not in variants
    model, loaded, tokenizer = load_model(checkpoint)
    assert tokenizer is None and model.config.vocab_size == 64 and loaded.data.source == "mqar"
    from pipeline.cli import main

    assert main(["generate", str(checkpoint), "--prompt", "hi"]) == 2   # refused in one line: no text


def test_training_reads_the_answers_as_its_only_targets(env):
    cfg = load_run_config(None, mqar_run(env / "r", "train.steps=1"))
    data = prepare(cfg.data, cfg.model.max_seq_len)
    inputs, targets = next(data.batches("train", 8))
    scored = targets != IGNORE
    assert scored.sum() == 8 * 4 and torch.equal(targets[scored], targets[scored].clamp(min=36))   # value ids


def test_resume_after_a_kill_reproduces_the_uninterrupted_run(env):
    common = ["train.steps=8", "train.ckpt_every=4", "train.eval_every=4", "train.grad_accum=2"]
    train(load_run_config(None, mqar_run(env / "full", *common)))
    out = env / "killed"
    command = kill_after_first_checkpoint(out, mqar_run(out, *common))
    assert max(losses(out)) < 8, "the run must be killed before it ends"
    resumed = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    full, again = losses(env / "full"), losses(out)
    assert all(again[s] == full[s] for s in range(1, 9)), (full, again)   # bit-identical
    assert len(set(full.values())) == 8


def test_stop_and_resume_in_process_continue_the_same_stream(env):
    """The same through StopTraining: what a resumed run reads next is what the stopped one would have read."""
    common = ["train.steps=4", "train.ckpt_every=2", "train.eval_every=2"]
    full = train(load_run_config(None, mqar_run(env / "full", *common)))

    def stop(step, metrics, checkpoint):
        raise StopTraining

    cut = load_run_config(None, mqar_run(env / "cut", *common))
    assert train(cut, on_eval=stop)["step"] == 2
    resumed = train(cut)
    assert resumed[schema.M_VAL_RECALL] == full[schema.M_VAL_RECALL]
    assert losses(env / "cut") == losses(env / "full")


@pytest.mark.slow
def test_the_recipe_config_solves_mqar(env):
    """configs/train_mqar.yaml as shipped (the full transformer at width 64, T=64, 4 pairs): >= 99% recall."""
    from tests.helpers import REPO_ROOT

    cfg = load_run_config(REPO_ROOT / "configs" / "train_mqar.yaml",
                          [f"train.out_dir={env / 'recipe'}", "tracking.enabled=false", "train.progress=false"])
    out = train(cfg)
    print(f"recall {out[schema.M_VAL_RECALL]:.4f} after {out['step']} steps, {out['steps_s']:.0f} s of steps")
    assert out[schema.M_VAL_RECALL] >= 0.99
