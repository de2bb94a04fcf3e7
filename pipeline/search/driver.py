"""`run_search`: a search file -> an Optuna study (SQLite or PostgreSQL) -> Ray Tune trials -> Pareto front.

The whole search is validated before any trial. The Optuna storage is the search's only state: running
the same command again loads the same study, keeps its completed trials, marks trials a killed driver
left RUNNING as FAIL and queues their parameters again, and asks only for the trials still missing.
Results: pareto.csv, pareto.json and pareto.png in `out_dir/name` (format in search/results.py), also
logged on the search's MLflow parent run; `optuna-dashboard STORAGE_URL` shows the study live.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from pipeline import schema
from pipeline.search.results import MLFLOW_RUN_ATTR, export_front
from pipeline.search.space import (SearchConfig, base_run_config, load_search, param_names, reference_run_config,
                           trial_run_config)
from pipeline.search.store import (PARENT_ATTR, REFERENCE_ATTR, completed_trials, normalise_storage_url, open_study,
                           recover_stale_trials, redact)

log = logging.getLogger(__name__)

SEARCH_ROLE = "search"   # value of study.ROLE_TAG on the search's parent MLflow run


def run_search(config_path: str | Path, overrides: list[str] | None = None, address: str | None = None) -> dict:
    """Run (or continue) the search until its study holds `n_trials` completed trials; export the front."""
    wall_start = time.perf_counter()
    search = load_search(config_path, overrides)
    url = normalise_storage_url(search.storage_url())
    study = open_study(search, url)
    retried = recover_stale_trials(study, param_names(search.space))
    base = base_run_config(search)
    from pipeline.tracking.config import resolve_uri

    uri = resolve_uri(base.tracking.uri) if base.tracking.enabled else None
    done_before = len(completed_trials(study))
    failed, parent = [], None
    if done_before < search.n_trials:
        failed, parent = _run_on_ray(search, study, uri, address)
    trials = completed_trials(study)
    record = export_front(search, study, trials, url, search.folder)
    if parent is not None:
        _log_front(parent, uri, search.folder)
    log.warning("search %s: %d/%d trials complete, %d on the Pareto front; dashboard: optuna-dashboard %s",
                search.name, len(trials), search.n_trials, len(record["front"]), redact(url))
    return {"search": search.name, "storage": redact(url), "n_trials": search.n_trials,
            "complete": len(trials), "complete_before": done_before, "retried": retried, "failed": failed,
            "pareto": record["front"], "folder": str(search.folder.resolve()), "parent_run_id": parent,
            "tracking_uri": uri, "wall_s": time.perf_counter() - wall_start}


def _run_on_ray(search: SearchConfig, study, uri: str | None, address: str | None) -> tuple[list[int], str]:
    from pipeline.study.driver import ray_session

    address = address or os.environ.get("RAY_ADDRESS") or search.address
    with ray_session(address, search.resources, uri, lambda: _parent_run(search, study, uri)) as session:
        base = base_run_config(search)
        from pipeline.data.prepare import prepare

        prepare(base.data, base.model.max_seq_len)  # once in the driver, not once per trial
        if search.constraints.max_ppl_gap is not None and REFERENCE_ATTR not in study.user_attrs:
            study.set_user_attr(REFERENCE_ATTR, _train_reference(search, uri, session.parent))
        session.failed = _tune(search, study, uri, session.parent, session.slots)
    failed, parent = session.failed, session.parent
    return failed, parent


def _absolute(search: SearchConfig, cfg, uri: str | None, parent: str | None):
    from pipeline.data.prepare import cache_root

    data = dataclasses.replace(cfg.data, cache_dir=str(Path(cache_root(cfg.data)).resolve()))
    tracking = dataclasses.replace(cfg.tracking, uri=uri, parent_run_id=parent) if uri else cfg.tracking
    return dataclasses.replace(cfg, data=data, tracking=tracking)


def _tune(search: SearchConfig, study, uri: str | None, parent: str | None, slots: int) -> list[int]:
    from ray import tune

    from pipeline.study.driver import TRIAL_CPU
    from pipeline.search.searcher import OptunaAskTell, progress_bar, search_trial

    def make_config(params: dict, run_name: str, number: int):
        return _absolute(search, trial_run_config(search, params, number, run_name=run_name), uri, parent)

    bar = progress_bar(search, len(completed_trials(study)))

    def before_tell(trial) -> None:
        run_id = _tag_child(search, uri, parent, trial.user_attrs.get("run_name"),
                            {schema.TAG_OPTUNA_TRIAL: str(trial.number)})
        if run_id:
            trial.set_user_attr(MLFLOW_RUN_ATTR, run_id)

    def after_tell(number: int, state) -> None:
        bar.write(f"  trial {number}: {state.name.lower()}")
        if state.name == "COMPLETE":
            bar.update(1)

    searcher = OptunaAskTell(search, study, make_config, before_tell, after_tell)
    res = search.resources
    storage = search.folder.resolve() / "_ray"
    trainable = tune.with_parameters(search_trial, workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                                     gpus_per_worker=res.gpus_per_worker, storage_path=str(storage))
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"CPU": TRIAL_CPU}),
        param_space={},
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=slots,
                                    trial_name_creator=lambda t: t.config["run_config"]["name"],
                                    trial_dirname_creator=lambda t: t.config["run_config"]["name"]),
        run_config=tune.RunConfig(name=f"tune-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=str(storage),
                                  verbose=0, failure_config=tune.FailureConfig(max_failures=res.max_failures)),
    )
    try:
        tuner.fit()
    finally:
        bar.close()
    return searcher.failed


def _train_reference(search: SearchConfig, uri: str | None, parent: str | None) -> dict:
    """Train the same-size transformer once (a Tune trial like the others); its metrics go to the study."""
    from ray import tune

    from pipeline.config import to_dict
    from pipeline.ray.trainer import DONE_FILE
    from pipeline.study.driver import ROLE_TAG, TRIAL_CPU
    from pipeline.search.searcher import search_trial

    cfg = _absolute(search, reference_run_config(search), uri, parent)
    res = search.resources
    storage = search.folder.resolve() / "_ray"
    trainable = tune.with_parameters(search_trial, workers=res.workers, cpus_per_worker=res.cpus_per_worker,
                                     gpus_per_worker=res.gpus_per_worker, storage_path=str(storage))
    tune.Tuner(tune.with_resources(trainable, {"CPU": TRIAL_CPU}),
               param_space={"run_config": to_dict(cfg)},
               run_config=tune.RunConfig(name=f"reference-{time.strftime('%Y%m%d-%H%M%S')}",
                                         storage_path=str(storage), verbose=0,
                                         failure_config=tune.FailureConfig(max_failures=res.max_failures)),
               ).fit()
    done = Path(cfg.train.out_dir) / DONE_FILE
    if not done.is_file():
        raise RuntimeError(f"the reference transformer {cfg.name} did not finish; see {cfg.train.out_dir}")
    result = json.loads(done.read_text())["result"]
    keep = (schema.M_VAL_LOSS, schema.M_VAL_PPL, schema.M_VAL_BPB)
    reference = {k: float(result[k]) for k in keep if k in result}
    if schema.M_VAL_PPL not in reference:
        raise RuntimeError(f"the reference transformer {cfg.name} reported no {schema.M_VAL_PPL}")
    _tag_child(search, uri, parent, cfg.name, {ROLE_TAG: "reference"})
    return reference


def _parent_run(search: SearchConfig, study, uri: str) -> str:
    """The search's MLflow parent run: kept in the study's user attrs, so a resumed search reuses it."""
    from mlflow.exceptions import MlflowException

    from pipeline.study.driver import ROLE_TAG
    from pipeline.tracking.mlflow_client import client, start_parent_run

    run_id = study.user_attrs.get(PARENT_ATTR)
    if run_id:
        try:
            client(uri).update_run(run_id, status="RUNNING")
            return run_id
        except MlflowException:
            log.warning("MLflow run %s of this search is not in %s; starting a new parent run", run_id, uri)
    run_id = start_parent_run(search.name, search.name, uri=uri,
                              tags={schema.TAG_STUDY: search.name, ROLE_TAG: SEARCH_ROLE})
    study.set_user_attr(PARENT_ATTR, run_id)
    return run_id


def _tag_child(search: SearchConfig, uri: str | None, parent: str | None, run_name: str | None,
               tags: dict) -> str | None:
    """Set `tags` (e.g. optuna_trial=<number>) on the MLflow child run named `run_name`; returns its id."""
    if not (uri and parent and run_name):
        return None
    from pipeline.tracking.mlflow_client import client, find_runs

    runs = find_runs(search.name, tags={"mlflow.runName": run_name}, uri=uri, parent_run_id=parent)
    if not runs:
        log.warning("no MLflow run named %s under the search's parent run; not tagged", run_name)
        return None
    run_id = runs[0].info.run_id
    for key, value in tags.items():
        client(uri).set_tag(run_id, key, value)
    return run_id


def _log_front(parent: str, uri: str, folder: Path) -> None:
    from pipeline.tracking.mlflow_client import client

    c = client(uri)
    for name in ("pareto.json", "pareto.csv", "pareto.png"):
        if (folder / name).is_file():
            c.log_artifact(parent, str(folder / name), artifact_path="search")
