"""`train(config) -> metrics`: one run on a DeepSpeed engine, resumable exactly from its checkpoints.

Runs alone (`python`, `torchrun`, `deepspeed` launchers) or inside Ray Train workers, whose process
group it reuses; it imports nothing from Ray. Everything that can be checked (config types, data,
tokenizer, sequence length, the checkpoint to resume) is checked before the first forward pass.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from attamba.model import AttambaLM

from pipeline.train import checkpoint as ckpt
from pipeline.train import lock
from pipeline import schema
from pipeline.config import RunConfig, dump_yaml, run_config_from_dict
from pipeline.data.prepare import prepare
from pipeline.eval.evaluate import evaluate_model
from pipeline.train.engine import (GuardedAdamW, build_optimizer, build_scheduler, deepspeed_config,
                                   init_distributed, resolve_device)
from pipeline.train.run_tracking import log_run_start, open_tracker
from pipeline.train.throughput import throughput

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class StopTraining(Exception):
    """Raised by an `on_eval` callback to end the run after that evaluation (and its checkpoint)."""


@dataclass
class Progress:
    """Where the loop is. The first three fields are saved in every checkpoint and restored on resume;
    the timings cover this call of `train` only."""

    step: int = 0                          # optimizer steps done, skipped ones included
    consecutive_skips: int = 0             # non-finite steps in a row up to `step`
    skipped_total: int = 0
    first_step_start: float | None = None  # time.time() when this call's first training step began
    steps_s: float = 0.0                   # seconds inside training steps (forward, backward, optimizer)


@dataclass
class _Run:
    """What `train` builds once and its loop uses: the engine and everything around it."""

    cfg: RunConfig
    cfg_dict: dict                         # cfg.to_dict(), hashed into every checkpoint
    engine: object                         # deepspeed.DeepSpeedEngine
    optimizer: GuardedAdamW
    data: object                           # PreparedData
    batches: object                        # TrainBatches, resumable through .position
    tracker: object                        # Tracker
    on_eval: Callable | None
    rank: int
    world: int
    device: torch.device
    out_dir: Path
    tok_path: str | None                   # tokenizer.json copied into checkpoints


def _on_all_ranks(fn, rank: int, what: str):
    """Run `fn` on rank 0 first (it may fill caches), then on the others; an error on rank 0 is raised
    there and reported on the others instead of leaving them waiting at a barrier."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after telling the other ranks
            error = exc
    flag = torch.tensor([0.0 if error is None else 1.0])
    dist.all_reduce(flag)
    if error is not None:
        raise error
    if flag.item() > 0:
        raise ValueError(f"rank 0 failed while {what}; see its error")
    return result if rank == 0 else fn()


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _mean_over_ranks(value: float, world: int) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return float(t.item()) / world


def _grad_norm(params) -> float:
    grads = [p.grad.detach().double().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else float("nan")


def _check_resume(directory: Path, cfg_dict: dict, world: int) -> None:
    manifest = ckpt.verify(directory)
    if manifest["config_hash"] != ckpt.config_hash(cfg_dict):
        raise ValueError(f"checkpoint {str(directory)!r} was made with another model/data/optim/batch config "
                         f"than this run's; use a new train.out_dir, or pass resume=False to start over")
    if manifest.get("world_size", world) != world:
        raise ValueError(f"checkpoint {str(directory)!r} was written by {manifest['world_size']} ranks, this run "
                         f"has {world}; exact resume needs the same world size")


def train(cfg: RunConfig, *, tracker=None, on_eval=None, resume: bool = True) -> dict:
    """Train `cfg` to `cfg.train.steps` optimizer steps; returns the final metrics (rank 0's view) with
    step, skipped_steps, tokens, out_dir and run_id, and this call's timings: first_step_start
    (time.time() when its first training step began; None if no step ran) and steps_s (seconds spent
    inside training steps, the sum of the per-step times behind tokens/s).

    on_eval(step, metrics, checkpoint_dir_or_None) is called on every rank after each evaluation (a
    reporter such as ray.train.report may be a barrier across ranks)."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"train() needs a RunConfig, got {type(cfg).__name__}; build one with load_run_config")
    cfg = run_config_from_dict(cfg.to_dict())  # re-checks every field's type, also for configs built in code
    with lock.run_folder(cfg.train.out_dir):  # one writer per run folder: a second train() fails at once
        return _train(cfg, tracker=tracker, on_eval=on_eval, resume=resume)


def _train(cfg: RunConfig, *, tracker, on_eval, resume: bool) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    if t.precision == "bf16" and device.type == "cpu" and t.zero_stage == 0:
        log.warning("bf16 on CPU is slow; fp32 is the usual choice here")
    rank, world = init_distributed(device)
    data = _on_all_ranks(lambda: prepare(cfg.data, max_seq_len=cfg.model.max_seq_len), rank, "preparing data")
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=data.vocab_size))
    cfg_dict = cfg.to_dict()
    out_dir = Path(t.out_dir)
    found = ckpt.latest_checkpoint(out_dir) if resume else None
    if found is not None:
        _check_resume(found, cfg_dict, world)
    data.batches("train", t.batch_size, rank, world)  # raises now if a global batch exceeds the split
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
    dist.barrier()

    import deepspeed

    _seed_everything(t.seed + rank)
    model = AttambaLM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, cfg),
                                           config=deepspeed_config(cfg, world))
    progress, position = Progress(), 0
    if found is not None:
        state = ckpt.load(engine, found)
        progress = Progress(state["step"], state["consecutive_skips"], state["skipped_total"])
        position = state["data_position"]
        _set_rng_state(state["rng"][rank])
    batches = data.batches("train", t.batch_size, rank, world, start=position)
    tracker, owned = open_tracker(cfg, out_dir, rank, found is not None, tracker)
    run = _Run(cfg, cfg_dict, engine, optimizer, data, batches, tracker, on_eval, rank, world, device, out_dir,
               getattr(data.tokenizer, "path", None))
    try:
        if found is None and rank == 0:
            log_run_start(tracker, cfg, out_dir / "config.yaml", world)
        result = _loop(run, progress)
        tracker.set_tags({schema.TAG_STATUS: "finished"})
    except BaseException:
        tracker.set_tags({schema.TAG_STATUS: "failed"})
        if owned:
            tracker.finish("FAILED")
        raise
    if owned:
        tracker.finish("FINISHED")
    result["run_id"] = tracker.run_id
    return result


def _loop(run: _Run, progress: Progress) -> dict:
    """Steps from `progress.step` to cfg.train.steps (or an on_eval StopTraining), with logging,
    checkpoints and evaluations; `progress` is updated in place."""
    from tqdm.auto import tqdm

    cfg, t, tracker = run.cfg, run.cfg.train, run.tracker
    tokens_per_step = cfg.tokens_per_step(run.world)
    rates = throughput(cfg.model, cfg.data.seq_len, run.world, run.device)
    bar = tqdm(total=t.steps, initial=progress.step, disable=run.rank != 0 or not t.progress, unit="step",
               desc=cfg.name)
    metrics_file = open(run.out_dir / METRICS_FILE, "a") if run.rank == 0 else None
    last, evaluated = {}, {}
    try:
        while progress.step < t.steps:
            if progress.first_step_start is None:
                progress.first_step_start = time.time()
            start = time.perf_counter()
            loss_mean, norm, skipped = _train_step(run)
            step_s = time.perf_counter() - start
            progress.steps_s += step_s
            progress.step += 1
            step = progress.step
            progress.consecutive_skips = progress.consecutive_skips + 1 if skipped else 0
            progress.skipped_total += int(skipped)
            tok_s = tokens_per_step / step_s
            last = {schema.M_LOSS: loss_mean, schema.M_LR: run.engine.get_lr()[0],
                    schema.M_GRAD_NORM: norm, schema.M_TOKENS_PER_S: tok_s, **rates.metrics(tok_s)}
            if run.rank == 0:
                metrics_file.write(json.dumps({"step": step, **last, "skipped": skipped}) + "\n")
                metrics_file.flush()
                if step % t.log_every == 0 or step == t.steps:
                    tracker.log_metrics({k: v for k, v in last.items() if math.isfinite(v)}, step)
                bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
            if progress.consecutive_skips >= t.max_consecutive_skips:
                raise RuntimeError(f"training stopped at step {step}: {progress.consecutive_skips} consecutive steps "
                                   f"had a non-finite loss or gradient norm (train.max_consecutive_skips="
                                   f"{t.max_consecutive_skips}); lower optim.lr or check the data")
            final = step == t.steps
            saved = None
            if (t.ckpt_every and step % t.ckpt_every == 0) or (final and t.ckpt_every):
                client = {"step": step, "data_position": run.batches.position,
                          "consecutive_skips": progress.consecutive_skips, "skipped_total": progress.skipped_total,
                          "rng": _gather_rng(run.world), "mlflow_run_id": tracker.run_id, "world_size": run.world}
                saved = ckpt.save(run.engine, run.out_dir, step, client, run.cfg_dict, run.tok_path, run.rank)
            if (t.eval_every and step % t.eval_every == 0) or final:
                evaluated = evaluate_model(run.engine.module, run.data, cfg.eval, t.batch_size, run.device)
                stop = 0.0
                if run.rank == 0:
                    tracker.log_metrics(evaluated, step)
                try:
                    if run.on_eval is not None:
                        run.on_eval(step, dict(evaluated), str(saved) if saved else None)
                except StopTraining:
                    stop = 1.0
                if _mean_over_ranks(stop, run.world) > 0:  # every rank leaves the loop together
                    break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {"step": progress.step, **last, **evaluated, "skipped_steps": progress.skipped_total,
            "tokens": progress.step * tokens_per_step, "out_dir": str(run.out_dir),
            "first_step_start": progress.first_step_start, "steps_s": progress.steps_s}


def _train_step(run: _Run) -> tuple[float, float, bool]:
    """One optimizer step over train.grad_accum micro-batches: (loss averaged over micro-batches and ranks,
    gradient norm before clipping (NaN where none is known), whether the update was skipped)."""
    t, engine = run.cfg.train, run.engine
    engine.train()
    loss_sum, bad_loss, norm, skipped = 0.0, False, None, False
    for _ in range(t.grad_accum):
        batch = next(run.batches).to(run.device)
        loss = engine(batch[:, :-1], batch[:, 1:])
        value = float(loss.detach())
        bad_loss |= not math.isfinite(value)
        loss_sum += value
        engine.backward(loss)
        if engine.is_gradient_accumulation_boundary():
            if t.zero_stage == 0 and t.precision == "fp32":
                norm = _grad_norm(engine.module.parameters())  # DeepSpeed reports none at stage 0; pre-clip
            skipped = run.optimizer.engine_step(engine, bad_loss=bad_loss)
        else:
            engine.step()
    ds_norm = engine.get_global_grad_norm()
    norm = float(ds_norm) if ds_norm is not None else norm
    return _mean_over_ranks(loss_sum / t.grad_accum, run.world), (float("nan") if norm is None else norm), skipped


def _gather_rng(world: int) -> list:
    """Every rank's RNG states (rank order), so each rank resumes its own streams."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, _rng_state())
    else:
        states[0] = _rng_state()
    return states
