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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from attamba.model import AttambaLM

from pipeline import checkpoints
from pipeline.train import checkpoint as ckpt
from pipeline.runs import lock
from pipeline import schema
from pipeline.config import RunConfig, run_config_from_dict
from pipeline.loader import dump_yaml
from pipeline.tracking.config import check_store, resolve_uri
from pipeline.data.prepare import prepare
from pipeline.eval.evaluate import evaluate_model
from pipeline.eval.variants import evaluate_variants, resolve, variant_tags
from pipeline.train.engine import (GuardedAdamW, build_optimizer, build_scheduler, deepspeed_config,
                                   init_distributed, resolve_device)
from pipeline.train import resume, storage
from pipeline.train.run_tracking import claim_folder, log_run_start, open_tracker, set_aside
from pipeline.train.throughput import throughput

log = logging.getLogger(__name__)

METRICS_FILE = resume.METRICS_FILE


class StopTraining(Exception):
    """Raised by an `on_eval` callback to end the run after that evaluation (and its checkpoint)."""


@dataclass
class Progress:
    """Where the loop is. The first three fields are saved in every checkpoint and restored on resume;
    the others cover this call of `train` only."""

    step: int = 0                          # optimizer steps done, skipped ones included
    consecutive_skips: int = 0             # non-finite steps in a row up to `step`
    skipped_total: int = 0
    first_step_start: float | None = None  # time.time() when this call's first training step began
    steps_s: float = 0.0                   # seconds inside training steps (forward, backward, optimizer)
    start_step: int = 0                    # the step this call began at: the checkpoint's, 0 when fresh


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
    on_step: Callable | None
    rank: int
    world: int
    device: torch.device
    out_dir: Path
    tok_path: str | None                   # tokenizer.json copied into checkpoints
    run_key: str | None                    # the folder's key (run.json; rank 0), kept in every checkpoint
    variants: list = field(default_factory=list)  # EvalVariants scored (on rank 0) at the final evaluation


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


def train(cfg: RunConfig, *, tracker=None, on_eval=None, on_step=None, restart: bool = False) -> dict:
    """Train `cfg` to `cfg.train.steps` optimizer steps; returns the final metrics (rank 0's view) with
    step, start_step (where this call began: a checkpoint's step, or 0), skipped_steps, tokens, out_dir
    and run_id, and this call's timings: first_step_start
    (time.time() when its first training step began; None if no step ran) and steps_s (seconds spent
    inside training steps, the sum of the per-step times behind tokens/s).

    A run whose final checkpoint exists returns the metrics stored in it (evaluating the checkpoint again
    when it has none) without training. on_eval(step, metrics, checkpoint_dir_or_None) is called on every
    rank after each evaluation (a reporter such as ray.train.report may be a barrier across ranks);
    on_step(step, metrics) likewise at every train.log_every-th step, with the step's loss and tokens/s,
    for progress displays.

    restart=True starts the run folder over: what earlier attempts left there (checkpoints, metrics,
    run file, journals) moves into `out_dir/restarted/<time>/`, and the run gets a new MLflow run."""
    if not isinstance(cfg, RunConfig):
        raise ValueError(f"train() needs a RunConfig, got {type(cfg).__name__}; build one with load_run_config")
    cfg = run_config_from_dict(cfg.to_dict())  # re-checks every field's type, also for configs built in code
    with lock.run_folder(cfg.train.out_dir):  # one writer per run folder: a second train() fails at once
        return _train(cfg, tracker=tracker, on_eval=on_eval, on_step=on_step, restart=restart)


def _train(cfg: RunConfig, *, tracker, on_eval, on_step, restart: bool) -> dict:
    t = cfg.train
    device = resolve_device(t.device)
    if t.precision == "bf16" and device.type == "cpu" and t.zero_stage == 0:
        log.warning("bf16 on CPU is slow; fp32 is the usual choice here")
    variants = resolve(cfg.model, cfg.eval.variants)  # a shape-changing variant fails here, before any work
    if cfg.tracking.enabled:
        check_store(resolve_uri(cfg.tracking.uri))  # a local store that can never open fails before any work
    rank, world = init_distributed(device)
    data = _on_all_ranks(lambda: prepare(cfg.data, max_seq_len=cfg.model.max_seq_len), rank, "preparing data")
    cfg = replace(cfg, model=replace(cfg.model, vocab_size=data.vocab_size))
    cfg_dict = cfg.to_dict()
    variants = [replace(v, model=replace(v.model, vocab_size=data.vocab_size)) for v in variants]
    out_dir = Path(t.out_dir)
    data.batches("train", t.batch_size, rank, world)  # raises now if a global batch exceeds the split
    if restart and rank == 0:
        set_aside(out_dir, keep=(lock.RUN_LOCK_FILE,))
    dist.barrier()
    found = ckpt.choose_checkpoint(out_dir, rank)
    manifest = resume.check_checkpoint(found, cfg, cfg_dict, data, world) if found is not None else {"step": 0}

    def ready_folder() -> None:
        if rank != 0:
            return
        if found is None:
            resume.check_fresh_start(out_dir, cfg_dict)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_yaml(cfg))
        resume.trim_metrics(out_dir / METRICS_FILE, manifest["step"])

    _on_all_ranks(ready_folder, rank, "checking the run folder")

    import deepspeed

    _seed_everything(t.seed + rank)
    model = AttambaLM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           lr_scheduler=build_scheduler(optimizer, cfg),
                                           config=deepspeed_config(cfg, world))
    progress, position, state = Progress(), 0, {}
    if found is not None:
        state = ckpt.load(engine, found)
        ckpt.confirm_step(found, state["step"], device if device.type == "cuda" else "cpu")
        progress = Progress(state["step"], state["consecutive_skips"], state["skipped_total"],
                            start_step=state["step"])
        position = state["data_position"]
        _set_rng_state(state["rng"][rank])
    batches = data.batches("train", t.batch_size, rank, world, start=position)
    run_key = claim_folder(cfg, out_dir, checkpoints.config_hash(cfg_dict), state).key if rank == 0 else None
    tracker, owned = open_tracker(cfg, out_dir, rank, tracker)
    run = _Run(cfg, cfg_dict, engine, optimizer, data, batches, tracker, on_eval, on_step, rank, world, device,
               out_dir, getattr(data.tokenizer, "path", None), run_key, variants)
    try:
        if found is None and rank == 0:
            log_run_start(tracker, cfg, out_dir / "config.yaml", world)
        if found is not None and progress.step >= t.steps:
            result = _finished(run, progress, state, found)
        else:
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


def _result(run: _Run, progress: Progress, metrics: dict) -> dict:
    return {"step": progress.step, "start_step": progress.start_step, **metrics,
            "skipped_steps": progress.skipped_total, "tokens": progress.step * run.cfg.tokens_per_step(run.world),
            "out_dir": str(run.out_dir), "first_step_start": progress.first_step_start, "steps_s": progress.steps_s}


def _evaluate(run: _Run, step: int) -> dict:
    """Periodic evaluations score eval.batches batches; the final one the whole validation split, then the
    evaluation variants (rank 0: the others hold the same weights and would only repeat its numbers)."""
    final = step == run.cfg.train.steps
    log.info("evaluating at step %d%s", step, " (final)" if final else "")
    batch = run.cfg.train.batch_size
    evaluated = evaluate_model(run.engine.module, run.data, run.cfg.eval, batch, run.device, full=final)
    if final:
        evaluated.update(_evaluate_variants(run, run.variants))
    run.tracker.log_metrics(evaluated, step)  # a NoopTracker on ranks other than 0
    return evaluated


def _evaluate_variants(run: _Run, variants: list) -> dict:
    """The variants' metrics (rank 0; {} elsewhere) and, on rank 0, their tags. Every rank calls it: the
    weights are gathered collectively under ZeRO-3."""
    if not variants:
        return {}
    weights = ckpt.full_weights(run.engine)
    if run.rank != 0:
        return {}
    metrics = evaluate_variants(weights, variants, run.data, run.cfg.train.batch_size, run.device)
    run.tracker.set_tags(variant_tags(variants))
    return metrics


def _report(run: _Run, step: int, evaluated: dict, checkpoint: Path | None) -> bool:
    """on_eval on every rank; True when any rank's callback asked to stop (every rank leaves together)."""
    stop = 0.0
    try:
        if run.on_eval is not None:
            run.on_eval(step, dict(evaluated), str(checkpoint) if checkpoint else None)
    except StopTraining:
        stop = 1.0
    return _mean_over_ranks(stop, run.world) > 0


def _finished(run: _Run, progress: Progress, state: dict, checkpoint: Path) -> dict:
    """A resume at train.steps: the evaluation stored with the final checkpoint, logged again (the attempt
    that made it may have been killed before its tracker delivered it) with the evaluation variants it
    lacks scored now, or, for a checkpoint made before evaluations were stored, a fresh evaluation of it."""
    evaluated = dict(state.get("eval") or {})
    if schema.M_VAL_LOSS in evaluated:
        stored = [v for v in run.variants if schema.eval_variant_metric(v.label, "loss") in evaluated]
        if stored:
            run.tracker.set_tags(variant_tags(stored))  # a NoopTracker on ranks other than 0
        # variants added to the config after the run finished are evaluated now, on the final weights
        evaluated.update(_evaluate_variants(run, [v for v in run.variants if v not in stored]))
        run.tracker.log_metrics(evaluated, progress.step)
    else:
        log.warning("checkpoint %s holds no evaluation metrics; evaluating it", checkpoint)
        evaluated = _evaluate(run, progress.step)
        _report(run, progress.step, evaluated, checkpoint)
    return _result(run, progress, {**(state.get("metrics") or {}), **evaluated})


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
    _warn_if_no_room(run, progress.step)
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
            if run.on_step is not None and step % t.log_every == 0 and step < t.steps:
                run.on_step(step, dict(last))
            if progress.consecutive_skips >= t.max_consecutive_skips:
                raise RuntimeError(f"training stopped at step {step}: {progress.consecutive_skips} consecutive steps "
                                   f"had a non-finite loss or gradient norm (train.max_consecutive_skips="
                                   f"{t.max_consecutive_skips}); lower optim.lr or check the data")
            final = step == t.steps
            evaluated_now = bool(t.eval_every and step % t.eval_every == 0) or final
            if evaluated_now:  # before the checkpoint, which stores its metrics: a finished run is durable
                evaluated = _evaluate(run, step)
            saved = None
            if (t.ckpt_every and step % t.ckpt_every == 0) or (final and t.ckpt_every):
                client = {"step": step, "data_position": run.batches.position,
                          "consecutive_skips": progress.consecutive_skips, "skipped_total": progress.skipped_total,
                          "rng": _gather_rng(run.world), "mlflow_run_id": tracker.run_id, "run_key": run.run_key,
                          "world_size": run.world, "metrics": dict(last),
                          "eval": dict(evaluated) if evaluated_now else {}}
                saved = ckpt.save(run.engine, run.out_dir, step, client, run.cfg_dict, run.tok_path, run.rank,
                                  about={"train_steps": t.steps, "data": resume.data_identity(run.data)},
                                  keep_last=t.keep_last, keep_steps=t.keep_steps)
                _warn_if_no_room(run, step)
            if evaluated_now and _report(run, step, evaluated, saved):
                break
    finally:
        bar.close()
        if metrics_file:
            metrics_file.close()
    return _result(run, progress, {**last, **evaluated})


def _warn_if_no_room(run: _Run, step: int) -> None:
    """On rank 0, a warning when the next checkpoint after `step` will not fit on its disk: early, while
    there is time to free space (the save itself fails with `storage.StorageFull`)."""
    t = run.cfg.train
    if run.rank != 0 or not t.ckpt_every or step >= t.steps:
        return
    upcoming = min(t.steps, (step // t.ckpt_every + 1) * t.ckpt_every)
    need, basis = ckpt.estimate_bytes(run.engine, run.out_dir, run.tok_path)
    warning = storage.room_warning(checkpoints.checkpoint_root(run.out_dir), need, basis, upcoming)
    if warning:
        log.warning(warning)


def _train_step(run: _Run) -> tuple[float, float, bool]:
    """One optimizer step over train.grad_accum micro-batches: (loss averaged over micro-batches and ranks,
    gradient norm before clipping (NaN where none is known), whether the update was skipped)."""
    t, engine = run.cfg.train, run.engine
    engine.train()
    loss_sum, bad_loss, norm, skipped = 0.0, False, None, False
    for _ in range(t.grad_accum):
        inputs, targets = _inputs_and_targets(next(run.batches))
        loss = engine(inputs.to(run.device), targets.to(run.device))
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


def _inputs_and_targets(batch) -> tuple[torch.Tensor, torch.Tensor]:
    """A text batch is rows of T + 1 tokens [B, T + 1]: inputs row[:-1], targets row[1:]. A task source
    (data.source=mqar) gives the pair itself, targets -100 where nothing is scored."""
    if isinstance(batch, tuple):
        return batch
    return batch[:, :-1], batch[:, 1:]


def _gather_rng(world: int) -> list:
    """Every rank's RNG states (rank order), so each rank resumes its own streams."""
    states = [None] * world
    if world > 1:
        dist.all_gather_object(states, _rng_state())
    else:
        states[0] = _rng_state()
    return states
