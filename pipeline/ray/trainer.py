"""Runs `pipeline.train.loop.train` for a Tune trial and forwards its reports to Tune.

The training loop knows nothing of Ray: this module is the only place where the two meet. A Tune trial
is `run_trial`. A run of one worker calls `train` right in the trial's process (a single-rank process
group, its reports go to `ray.tune.report`); a run of 2+ workers builds a `TorchTrainer` whose workers
each call `train` in the process group Ray Train set up (reports go to `ray.train.report`, forwarded to
Tune). Either way `train` resumes from the last DeepSpeed checkpoint in the run's out_dir, so a trial
that Tune retries continues where the failed attempt stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline import schema
from pipeline.runs.markers import ATTEMPTS_FILE, DONE_FILE, append_line, read_attempts

if TYPE_CHECKING:
    from pipeline.config import RunConfig

TIMING_KEYS = ("first_step_start", "steps_s")  # train's clock readings: timing, not results
PROGRESS_KEY = "progress_report"  # set on the light reports between evaluations (step, tokens/s, loss)


def worker_config(cfg: RunConfig, uri: str | None, parent_run_id: str | None) -> RunConfig:
    """`cfg` as Ray workers need it: paths made absolute (workers do not share the driver's working
    directory) and, when tracking, the store and the parent run its MLflow run nests under."""
    from pipeline.data.prepare import cache_root

    data = dataclasses.replace(cfg.data, cache_dir=str(Path(cache_root(cfg.data)).resolve()))
    train = dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir).resolve()))
    tracking = dataclasses.replace(cfg.tracking, uri=uri, parent_run_id=parent_run_id) if uri else cfg.tracking
    return dataclasses.replace(cfg, data=data, train=train, tracking=tracking)


def _scalars(metrics: dict) -> dict:
    """The finite numbers in `metrics`: what Tune can show and compare."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out


_LOADED = time.time()
_trials_here = 0    # trials this process has begun: a reused trial process starts a trial at once


def _process_start() -> float:
    """When this process was created (Linux: from /proc), else when this module was imported."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _LOADED


def _last_step(out_dir: Path) -> int | None:
    """The step of the last line of the run's metrics.jsonl (rank 0 writes one per step): how far the
    latest attempt got. None without one."""
    from pipeline.train.loop import METRICS_FILE

    path = out_dir / METRICS_FILE
    if not path.is_file():
        return None
    with open(path, "rb") as f:
        f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))   # the tail holds the last complete line
        for line in reversed(f.read().splitlines()):
            try:
                return int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                continue   # a torn last line, or the cut first one
    return None


def _resume_step(out_dir: Path) -> int:
    """The step of the run's newest sealed checkpoint (its manifest written), read without hashing its
    files: where `train` resumes, unless that checkpoint fails verification (then an older one)."""
    from pipeline.checkpoints import MANIFEST, checkpoint_root

    steps = [int(p.parent.name.removeprefix("step_")) for p in checkpoint_root(out_dir).glob(f"step_*/{MANIFEST}")
             if p.parent.name.removeprefix("step_").isdigit()]
    return max(steps, default=0)


def _node() -> dict:
    """This process's Ray node: its id and IP address."""
    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "node_ip": ray.util.get_node_ip_address()}


def _close_dead_attempt(out_dir: Path, run: str) -> None:
    """When the previous attempt's process died (killed, out of memory, its node lost, the driver
    interrupted) it wrote no end record: write one now, as failed, so the attempt records list every
    attempt. It ended at its last sign of life: its last step's line in metrics.jsonl, else its "train"
    record."""
    from pipeline.train.loop import METRICS_FILE

    records = read_attempts(out_dir)
    if records and records[-1]["event"] == "train" and "attempt_start" in records[-1]:
        last = records[-1]["time"]
        metrics = out_dir / METRICS_FILE
        if metrics.is_file():
            last = max(last, metrics.stat().st_mtime)
        append_line(out_dir / ATTEMPTS_FILE, {"event": "attempt", "run": run, "start": records[-1]["attempt_start"],
                                               "end": last, "status": "failed", "died": True,
                                               "last_step": _last_step(out_dir)})


def _train_and_report(cfg: RunConfig, report: Callable[[dict], None], rank: int, world: int,
                      attempt_start: float | None = None) -> None:
    """`train(cfg)` with its progress and evaluations passed to `report` (Ray Train's or Tune's), the
    attempt's "train" record written first and the run's done marker last (rank 0).

    `report` may be a barrier across workers (`ray.train.report`): train calls `on_step` and `on_eval`
    on every rank at the same steps."""
    from pipeline.train.loop import train

    out_dir = Path(cfg.train.out_dir)
    loop_start = time.time()
    node = _node()
    nodes = [node["node_id"]]
    if world > 1:   # every rank's node, for where the workers ran (Ray Train set up the process group)
        import torch.distributed as dist

        nodes = [None] * world
        dist.all_gather_object(nodes, node["node_id"])
    if rank == 0:
        # The process of this attempt: where an operator (or a test) finds it to inspect or stop it.
        record = {"event": "train", "run": cfg.name, "time": loop_start, "pid": os.getpid(),
                  "host": socket.gethostname(), "workers": world, **node, "nodes": nodes,
                  "resume_step": _resume_step(out_dir)}
        if attempt_start is not None:
            record["attempt_start"] = attempt_start  # an attempt whose process dies writes no end record
        append_line(out_dir / ATTEMPTS_FILE, record)

    def on_step(step: int, metrics: dict) -> None:
        report({**_scalars(metrics), "step": int(step), PROGRESS_KEY: 1})

    def on_eval(step: int, metrics: dict, checkpoint: str | None) -> None:
        report({**_scalars(metrics), "step": int(step)})

    result = dict(train(cfg, on_eval=on_eval, on_step=on_step) or {})
    if schema.M_VAL_LOSS not in _scalars(result):
        # never a done marker or a "finished" report without the evaluation a search or report ranks by
        raise RuntimeError(f"run {cfg.name!r} returned at step {result.get('step')} without a finite "
                           f"{schema.M_VAL_LOSS}; not marking it done")
    timing = {key: result.pop(key, None) for key in TIMING_KEYS}
    if rank == 0:
        record = {"run": cfg.name, "result": _scalars(result), "loop_start": loop_start,
                  "loop_end": time.time(), "steps_s": timing["steps_s"] or 0.0,
                  "first_step_start": timing["first_step_start"]}
        tmp = out_dir / (DONE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_dir / DONE_FILE)  # atomic: a reader never sees half a marker
    report({**_scalars(result), "run_finished": 1})  # "done" would make Tune stop the trial early


def train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker of a run of 2+ workers: `train(cfg)` reporting to `ray.train.report`
    (a barrier across workers; Tune keeps rank 0's metrics)."""
    import ray.train

    context = ray.train.get_context()
    _train_and_report(loop_config["run"], ray.train.report, context.get_world_rank(), context.get_world_size(),
                      loop_config.get("attempt_start"))


def run_trial(trial_config: dict, *, runs: dict, workers: int, cpus_per_worker: float, gpus_per_worker: float,
              storage_path: str, placement: str = "PACK") -> None:
    """A Tune trial: one run of the study, in this process when it has one worker, else on a
    `TorchTrainer` whose workers Ray places by `placement` (cluster.PLACEMENTS); raising (or dying) makes
    Tune retry it."""
    global _trials_here
    cfg = runs[trial_config["run"]]
    out_dir = Path(cfg.train.out_dir)
    _close_dead_attempt(out_dir, cfg.name)
    # A trial's start-up includes the start of its process (Python, Ray, torch, DeepSpeed and MLflow
    # imports) when it is the process's first trial; Tune reuses the process for later trials.
    start = _process_start() if _trials_here == 0 else time.time()
    _trials_here += 1
    attempt = {"event": "attempt", "run": cfg.name, "start": start}
    try:
        if workers == 1:
            from ray import tune

            _train_and_report(cfg, tune.report, rank=0, world=1, attempt_start=attempt["start"])
        else:
            _fit_torch_trainer(cfg, workers, cpus_per_worker, gpus_per_worker, storage_path, attempt["start"],
                               placement)
        attempt["status"] = "finished"
    except BaseException:
        attempt["status"] = "failed"
        raise
    finally:
        attempt["end"] = time.time()
        attempt["last_step"] = _last_step(out_dir)
        append_line(out_dir / ATTEMPTS_FILE, attempt)


def _fit_torch_trainer(cfg: RunConfig, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                       storage_path: str, attempt_start: float, placement: str) -> None:
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg, "attempt_start": attempt_start},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources, placement_strategy=placement),
        # Named by the run, not by Tune's trial id, so a restarted driver finds the same Train run.
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=storage_path,
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    trainer.fit()
