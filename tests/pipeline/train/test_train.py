"""Training on a real DeepSpeed engine (CPU, gloo): learning, data parallelism, exact resume, tracking,
early failures. Threads are pinned to 1: on a shared 2-core machine two OpenMP threads per process ran
the tiny model ~30x slower than one."""

import json
import math
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import schema
from pipeline.config import load_run_config
from pipeline.data.prepare import prepare
from pipeline.train.loop import StopTraining, train
from pipeline.train.engine import free_port
from tests.helpers import REPO_ROOT as REPO
from tests.pipeline.train.runs import child_env, kill_after_first_checkpoint, losses, tiny


def test_learns_below_unigram_entropy_and_tracks_everything(env):
    from mlflow.tracking import MlflowClient

    cfg = load_run_config(None, tiny(env / "run", "train.steps=240", "train.eval_every=120", "train.ckpt_every=0",
                                     "tracking.enabled=true", "train.study=st", "train.trial=t1",
                                     "eval.mqar_lengths=[32]", "eval.mqar_examples=8", "eval.mqar_pairs=4"))
    seen = []
    out = train(cfg, on_eval=lambda step, m, c: seen.append((step, m, c)))
    data = prepare(cfg.data)
    counts = np.bincount(np.asarray(data.tokens("train")), minlength=512)
    p = counts[counts > 0] / counts.sum()
    unigram = float(-(p * np.log(p)).sum())
    # A unigram model cannot beat `unigram` nats; 240 steps of context use must beat it by 0.7 nats.
    assert out[schema.M_VAL_LOSS] < unigram - 0.7, (out[schema.M_VAL_LOSS], unigram)
    assert [s for s, _, _ in seen] == [120, 240] and seen[-1][1][schema.M_VAL_LOSS] == out[schema.M_VAL_LOSS]
    # Periodic evals score eval.batches windows; their bytes are the split's, pro rata of targets.
    n_targets = len(data.tokens("validation")) - 1
    bpb = out[schema.M_VAL_LOSS] * n_targets / (math.log(2) * data.n_bytes("validation"))
    assert out[schema.M_VAL_BPB] == pytest.approx(bpb, rel=1e-9)
    print(f"val loss {out[schema.M_VAL_LOSS]:.3f} nats, unigram entropy {unigram:.3f}, bpb {bpb:.3f}")

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.005" and run.data.params["model.chunk_size"] == "4"
    assert run.data.params["model.vocab_size"] == "512" and "train.steps" in run.data.params
    tags = run.data.tags
    assert tags[schema.TAG_SIZE] == "micro" and tags[schema.TAG_ATTENTION] == "attamba"
    assert tags[schema.TAG_VARIANT] == "attamba-P4-L4-cyclic" and tags[schema.TAG_CHUNK] == "4"
    assert tags[schema.TAG_LEADING] == "4" and tags[schema.TAG_BOUNDARIES] == "cyclic"
    assert tags[schema.TAG_SEED] == "0" and tags[schema.TAG_STUDY] == "st" and tags[schema.TAG_TRIAL] == "t1"
    assert tags[schema.TAG_STATUS] == "finished"
    metrics = run.data.metrics
    for name in (schema.M_LOSS, schema.M_LR, schema.M_GRAD_NORM, schema.M_TOKENS_PER_S, schema.M_VAL_LOSS,
                 schema.M_VAL_PPL, schema.M_VAL_BPB, f"{schema.M_MQAR_PREFIX}32", schema.M_PARAMS,
                 schema.M_PARAMS_NON_EMB, schema.M_KV_BYTES, schema.M_KV_BYTES_PER_TOKEN,
                 schema.M_ATTN_FLOPS_PER_TOKEN, schema.M_TRAIN_FLOPS, schema.M_TRAIN_TOKENS, schema.M_EVAL_CONTEXT):
        assert name in metrics, name
    assert metrics[schema.M_TRAIN_TOKENS] == 240 * 8 * 64
    # Model FLOP/s on every step; no MFU on a CPU (no known peak rate) unless an override names one.
    from attamba import costs
    resolved = load_run_config(env / "run" / "config.yaml")  # the model as trained: vocabulary from the data
    assert metrics[schema.M_FLOPS_PER_S] == pytest.approx(
        metrics[schema.M_TOKENS_PER_S] * costs.training_flops_per_token(resolved.model, cfg.data.seq_len), rel=1e-9)
    assert (schema.M_MFU in metrics) == bool(os.environ.get("ATTAMBA_PEAK_FLOPS"))
    assert len(client.get_metric_history(run.info.run_id, schema.M_LOSS)) == 240
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "config.yaml" in artifacts
    assert (env / "run" / "config.yaml").is_file()


def test_resume_after_stop_reproduces_the_uninterrupted_run(env):
    common = ["train.steps=6", "train.ckpt_every=3", "train.eval_every=3", "train.grad_accum=2",
              "train.zero_stage=2", "model.boundaries=random", "tracking.enabled=true"]
    train(load_run_config(None, tiny(env / "full", *common)))

    def stop(step, metrics, checkpoint):
        assert checkpoint is not None and Path(checkpoint, "manifest.json").is_file()
        raise StopTraining

    cut = load_run_config(None, tiny(env / "cut", *common))
    first = train(cut, on_eval=stop)
    assert first["step"] == 3
    before = time.time()
    second = train(cut)
    assert second["step"] == 6 and second["run_id"] == first["run_id"]  # the same MLflow run continues
    # this call's timings only: its first step began after the call did; steps_s sums steps 4-6
    assert before < second["first_step_start"] < time.time()
    rows = [json.loads(line) for line in (env / "cut" / "metrics.jsonl").read_text().splitlines()]
    tokens_per_step = cut.tokens_per_step(1)
    assert second["steps_s"] == pytest.approx(sum(tokens_per_step / r[schema.M_TOKENS_PER_S] for r in rows[3:]))
    assert first["steps_s"] == pytest.approx(sum(tokens_per_step / r[schema.M_TOKENS_PER_S] for r in rows[:3]))
    idle = train(cut)  # already at train.steps: no step runs
    assert idle["step"] == 6 and idle["first_step_start"] is None and idle["steps_s"] == 0
    assert idle[schema.M_VAL_LOSS] == second[schema.M_VAL_LOSS]  # the final evaluation, stored in the checkpoint
    full, resumed = losses(env / "full"), losses(env / "cut")
    assert list(resumed) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6, rel=0)
    assert resumed[1] != resumed[4]


def test_sigkill_after_a_checkpoint_then_resume_reproduces_the_uninterrupted_run(env):
    """A real kill: the training process gets SIGKILL once a checkpoint exists; the same command resumes."""
    common = ["train.steps=12", "train.ckpt_every=4", "train.eval_every=0"]
    train(load_run_config(None, tiny(env / "full", *common)))
    out = env / "killed"
    command = kill_after_first_checkpoint(out, tiny(out, *common))
    done_before_kill = max(losses(out))
    assert done_before_kill < 12, "the run must be killed before it ends"
    resumed_run = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=600)
    assert resumed_run.returncode == 0, resumed_run.stderr[-2000:]
    full, resumed = losses(env / "full"), losses(out)
    # the killed attempt's rows after the checkpoint were dropped on resume: one row per step
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6, rel=0), step


def test_nonfinite_steps_are_skipped_then_training_stops(env):
    cfg = load_run_config(None, tiny(env / "nan", "train.steps=20", "optim.lr=1.0e+30", "optim.warmup_steps=0",
                                     "train.max_consecutive_skips=3", "train.ckpt_every=0", "train.eval_every=0"))
    with pytest.raises(RuntimeError, match="3 consecutive steps had a non-finite"):
        train(cfg)
    rows = [json.loads(line) for line in (env / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert not rows[0]["skipped"] and all(r["skipped"] for r in rows[-3:]) and len(rows) < 20


# ---- the guarded optimizer ------------------------------------------------------------------------------

def _guarded_pair(seed=0):
    """A small model with matrices, a bias and norm weights; GuardedAdamW on it (as build_optimizer
    groups them) and a plain torch AdamW, single-tensor path, on an identical copy."""
    import copy

    from pipeline.train.engine import GuardedAdamW

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3, bias=False))
    reference = copy.deepcopy(model)

    def groups(m):
        return [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]

    kwargs = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    return (model, GuardedAdamW(groups(model), foreach=True, **kwargs),
            reference, torch.optim.AdamW(groups(reference), foreach=False, **kwargs))


def _backward(model, seed):
    torch.manual_seed(seed)
    model(torch.randn(4, 6)).square().mean().backward()


def test_guarded_step_matches_adamw_and_returns_false_when_finite():
    model, opt, reference, ref_opt = _guarded_pair()
    for step in range(3):
        for m, o in ((model, opt), (reference, ref_opt)):
            o.zero_grad()
            _backward(m, step)
        assert opt.step() is False
        ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_nonfinite_gradient_anywhere_skips_the_whole_step(bad):
    model, opt, _, _ = _guarded_pair()
    _backward(model, 0)
    opt.step()  # moments exist, so an update after a skip would move every parameter
    names = [n for n, _ in model.named_parameters()]
    for index, name in enumerate(names):
        for where in (0, -1):
            opt.zero_grad()
            _backward(model, 1)
            grad = list(model.parameters())[index].grad
            grad.view(-1)[where] = bad
            params = [p.detach().clone() for p in model.parameters()]
            state = {k: v.clone() for p in model.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            assert opt.step() is True, (name, where)
            for (n, p), before in zip(model.named_parameters(), params):
                assert torch.equal(p, before), f"{n} changed after a non-finite gradient in {name}"
            after = {k: v for p in model.parameters() for k, v in opt.state[p].items() if torch.is_tensor(v)}
            assert all(torch.equal(after[k], v) for k, v in state.items())
            assert all(p.grad is None for p in model.parameters()), "the bad gradients are dropped"
    opt.zero_grad()
    _backward(model, 2)
    assert opt.step(bad_loss=True) is True, "a non-finite loss skips the step even when gradients are finite"
    _backward(model, 3)
    assert opt.step() is False


def test_any_nonfinite_matches_an_elementwise_check():
    from pipeline.train.engine import any_nonfinite

    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        tensors = [torch.randn(int(n), generator=g) * 10.0 ** float(torch.randint(-30, 38, (1,), generator=g))
                   for n in torch.randint(1, 50, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g)]
        tensors.append(torch.randn(3, 4, dtype=torch.float64, generator=g))
        if trial % 2:
            t = tensors[int(torch.randint(0, len(tensors), (1,), generator=g))]
            bad = (float("nan"), float("inf"))[trial % 4 // 2]
            t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = bad
        naive = any(not bool(torch.isfinite(t).all()) for t in tensors)
        assert any_nonfinite(tensors) == naive, trial
    big = [torch.full((1000,), 3e38)]   # finite: a sum of squares would overflow, the max-abs does not
    assert not any_nonfinite(big) and any_nonfinite(big, also=True) and not any_nonfinite([])


def test_engine_step_returns_the_skip_and_deepspeed_holds_the_schedule(env):
    import deepspeed

    from pipeline.train.engine import init_distributed

    init_distributed(torch.device("cpu"))
    model, opt, _, _ = _guarded_pair()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config={
        "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 4,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": 0}, "steps_per_print": 1 << 62,
        "zero_allow_untested_optimizer": True})
    x = torch.randn(4, 6)
    engine.backward(engine(x).square().mean())
    assert opt.engine_step(engine, bad_loss=False) is False
    lr = engine.get_lr()[0]
    engine.backward(engine(x).square().mean())
    list(engine.module.parameters())[1].grad[0] = float("nan")
    before = [p.detach().clone() for p in engine.module.parameters()]
    assert opt.engine_step(engine, bad_loss=False) is True
    assert all(torch.equal(p, b) for p, b in zip(engine.module.parameters(), before))
    assert engine.skipped_steps == 1 and engine.get_lr()[0] == lr, "a skipped step leaves the LR schedule"
    engine.backward(engine(x).square().mean())
    assert opt.engine_step(engine, bad_loss=True) is True and engine.skipped_steps == 2
    engine.backward(engine(x).square().mean())
    assert opt.engine_step(engine, bad_loss=False) is False and engine.get_lr()[0] < lr


@pytest.mark.parametrize("overrides, message", [
    (["data.source=/nonexistent/corpus.txt"], "no such file"),
    (["data.source=wikitext-2-raw-v1"], "bundled"),
    (["data.seq_len=128"], "max_seq_len"),
    (["train.stepz=3"], "unknown config key"),
    (["train.batch_size=eight"], "train.batch_size must be an integer"),
])
def test_bad_inputs_fail_before_training(env, overrides, message):
    out = env / "bad"
    with pytest.raises(ValueError, match=message):
        train(load_run_config(None, tiny(out, *overrides)))
    assert not (out / "metrics.jsonl").exists()


def test_empty_corpus_and_corrupt_checkpoint_are_refused(env):
    empty = env / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no text"):
        train(load_run_config(None, tiny(env / "e", f"data.source={empty}")))
    cfg = load_run_config(None, tiny(env / "c", "train.steps=2", "train.ckpt_every=2", "train.eval_every=0"))
    train(cfg)
    state = next((env / "c" / "checkpoints" / "step_00000002").rglob("mp_rank_00_model_states.pt"))
    raw = bytearray(state.read_bytes())
    raw[100] ^= 0xFF
    state.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its sha256"):
        train(load_run_config(None, tiny(env / "c", "train.steps=4", "train.ckpt_every=2")))


DP_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from pipeline.config import load_run_config
    from pipeline.train.loop import train
    train(load_run_config(None, json.loads(sys.argv[1])))
""")


def test_zero2_two_ranks_follow_one_rank_with_grad_accum(env):
    steps = ["train.steps=8", "train.ckpt_every=0", "train.eval_every=0", "train.zero_stage=2",
             "train.batch_size=4", "optim.warmup_steps=2"]
    port = free_port()
    procs = []
    for rank in range(2):
        e = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        args = json.dumps(tiny(env / "dp2", *steps))
        procs.append(subprocess.Popen([sys.executable, "-c", DP_SCRIPT, args], env=e, cwd=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    # Meanwhile, the same global batch in one process: micro-batches of 4, accumulated twice.
    train(load_run_config(None, tiny(env / "dp1", *steps, "train.grad_accum=2")))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    one, two = losses(env / "dp1"), losses(env / "dp2")
    assert list(one) == list(two) == list(range(1, 9))
    assert one[8] < one[1] - 0.3  # it trained, so the comparison covers updated weights
    for step in one:  # same data, same mean gradient: equal up to float reduction order
        assert two[step] == pytest.approx(one[step], abs=1e-5), (step, one, two)


def test_on_step_reports_every_log_every_steps_with_the_logged_loss_and_speed(env):
    seen = []
    cfg = load_run_config(None, tiny(env / "run", "train.steps=7", "train.log_every=3", "train.eval_every=0",
                                     "train.ckpt_every=0"))
    train(cfg, on_step=lambda step, metrics: seen.append((step, metrics)))
    # steps 3 and 6; the last step ends with an evaluation instead
    assert [step for step, _ in seen] == [3, 6]
    rows = {r["step"]: r for r in map(json.loads, (env / "run" / "metrics.jsonl").read_text().splitlines())}
    for step, metrics in seen:
        assert metrics[schema.M_LOSS] == rows[step][schema.M_LOSS]
        assert metrics[schema.M_TOKENS_PER_S] == rows[step][schema.M_TOKENS_PER_S] > 0


def test_a_tracked_run_records_the_code_version_in_an_experiment_the_ui_opens_for_training(env):
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.mlflow_client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG
    from pipeline.tracking.version import code_version

    cfg = load_run_config(None, tiny(env / "run", "train.steps=2", "train.eval_every=0", "train.ckpt_every=0",
                                     "tracking.enabled=true", "tracking.experiment=versioned"))
    out = train(cfg)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    version = client.get_run(out["run_id"]).data.tags[schema.TAG_CODE_VERSION]
    assert version == code_version() and version.split("-")[0] == sha
    assert client.get_experiment_by_name("versioned").tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
