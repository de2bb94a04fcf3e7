"""Runs `pipeline.train.loop.train` inside Ray Train workers and forwards its evaluations to Ray Train (and Tune).

The training loop knows nothing of Ray: this module is the only place where the two meet. A Tune trial
is `run_trial`, which builds a `TorchTrainer` of `resources.workers` workers; each worker calls `train`,
which joins the process group Ray Train already set up and resumes from the last DeepSpeed checkpoint
in the run's out_dir, so a retried trial continues where the failed attempt stopped.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline import schema

if TYPE_CHECKING:
    from pipeline.config import RunConfig

DONE_FILE = "study_done.json"       # written by rank 0 after `train` returned: the run is finished
ATTEMPTS_FILE = "study_attempts.jsonl"  # per trial attempt: a "train" line when rank 0 calls train (its
                                        # pid and host) and an "attempt" line when the attempt ends
TIMING_KEYS = ("first_step_start", "steps_s")  # train's clock readings: timing, not results


def worker_config(cfg: RunConfig, uri: str | None, parent_run_id: str | None) -> RunConfig:
    """`cfg` as Ray workers need it: paths made absolute (workers do not share the driver's working
    directory) and, when tracking, the store and the parent run its MLflow run nests under."""
    from pipeline.data.prepare import cache_root

    data = dataclasses.replace(cfg.data, cache_dir=str(Path(cache_root(cfg.data)).resolve()))
    train = dataclasses.replace(cfg.train, out_dir=str(Path(cfg.train.out_dir).resolve()))
    tracking = dataclasses.replace(cfg.tracking, uri=uri, parent_run_id=parent_run_id) if uri else cfg.tracking
    return dataclasses.replace(cfg, data=data, train=train, tracking=tracking)


def read_attempts(out_dir: Path) -> list[dict]:
    """The lines of a run's attempts file, oldest first: "train" events (rank 0 started training: time,
    pid, host) and "attempt" events (a trial attempt ended: start, end, status)."""
    path = Path(out_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # lines written before events were named are attempts
    return [{"event": "attempt", **r} if "event" not in r else r for r in records]


def done_record(out_dir: Path) -> dict | None:
    """What rank 0 wrote when `train` returned (result, loop times, step seconds); None if unfinished."""
    path = Path(out_dir) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def is_done(out_dir: Path) -> bool:
    return (Path(out_dir) / DONE_FILE).is_file()


def _scalars(metrics: dict) -> dict:
    """The finite numbers in `metrics`: what Tune can show and compare."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[key] = value
    return out


def _append_line(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # O_APPEND: concurrent writers of one short line do not interleave
        f.write(json.dumps(record) + "\n")


def train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: `train(cfg)` with evaluations forwarded to `ray.train.report`.

    `ray.train.report` is a barrier across workers; train calls `on_eval` on every rank after each
    evaluation, so every evaluation is forwarded as it happens (Tune keeps rank 0's metrics)."""
    import ray.train

    from pipeline.train.loop import train

    cfg = loop_config["run"]
    rank = ray.train.get_context().get_world_rank()
    out_dir = Path(cfg.train.out_dir)
    loop_start = time.time()
    if rank == 0:
        # The process of this attempt: where an operator (or a test) finds it to inspect or stop it.
        _append_line(out_dir / ATTEMPTS_FILE, {"event": "train", "run": cfg.name, "time": loop_start,
                                               "pid": os.getpid(), "host": socket.gethostname()})

    def on_eval(step: int, metrics: dict, checkpoint: str | None) -> None:
        ray.train.report({**_scalars(metrics), "step": int(step)})

    result = dict(train(cfg, on_eval=on_eval) or {})
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
    ray.train.report({**_scalars(result), "run_finished": 1})  # "done" would make Tune stop the trial early


def run_trial(trial_config: dict, *, runs: dict, workers: int, cpus_per_worker: float, gpus_per_worker: float,
              storage_path: str) -> None:
    """A Tune trial: one run of the study on a `TorchTrainer`; raising makes Tune retry it."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = runs[trial_config["run"]]
    attempt = {"event": "attempt", "run": cfg.name, "start": time.time()}
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker > 0:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"run": cfg},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                               resources_per_worker=resources),
        # Named by the run, not by Tune's trial id, so a restarted driver finds the same Train run.
        run_config=ray.train.RunConfig(name=cfg.name, storage_path=storage_path,
                                       callbacks=[TuneReportCallback()],
                                       failure_config=ray.train.FailureConfig(max_failures=0)),
    )
    try:
        trainer.fit()
        attempt["status"] = "finished"
    except BaseException:
        attempt["status"] = "failed"
        raise
    finally:
        attempt["end"] = time.time()
        _append_line(Path(cfg.train.out_dir) / ATTEMPTS_FILE, attempt)
