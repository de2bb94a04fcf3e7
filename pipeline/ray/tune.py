"""Ray Tune for studies and searches: the one Tuner builder, the trainables and the study's progress callback
(a search's Tune `Searcher` is in searcher.py)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import schema
from pipeline.runs.resources import Resources, trainable_resources
from pipeline.ray.trainer import run_trial


@dataclass(frozen=True)
class TuneRun:
    """One Tune experiment: `trainable` run as trials (with `params` bound), each holding `resources`, saved
    under `storage/<name>-<time>`; one trial per point of `grid` (key -> values) over the fixed
    `param_space`, or as many as `search_alg` hands out (`num_samples`, -1 for no end), at most `slots` at a
    time; `trial_name(config)` names a trial and its folder under `storage`; `callbacks` go to Tune."""

    trainable: Callable
    resources: Resources
    storage: Path
    name: str
    param_space: dict | None = None
    grid: dict[str, list] | None = None
    slots: int | None = None
    search_alg: object = None
    num_samples: int = 1
    trial_name: Callable[[dict], str] | None = None
    callbacks: list | None = None
    params: dict = field(default_factory=dict)


def fit(run: TuneRun) -> list[dict]:
    """Run `build_tuner(run)`; returns the configs of the trials that failed after `run.resources.max_failures`
    retries. DeepSpeed's C++ op is built here, once, before any trial."""
    from pipeline.train.engine import build_deepspeed_ops

    build_deepspeed_ops()
    return [result.config for result in build_tuner(run).fit() if result.error is not None]


def build_tuner(run: TuneRun):
    """The Tuner running `run`'s trials. Its experiment folder is `run.storage/<run.name>-<time>`, where Tune
    saves its state (`tune.Tuner.restore` reads it).

    A one-worker trial trains inside the trainable, which holds the worker's resources; a trial of 2+
    workers waits on its own TorchTrainer and holds almost nothing (`cluster.trainable_resources`).
    Trial processes are reused from one trial to the next, so torch and DeepSpeed are imported once per
    process."""
    from ray import tune

    trainable = bound_trainable(run)
    tune_config = {"search_alg": run.search_alg, "num_samples": run.num_samples, "reuse_actors": True}
    if run.slots is not None:
        tune_config["max_concurrent_trials"] = run.slots
    if run.trial_name is not None:
        trial_name = run.trial_name   # what Tune pickles: the naming function alone, not the whole run
        tune_config.update(trial_name_creator=lambda t: trial_name(t.config),
                           trial_dirname_creator=lambda t: trial_name(t.config))
    return tune.Tuner(
        trainable,
        param_space={**(run.param_space or {}), **{k: tune.grid_search(v) for k, v in (run.grid or {}).items()}},
        tune_config=tune.TuneConfig(**tune_config),
        run_config=tune.RunConfig(name=f"{run.name}-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(run.storage),
                                  verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=run.resources.max_failures),
                                  callbacks=run.callbacks),
    )


def bound_trainable(run: TuneRun):
    """`run.trainable` as the Tuner runs it: `run.params`, the worker layout and `run.storage` bound, the
    trial's resources attached (what `tune.Tuner.restore` takes again)."""
    from ray import tune

    resources = run.resources
    trainable = tune.with_parameters(run.trainable, workers=resources.workers,
                                     cpus_per_worker=resources.cpus_per_worker,
                                     gpus_per_worker=resources.gpus_per_worker, storage_path=str(run.storage),
                                     placement=resources.placement, **run.params)
    return tune.with_resources(trainable, trainable_resources(resources))


def search_trial(trial_config: dict, *, workers: int, cpus_per_worker: float, gpus_per_worker: float,
                 storage_path: str, placement: str = "PACK") -> None:
    """The Tune trainable of one search trial: `run_trial` on the run config the trial carries."""
    from pipeline.config import run_config_from_dict

    cfg = run_config_from_dict(trial_config["run_config"])
    run_trial({"run": cfg.name}, runs={cfg.name: cfg}, workers=workers, cpus_per_worker=cpus_per_worker,
              gpus_per_worker=gpus_per_worker, storage_path=storage_path, placement=placement)


def study_progress(study: str, runs: dict[str, tuple[int, float]], interval: float = 30.0):
    """A Tune callback drawing the study's `ProgressBoard` on stderr: one line per running trial (step,
    tokens/s, latest val/loss, ETA) under an overall line counting finished runs (name -> (steps, work)
    in `runs`); plain lines every `interval` seconds when stderr is not a terminal."""
    from ray import tune

    from pipeline.runs.progress import ProgressBoard

    class Progress(tune.Callback):
        def __init__(self):
            self.board = ProgressBoard(study, runs, sys.stderr, interval=interval)

        def on_trial_start(self, iteration, trials, trial, **info):
            self.board.started(trial.config["run"])

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self.board.update(trial.config["run"], result)

        def on_step_end(self, iteration, trials, **info):
            self.board.refresh()  # the elapsed time and periodic lines also move while no trial reports

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.board.finished(trial.config["run"], ok=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.board.retried(trial.config["run"])

        def on_trial_error(self, iteration, trials, trial, **info):
            self.board.finished(trial.config["run"], ok=False)

        def on_experiment_end(self, trials, **info):
            self.board.close()

    return Progress()
