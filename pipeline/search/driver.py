"""`run_search`: a search file -> an Optuna study (SQLite or PostgreSQL) -> Ray Tune trials -> Pareto front.

The whole search is validated before any trial. One driver at a time holds the study (a lease, see
pipeline/runs/lease.py). The Optuna storage is the search's only state: running the same command again
loads the same study, keeps its completed trials, tells a trial a stopped driver left RUNNING the saved
result of its run when that run finished, else marks it FAIL and queues its parameters again (stale by
heartbeat, see search/store.py), and asks only for the trials still missing.
Results: pareto.csv, pareto.json and pareto.png in `out_dir/name` (format in search/results.py), also
logged on the search's MLflow parent run; `optuna-dashboard STORAGE_URL` shows the study live.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

from pipeline import schema
from pipeline.data.prepare import cache_root
from pipeline.ray import cluster
from pipeline.runs import lease
from pipeline.runs.outputs import output_folders, output_root, tracking_uri
from pipeline.ray.trainer import worker_config
from pipeline.runs.markers import done_record
from pipeline.preflight import validating
from pipeline.search.checks import check_search
from pipeline.search.results import MLFLOW_RUN_ATTR, export_front
from pipeline.search.space import (STORAGE_ENV, SearchConfig, base_run_config, load_search, param_names,
                                   reference_run_config, search_from_dict, trial_run_config)
from pipeline.search.store import (PARENT_ATTR, REFERENCE_ATTR, completed_trials, normalise_storage_url, open_study,
                                   recover_stale_trials, redact)
from pipeline.tracking.parent import ParentRun, parent_run, run_journals

log = logging.getLogger(__name__)

SEARCH_ROLE = "search"        # value of schema.TAG_ROLE on the search's parent MLflow run
REFERENCE_ROLE = "reference"  # ... and on its transformer reference run
FRONT_FILES = ("pareto.json", "pareto.csv", "pareto.png")
JOURNAL_DIR = "tracking"      # in the search folder: the driver's MLflow calls that waited out an outage


def run_search(config_path: str | Path, overrides: list[str] | None = None, address: str | None = None,
               yes: bool = False) -> dict:
    """Run (or continue) the search until its study holds `n_trials` completed trials; export the front.
    Everything about the input is checked first (pipeline/search/checks.py); `yes` starts a search that
    needs more than a day here."""
    wall_start = time.perf_counter()
    with validating(f"search file {str(config_path)!r}"):
        search = load_search(config_path, overrides)
        url = normalise_storage_url(search.storage_url())
        address = cluster.resolve_address(address, search.address)
        check_search(search, local=not address, yes=yes)
    # One driver per study: a second one would take this one's running trials for stale.
    with lease.search_lease(url, search.name, search.folder, redact(url)):
        return _search(search, url, address, wall_start)


def _search(search: SearchConfig, url: str, address: str | None, wall_start: float) -> dict:
    study = open_study(search, url)
    base = base_run_config(search)
    uri = tracking_uri(base.tracking.uri) if base.tracking.enabled else None
    done_before = len(completed_trials(study))
    failed, parent, retried = [], None, []
    if done_before < search.n_trials:
        failed, parent, retried = _run_on_ray(search, study, url, uri, address)
    else:
        retried = recover_stale_trials(study, param_names(search.space))
    trials = completed_trials(study)
    record = export_front(search, study, trials, url, search.folder)
    if parent is not None:
        parent.log_artifacts([search.folder / name for name in FRONT_FILES], artifact_path="search")
    log.warning("search %s: %d/%d trials complete, %d on the Pareto front; dashboard: optuna-dashboard %s",
                search.name, len(trials), search.n_trials, len(record["front"]), redact(url))
    return {"search": search.name, "storage": redact(url), "n_trials": search.n_trials,
            "complete": len(trials), "complete_before": done_before, "retried": retried, "failed": failed,
            "pareto": record["front"], "folder": str(search.folder.resolve()),
            "parent_run_id": parent.run_id if parent else None, "tracking_uri": uri,
            # a search run again once complete opens no parent: the one it had is in the study's attrs
            "mlflow_ui": (parent or ParentRun(uri, search.name, study.user_attrs.get(PARENT_ATTR))).ui_links(),
            "wall_s": time.perf_counter() - wall_start,
            "outputs": {"home": str(output_root() or ""), "folder": str(search.folder), "storage": redact(url),
                        "tracking_uri": uri}}


def _run_on_ray(search: SearchConfig, study, url: str, uri: str | None,
                address: str | None) -> tuple[list[int], ParentRun, list[int]]:
    # The parent run's id is kept in the study's user attrs, so a resumed search reuses it.
    tags = {schema.TAG_STUDY: search.name, schema.TAG_ROLE: SEARCH_ROLE}
    shared = output_folders(search.folder.resolve(), cache_root(base_run_config(search).data).resolve(), uri)
    with (run_journals(search.folder.resolve(), uri),
          cluster.ray_session(cluster.resolve_address(address, search.address), search.resources, shared) as session,
          parent_run(uri, search.name, tags, run_id=study.user_attrs.get(PARENT_ATTR), find=False,
                     journal_dir=search.folder.resolve() / JOURNAL_DIR) as parent):
        if parent.run_id:
            study.set_user_attr(PARENT_ATTR, parent.run_id)
        from pipeline.search.searcher import progress_bar

        bar = progress_bar(search, len(completed_trials(study)))
        ask_tell = _ask_tell(search, study, uri, parent, bar)
        # Stale trials whose run finished are told its saved result here, never trained again.
        retried = recover_stale_trials(study, param_names(search.space), finished=ask_tell.tell_finished)
        base = base_run_config(search)
        from pipeline.data.prepare import prepare

        prepare(base.data, base.model.max_seq_len)  # once in the driver, not once per trial
        if search.constraints.max_ppl_gap is not None and REFERENCE_ATTR not in study.user_attrs:
            study.set_user_attr(REFERENCE_ATTR, _train_reference(search, uri, parent))
        failed = _tune(search, tune_searcher(search, url, uri, parent, ask_tell), bar, session.slots)
        parent.failed = bool(failed)
    return failed, parent, retried


def _ask_tell(search: SearchConfig, study, uri: str | None, parent: ParentRun, bar=None):
    """The search's ask/tell: trial configs tracked under `parent`, finished runs told from their saved
    result, each tell written to the progress `bar` when there is one."""
    from pipeline.search.searcher import OptunaAskTell

    def make_config(params: dict, run_name: str, number: int):
        return worker_config(trial_run_config(search, params, number, run_name=run_name), uri, parent.run_id)

    def saved_result(cfg) -> dict | None:
        """A finished run's result: its done marker, else its FINISHED MLflow run under the parent."""
        done = done_record(cfg.train.out_dir)
        return done["result"] if done is not None else parent.finished_child(cfg.name)

    def before_tell(trial) -> None:
        run_id = parent.tag_child(trial.user_attrs.get("run_name"), {schema.TAG_OPTUNA_TRIAL: str(trial.number)})
        if run_id:
            trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)

    def after_tell(number: int, state) -> None:
        bar.write(f"  trial {number}: {state.name.lower()}")
        if state.name == "COMPLETE":
            bar.update(1)

    return OptunaAskTell(search, study, make_config, before_tell, after_tell if bar is not None else None,
                         saved_result)


def tune_searcher(search: SearchConfig, url: str, uri: str | None, parent: ParentRun, ask_tell):
    """The Tune searcher over the driver's `ask_tell`. Tune pickles it (with its Tuner); the copy carries
    plain data only, from which `restore_ask_tell` rebuilds an ask/tell on the same study and parent run."""
    from pipeline.loader import to_dict
    from pipeline.ray.searcher import OptunaSearcher

    # Absolute, so that a copy restored elsewhere resolves the same folder and storage; a storage taken from
    # $ATTAMBA_OPTUNA_STORAGE is read from there again, which keeps its password out of Tune's files.
    from_env = search.storage is None and os.environ.get(STORAGE_ENV)
    pinned = to_dict(dataclasses.replace(search, out_dir=str(search.folder.parent.resolve()),
                                         storage=None if from_env else url))
    return OptunaSearcher(ask_tell, restore_ask_tell, {"search": pinned, "tracking_uri": uri,
                                                       "parent_run_id": parent.run_id})


def restore_ask_tell(search: dict, tracking_uri: str | None, parent_run_id: str | None):
    """An ask/tell rebuilt from what a pickled Tune searcher carries (`tune_searcher`): the search (as a
    dict), its tracking store and parent run. It reconnects to the study's Optuna storage."""
    search = search_from_dict(search)
    study = open_study(search)
    parent = ParentRun(tracking_uri, search.name, run_id=parent_run_id,
                       journal_dir=search.folder.resolve() / JOURNAL_DIR)
    return _ask_tell(search, study, tracking_uri, parent)


def _tune(search: SearchConfig, searcher, bar, slots: int) -> list[int]:
    from pipeline.ray.tune import TuneRun, fit, search_trial

    try:
        with searcher.ask_tell.heartbeats():
            fit(TuneRun(search_trial, search.resources, search.folder.resolve() / "_ray", "tune",
                        search_alg=searcher, num_samples=-1, slots=slots,
                        trial_name=lambda c: c["run_config"]["name"]))
    finally:
        bar.close()
    return searcher.ask_tell.failed


def _train_reference(search: SearchConfig, uri: str | None, parent: ParentRun) -> dict:
    """Train the same-size transformer once (a Tune trial like the others); its metrics go to the study."""
    from pipeline.loader import to_dict
    from pipeline.ray.tune import TuneRun, fit, search_trial

    cfg = worker_config(reference_run_config(search), uri, parent.run_id)
    fit(TuneRun(search_trial, search.resources, search.folder.resolve() / "_ray", "reference",
                param_space={"run_config": to_dict(cfg)}))
    done = done_record(cfg.train.out_dir)
    if done is None:
        raise RuntimeError(f"the reference transformer {cfg.name} did not finish; see {cfg.train.out_dir}")
    result = done["result"]
    keep = (schema.M_VAL_LOSS, schema.M_VAL_PPL, schema.M_VAL_BPB)
    reference = {k: float(result[k]) for k in keep if k in result}
    if schema.M_VAL_PPL not in reference:
        raise RuntimeError(f"the reference transformer {cfg.name} reported no {schema.M_VAL_PPL}")
    parent.tag_child(cfg.name, {schema.TAG_ROLE: REFERENCE_ROLE})
    return reference
