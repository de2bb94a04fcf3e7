"""Optuna ask/tell for the trials of a search, in plain Optuna: the scheduler (Ray Tune, through
`pipeline.ray.searcher.OptunaSearcher`) calls `suggest` whenever a trial slot is free and `on_trial_complete`
when a trial ends.

`suggest` asks Optuna (which hands out queued retries first) and returns the run config of that trial;
`on_trial_complete` tells Optuna its objectives (or FAIL). Both run in the driver, so the Optuna storage
has one writer, as SQLite requires.

Why not Ray's `OptunaSearch`: it keeps its own view of the study and restores from Tune's experiment
checkpoint, so after a killed driver the Optuna storage and Tune's state disagree (RUNNING trials
orphaned, completed ones re-asked). Here the Optuna storage is the only state: resume is reading it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import warnings

import optuna
from optuna.trial import TrialState

from pipeline import schema
from pipeline.loader import to_dict
from pipeline.search.results import constraint_values, cost_values, objective_values
from pipeline.search.space import SearchConfig, suggest, trial_name
from pipeline.search.store import (CONSTRAINTS_ATTR, COPY_OF_ATTR, HEARTBEAT_INTERVAL_S, REFERENCE_ATTR,
                                   RETRY_OF_ATTR, RUN_NAME_ATTR, beat, claim, completed_trials)

log = logging.getLogger(__name__)

MAX_COPIES_PER_SUGGEST = 20


class OptunaAskTell:
    """Suggests Optuna trials until the study holds `search.n_trials` completed trials.

    `suggest(trial_id)` returns a trial's config ({"run_config": ..., "optuna_trial": number}), None when
    no trial is wanted now (enough in flight), or FINISHED when the search is done.

    `make_config(params, run_name, number)` returns the (absolute, tracked) RunConfig of a trial;
    `before_tell(trial)` runs while the trial can still take user attrs (MLflow run id and tag);
    `after_tell(number, state)` after each tell (progress bar);
    `saved_result(cfg)` is the result of the run `cfg` when that run already finished (else None): such a
    trial is told that result and never trained again."""

    FINISHED = "FINISHED"   # what `suggest` returns once the search is done (the value Tune uses, too)

    def __init__(self, search: SearchConfig, study: optuna.Study, make_config, before_tell=None,
                 after_tell=None, saved_result=None):
        self.search, self.study = search, study
        self.make_config, self.before_tell, self.after_tell = make_config, before_tell, after_tell
        self.saved_result = saved_result
        self.live: dict[str, optuna.Trial] = {}     # scheduler (Tune) trial id -> Optuna trial
        self.failed: list[int] = []
        self.done = len(completed_trials(study))

    def _finished(self) -> bool:
        return self.done >= self.search.n_trials or len(self.failed) > self.search.max_failed_trials

    def suggest(self, trial_id: str):
        for _ in range(MAX_COPIES_PER_SUGGEST):
            if self._finished():
                return self.FINISHED
            if self.done + len(self.live) >= self.search.n_trials:
                return None  # enough trials in flight; one may still fail and need a replacement
            with warnings.catch_warnings():  # "heartbeats are meant for Study.optimize": here ask/tell beats
                warnings.simplefilter("ignore", UserWarning)
                trial = self.study.ask()
            claim(self.study, trial)
            params = suggest(trial, self.search.space)
            if self._tell_copy(trial, params):
                continue
            run_name = trial.user_attrs.get(RUN_NAME_ATTR) or trial_name(self.search, trial.number)
            trial.set_user_attr(RUN_NAME_ATTR, run_name)
            cfg = self.make_config(params, run_name, trial.number)
            # A retry whose run finished before its driver could tell it (killed in between): told, not retrained.
            if trial.user_attrs.get(RETRY_OF_ATTR) is not None and self._tell_saved(trial, cfg):
                continue
            self.live[trial_id] = trial
            retry = trial.user_attrs.get(RETRY_OF_ATTR)
            log.info("trial %d: %s%s", trial.number, params, f" (retry of {retry})" if retry is not None else "")
            return {"run_config": to_dict(cfg), "optuna_trial": trial.number}
        return None

    def _tell_copy(self, trial: optuna.Trial, params: dict) -> bool:
        """Samplers revisit points of small discrete spaces; training is seeded, so reuse the result."""
        if trial.user_attrs.get(RETRY_OF_ATTR) is not None:
            return False
        for done in completed_trials(self.study):
            if done.params == params and COPY_OF_ATTR not in done.user_attrs:
                trial.set_user_attr(COPY_OF_ATTR, done.number)
                trial.set_user_attr(CONSTRAINTS_ATTR, done.user_attrs.get(CONSTRAINTS_ATTR, []))
                trial.set_user_attr(RUN_NAME_ATTR, done.user_attrs.get(RUN_NAME_ATTR))
                self.study.tell(trial, list(done.values))
                self.done += 1  # a completed trial like any other: it counts toward n_trials
                self._told(trial.number, TrialState.COMPLETE)
                return True
        return False

    def _tell_saved(self, trial: optuna.Trial, cfg) -> bool:
        result = self.saved_result(cfg) if self.saved_result is not None else None
        if result is None:
            return False
        log.warning("trial %d: run %s had finished; told from its saved result, not trained again",
                    trial.number, cfg.name)
        self._tell(trial, result)
        return True

    def tell_finished(self, frozen) -> bool:
        """For a stale trial (a FrozenTrial left RUNNING by a stopped driver): tell it its run's saved
        result when that run finished; False when it did not."""
        run_name = frozen.user_attrs.get(RUN_NAME_ATTR)
        if not run_name:
            return False
        return self._tell_saved(optuna.Trial(self.study, frozen._trial_id),
                                self.make_config(frozen.params, run_name, frozen.number))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        trial = self.live.pop(trial_id, None)
        if trial is None:
            return
        self._tell(trial, result, error)

    @contextlib.contextmanager
    def heartbeats(self, interval_s: float = HEARTBEAT_INTERVAL_S):
        """A thread recording a heartbeat for every live trial each `interval_s`, for the body."""
        stop = threading.Event()

        def run():
            while not stop.wait(interval_s):
                try:
                    beat(self.study, list(self.live.values()))
                except Exception as error:  # a missed beat is retried; the grace period covers several
                    log.warning("could not record trial heartbeats: %s", error)

        thread = threading.Thread(target=run, name="optuna-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _tell(self, trial: optuna.Trial, result: dict | None, error: bool = False) -> None:
        metrics = dict(result or {})
        if not error:
            try:
                cfg = self.make_config(trial.params, trial.user_attrs[RUN_NAME_ATTR], trial.number)
                metrics.update(cost_values(cfg.model, self.search.objectives.context, cfg.train.precision))
                values = objective_values(self.search, metrics)
                reference = self.study.user_attrs.get(REFERENCE_ATTR)
                trial.set_user_attr(CONSTRAINTS_ATTR, constraint_values(self.search, metrics, reference))
                for key in (schema.M_VAL_LOSS, schema.M_VAL_PPL, schema.M_VAL_BPB):
                    if key in metrics:
                        trial.set_user_attr(key, float(metrics[key]))
            except ValueError as exc:
                log.error("trial %d: %s", trial.number, exc)
                error = True
        if self.before_tell is not None:
            self.before_tell(trial)
        if error:
            self.study.tell(trial, state=TrialState.FAIL)
            self.failed.append(trial.number)
            self._told(trial.number, TrialState.FAIL)
            return
        self.study.tell(trial, values)
        self.done += 1
        self._told(trial.number, TrialState.COMPLETE)

    def _told(self, number: int, state: TrialState) -> None:
        if self.after_tell is not None:
            self.after_tell(number, state)


def progress_bar(search: SearchConfig, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=search.n_trials, initial=min(initial, search.n_trials), desc=f"search {search.name}",
                unit="trial", file=sys.stderr, dynamic_ncols=True, disable=not search.progress)

