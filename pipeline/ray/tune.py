"""Ray Tune for studies and searches: the one Tuner builder, the trainables and the callback that draws a
study's progress board (a search's Tune `Searcher` is in searcher.py)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.runs.progress import ProgressBoard
from pipeline.runs.resources import Resources, trainable_resources
from pipeline.ray.trainer import run_trial


@dataclass(frozen=True)
class TuneRun:
    """One Tune experiment: `trainable` run as trials (with `params` bound), each holding `resources`, saved
    under `storage/<name>-<time>`; one trial per point of `grid` (key -> values) over the fixed
    `param_space`, or as many as `search_alg` hands out (`num_samples`, -1 for no end), at most `slots` at a
    time; `trial_name(config)` names a trial and its folder under `storage`, and its line on `progress`, the
    board each trial's start, reports and end are drawn on."""

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
    progress: ProgressBoard | None = None
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.progress is not None and self.trial_name is None:
            raise ValueError("TuneRun: a progress board draws each trial under its name; give trial_name too")


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

    callbacks = [_progress_callback(run.progress, run.trial_name)] if run.progress is not None else None
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
                                  callbacks=callbacks),
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


def _progress_callback(board: ProgressBoard, trial_name: Callable[[dict], str]):
    """The Tune callback that draws `board`: a trial's start, reports, retries and end, under the name
    `trial_name(config)` gives it."""
    from ray import tune

    class Progress(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            board.started(trial_name(trial.config))

        def on_trial_result(self, iteration, trials, trial, result, **info):
            board.reported(trial_name(trial.config), result)

        def on_step_end(self, iteration, trials, **info):
            board.refresh()  # the elapsed time and periodic lines also move while no trial reports

        def on_trial_complete(self, iteration, trials, trial, **info):
            board.finished(trial_name(trial.config), ok=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            board.retried(trial_name(trial.config))

        def on_trial_error(self, iteration, trials, trial, **info):
            board.finished(trial_name(trial.config), ok=False)

        def on_experiment_end(self, trials, **info):
            board.close()

    return Progress()
