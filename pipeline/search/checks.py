"""A search's pre-flight, after its space is checked and before its folder, Optuna study, Ray or MLflow
exist: the base run's fields that the search sets per trial, its folder and stores, the device, data and
tokenizer, the resources against this machine (when it starts its own Ray) and the time its trials would
take here."""

from __future__ import annotations

import os

from pipeline.preflight import check_places, ignored_fields, machine, paths
from pipeline.data.checks import check_data, check_vocab
from pipeline.runs.resources import check_placement, check_resources
from pipeline.runs.outputs import output_root, tracking_uri
from pipeline.search.space import DEFAULT_STORAGE, STORAGE_ENV, SearchConfig, base_run_config, extreme_configs

# Fields of a search's `run` that the search sets for each trial itself, and what sets them instead.
SET_PER_TRIAL = {
    ("name",): "each trial's run is named <search name>-tNNNN",
    ("train", "out_dir"): "each trial writes to {folder}/trials/<trial name>; the search's `out_dir` moves them",
    ("train", "study"): "the search's `name` is every trial's study",
    ("train", "trial"): "each trial's run name is its trial",
    ("tracking", "experiment"): "the search's `name` is the MLflow experiment",
    ("tracking", "run_name"): "each trial's MLflow name is its run name",
    ("tracking", "parent_run_id"): "the search's parent run is every trial's parent",
    ("tracking", "resume_run_id"): "each trial resumes its own MLflow run",
}


def check_search(search: SearchConfig, *, local: bool, yes: bool) -> None:
    """Refuse the search before anything is written or started (see the module docstring); `local`: the
    search starts its own Ray on this machine."""
    root = output_root()
    folder = paths.output_dir("out_dir", search.out_dir, root) / search.name
    ignored_fields(search.run, SET_PER_TRIAL, folder, "a search")
    env = os.environ.get(STORAGE_ENV)
    field = "storage" if search.storage else (STORAGE_ENV if env else f"storage (default {DEFAULT_STORAGE})")
    paths.database_url(field, search.storage or env or DEFAULT_STORAGE, root)
    base = base_run_config(search)
    if base.tracking.enabled:
        given, mlflow_env = base.tracking.uri, os.environ.get("MLFLOW_TRACKING_URI")
        field = "run.tracking.uri" if given else ("MLFLOW_TRACKING_URI" if mlflow_env else "the tracking store")
        paths.database_url(field, given or mlflow_env or tracking_uri(None), root)
    if base.train.device == "cuda" and search.resources.gpus_per_worker == 0:
        raise ValueError("run.train.device=cuda but resources.gpus_per_worker=0: Ray would give the trials no GPU; "
                         "set resources.gpus_per_worker (e.g. 1), or run.train.device=cpu")
    if local:
        machine.check_device("run.train.device", base.train.device)
        check_resources(search.resources, machine.local_resources())
        check_placement(search.resources, [machine.local_resources()])   # a local Ray is one node
    try:
        check_data(base.data)
    except ValueError as exc:
        raise ValueError(f"run.{exc}") from None
    check_vocab(search.run.get("model"), base.data, "run.")
    configs = extreme_configs(search)
    check_places(configs[0], where="run.", tracking=False)
    if local:
        work = max((machine.training_flops(cfg, search.resources.workers) for cfg in configs), key=lambda w: w[1])
        trials = search.n_trials + (search.constraints.max_ppl_gap is not None)
        machine.check_duration(work[1] * trials, work[0] * trials, gpu=search.resources.gpus_per_worker > 0, yes=yes,
                               what=f"the search's {trials} trials of run.train.steps={base.train.steps}",
                               fix="lower n_trials or run.train.steps")
