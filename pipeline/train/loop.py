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
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from attamba.model import AttambaLM

from pipeline.train import checkpoint as ckpt
from pipeline import schema
from pipeline.config import RunConfig, dump_yaml, run_config_from_dict
from pipeline.data.prepare import prepare
from pipeline.eval.evaluate import evaluate_model
from pipeline.train.engine import (build_optimizer, build_scheduler, deepspeed_config, init_distributed,
                           resolve_device)
from pipeline.train.run_tracking import log_run_start, open_tracker

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class StopTraining(Exception):
    """Raised by an `on_eval` callback to end the run after that evaluation (and its checkpoint)."""


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
    """Train `cfg` to `cfg.train.steps` optimizer steps; returns the final metrics (rank 0's view).

    on_eval(step, metrics, checkpoint_dir_or_None) is called on every rank after each evaluation (a
    reporter such as ray.train.report may be a barrier across ranks)."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"train() needs a RunConfig, got {type(cfg).__name__}; build one with load_run_config")
    cfg = run_config_from_dict(cfg.to_dict())  # re-checks every field's type, also for configs built in code
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
    step, consecutive_skips, skipped_total, position = 0, 0, 0, 0
    if found is not None:
        state = ckpt.load(engine, found)
        step, position = state["step"], state["data_position"]
        consecutive_skips, skipped_total = state["consecutive_skips"], state["skipped_total"]
        _set_rng_state(state["rng"][rank])
    batches = data.batches("train", t.batch_size, rank, world, start=position)
    tracker, owned = open_tracker(cfg, out_dir, rank, found is not None, tracker)
    tok_path = getattr(data.tokenizer, "path", None)
    try:
        if found is None and rank == 0:
            log_run_start(tracker, cfg, out_dir / "config.yaml", world)
        result = _loop(engine, optimizer, cfg, cfg_dict, data, batches, tracker, on_eval, rank, world,
                       device, out_dir, tok_path, step, consecutive_skips, skipped_total)
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


def _loop(engine, optimizer, cfg, cfg_dict, data, batches, tracker, on_eval, rank, world, device,
          out_dir, tok_path, step, consecutive_skips, skipped_total) -> dict:
    from tqdm.auto import tqdm

    t = cfg.train
    tokens_per_step = cfg.tokens_per_step(world)
    bar = tqdm(total=t.steps, initial=step, disable=rank != 0 or not t.progress, unit="step", desc=cfg.name)
    metrics_file = open(out_dir / METRICS_FILE, "a") if rank == 0 else None
    params = list(engine.module.parameters())
    last, evaluated = {}, {}
    first_step_start, steps_s = None, 0.0  # wall clock at this call's first step; seconds inside steps
    try:
        while step < t.steps:
            if first_step_start is None:
                first_step_start = time.time()
            start = time.perf_counter()
            engine.train()
            loss_sum, bad_loss, norm = 0.0, False, None
            for _ in range(t.grad_accum):
                batch = next(batches).to(device)
                loss = engine(batch[:, :-1], batch[:, 1:])
                value = float(loss.detach())
                bad_loss |= not math.isfinite(value)
                loss_sum += value
                engine.backward(loss)
                if engine.is_gradient_accumulation_boundary():
                    optimizer.bad_loss, optimizer.overflow = bad_loss, False
                    skips_before = engine.skipped_steps
                    if t.zero_stage == 0 and t.precision == "fp32":
                        norm = _grad_norm(params)  # DeepSpeed reports none at stage 0; pre-clip, reduced
                engine.step()
            step += 1
            skipped = optimizer.overflow or engine.skipped_steps > skips_before
            ds_norm = engine.get_global_grad_norm()
            norm = float(ds_norm) if ds_norm is not None else norm
            consecutive_skips = consecutive_skips + 1 if skipped else 0
            skipped_total += int(skipped)
            loss_mean = _mean_over_ranks(loss_sum / t.grad_accum, world)
            step_s = time.perf_counter() - start
            steps_s += step_s
            tok_s = tokens_per_step / step_s
            last = {schema.M_LOSS: loss_mean, schema.M_LR: engine.get_lr()[0],
                    schema.M_GRAD_NORM: norm if norm is not None else float("nan"), schema.M_TOKENS_PER_S: tok_s}
            if rank == 0:
                metrics_file.write(json.dumps({"step": step, **last, "skipped": skipped}) + "\n")
                metrics_file.flush()
                if step % t.log_every == 0 or step == t.steps:
                    tracker.log_metrics({k: v for k, v in last.items() if math.isfinite(v)}, step)
                bar.set_postfix(loss=f"{loss_mean:.3f}", tok_s=f"{tok_s:,.0f}")
                bar.update(1)
            if consecutive_skips >= t.max_consecutive_skips:
                raise RuntimeError(f"training stopped at step {step}: {consecutive_skips} consecutive steps had a "
                                   f"non-finite loss or gradient norm (train.max_consecutive_skips="
                                   f"{t.max_consecutive_skips}); lower optim.lr or check the data")
            final = step == t.steps
            saved = None
            if (t.ckpt_every and step % t.ckpt_every == 0) or (final and t.ckpt_every):
                client = {"step": step, "data_position": batches.position, "consecutive_skips": consecutive_skips,
                          "skipped_total": skipped_total, "rng": _gather_rng(world),
                          "mlflow_run_id": tracker.run_id, "world_size": world}
                saved = ckpt.save(engine, out_dir, step, client, cfg_dict, tok_path, rank)
            if (t.eval_every and step % t.eval_every == 0) or final:
                evaluated = evaluate_model(engine.module, data, cfg.eval, t.batch_size, device)
                stop = 0.0
                if rank == 0:
                    tracker.log_metrics(evaluated, step)
                try:
                    if on_eval is not None:
                        on_eval(step, dict(evaluated), str(saved) if saved else None)
                except StopTraining:
                    stop = 1.0
                if _mean_over_ranks(stop, world) > 0:  # every rank leaves the loop together
                    break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return {"step": step, **last, **evaluated, "skipped_steps": skipped_total,
            "tokens": step * tokens_per_step, "out_dir": str(out_dir), "first_step_start": first_step_start,
            "steps_s": steps_s}


def _gather_rng(world: int) -> list:
    """Every rank's RNG states (rank order), so each rank resumes its own streams."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, _rng_state())
    else:
        states[0] = _rng_state()
    return states
