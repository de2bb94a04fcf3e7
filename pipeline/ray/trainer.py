"""Runs `pipeline.train.loop.train` inside Ray Train workers and forwards its evaluations to Ray Train (and Tune).

The training loop knows nothing of Ray: this module is the only place where the two meet. A Tune trial
is `run_trial`, which builds a `TorchTrainer` of `resources.workers` workers; each worker calls `train`,
which joins the process group Ray Train already set up and resumes from the last DeepSpeed checkpoint
in the run's out_dir, so a retried trial continues where the failed attempt stopped.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

from pipeline import schema

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


class _FirstStepWatch:
    """Notes when the first training step of this attempt ends: when train's per-step metrics file grows.

    `train` keeps no clock of its own start-up; this tells start-up (workers, process group, data,
    DeepSpeed) apart from training without touching the loop."""

    def __init__(self, path: Path):
        self.path, self.size = path, path.stat().st_size if path.exists() else 0
        self.first_step_end: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            if self.path.exists() and self.path.stat().st_size > self.size:
                self.first_step_end = time.time()
                return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def step_seconds(metrics_file: Path, tokens_per_step: int, since_line: int = 0) -> tuple[float, float, int]:
    """(seconds inside training steps, first step's seconds, lines) from train's per-step metrics file.

    train logs each step's throughput measured around forward, backward and optimizer step only."""
    if not metrics_file.is_file():
        return 0.0, float("nan"), 0
    lines = metrics_file.read_text().splitlines()
    times = [tokens_per_step / json.loads(line)[schema.M_TOKENS_PER_S] for line in lines[since_line:] if line]
    return sum(times), (times[0] if times else float("nan")), len(lines)


def train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: `train(cfg)` with evaluations forwarded to `ray.train.report`.

    `ray.train.report` is a barrier across workers; train calls `on_eval` on every rank after each
    evaluation, so every evaluation is forwarded as it happens (Tune keeps rank 0's metrics)."""
    import ray.train

    from pipeline.train.loop import METRICS_FILE, train

    cfg = loop_config["run"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    out_dir = Path(cfg.train.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pid_file(out_dir, rank).write_text(str(os.getpid()))
    metrics_file = out_dir / METRICS_FILE
    lines_before = step_seconds(metrics_file, 1)[2]
    watch = _FirstStepWatch(metrics_file) if rank == 0 else None
    if rank == 0:
        _append_line(out_dir.parent / STARTED_LOG, {"run": cfg.name, "pid": os.getpid(), "time": time.time()})

    def on_eval(step: int, metrics: dict, checkpoint: str | None) -> None:
        ray.train.report({**_scalars(metrics), "step": int(step)})

    loop_start = time.time()
    try:
        result = train(cfg, on_eval=on_eval)
    finally:
        if watch is not None:
            watch.stop()
    if rank == 0:
        tokens_per_step = cfg.tokens_per_step(world)
        steps_s, first_step_s, _ = step_seconds(metrics_file, tokens_per_step, lines_before)
        first_start = watch.first_step_end - first_step_s if watch.first_step_end else None
        record = {"run": cfg.name, "result": _scalars(result or {}), "loop_start": loop_start,
                  "loop_end": time.time(), "steps_s": steps_s, "first_step_start": first_start}
        tmp = out_dir / (DONE_FILE + ".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        os.replace(tmp, out_dir / DONE_FILE)  # atomic: a reader never sees half a marker
    ray.train.report({**_scalars(result or {}), "run_finished": 1})  # "done" would make Tune stop the trial early


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
