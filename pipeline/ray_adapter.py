"""Runs `pipeline.train.train` inside Ray Train workers and forwards its evaluations to Ray Train (and Tune).

The training loop knows nothing of Ray: this module is the only place where the two meet. A Tune trial
is `run_trial`, which builds a `TorchTrainer` of `resources.workers` workers; each worker calls `train`,
which joins the process group Ray Train already set up and resumes from the last DeepSpeed checkpoint
in the run's out_dir, so a retried trial continues where the failed attempt stopped.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

DONE_FILE = "study_done.json"       # written by rank 0 after `train` returned: the run is finished
ATTEMPTS_FILE = "study_attempts.jsonl"  # one line per trial attempt: when it started and ended
STARTED_LOG = "started.log"         # one line per call of `train`, in the study folder (tests count them)


def pid_file(out_dir: Path, rank: int) -> Path:
    """Where worker `rank` writes its PID, so a test (or an operator) can find the process of a run."""
    return Path(out_dir) / f"worker{rank}.pid"


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

    `ray.train.report` is a barrier across workers, so every rank reports at each evaluation; only
    rank 0's metrics reach Tune (TuneReportCallback forwards the first worker's)."""
    import ray.train

    from .train import train

    cfg = loop_config["run"]
    rank = ray.train.get_context().get_world_rank()
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pid_file(out_dir, rank).write_text(str(os.getpid()))
    if rank == 0:
        _append_line(out_dir.parent / STARTED_LOG, {"run": cfg.name, "pid": os.getpid(), "time": time.time()})

    def on_eval(step: int, metrics: dict) -> None:
        ray.train.report({**_scalars(metrics), "step": int(step)})

    loop_start = time.time()
    result = train(cfg, on_eval=on_eval)
    loop_end = time.time()
    if rank == 0:
        record = {"run": cfg.name, "result": _scalars(result or {}), "loop_start": loop_start,
                  "loop_end": loop_end}
        tmp = out_dir / (DONE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_dir / DONE_FILE)  # atomic: a reader never sees half a marker
    ray.train.report({**_scalars(result or {}), "done": 1})


def run_trial(trial_config: dict, *, runs: dict, workers: int, cpus_per_worker: float, gpus_per_worker: float,
              storage_path: str) -> None:
    """A Tune trial: one run of the study on a `TorchTrainer`; raising makes Tune retry it."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg = runs[trial_config["run"]]
    attempt = {"run": cfg.name, "start": time.time()}
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
