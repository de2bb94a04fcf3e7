"""The Optuna side of a search: storage URLs, the sampler, the study, and recovery after a killed driver.

Only the driver process calls into this module: with SQLite, a second writer would corrupt or lock the
database, so Ray workers return metrics and the driver alone asks and tells.
"""

from __future__ import annotations

import logging
import re
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.search.space import SearchConfig

log = logging.getLogger(__name__)

CONSTRAINTS_ATTR = "constraints"      # trial user attr: constraint values, feasible when all <= 0
RETRY_OF_ATTR = "retry_of"            # trial user attr: number of the trial a killed driver left RUNNING
RUN_NAME_ATTR = "run_name"            # trial user attr: the training run (and MLflow run) name
OBJECTIVES_ATTR = "objectives"        # study user attr: metric names of the objectives, in order
REFERENCE_ATTR = "reference"          # study user attr: the same-size transformer's metrics
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow run the trials nest under


def normalise_storage_url(url: str) -> str:
    """A plain postgresql:// URL means psycopg 3 to SQLAlchemy 2.1, which is not installed: use psycopg2."""
    if not isinstance(url, str) or "://" not in url:
        raise ValueError(f"storage must be a database URL such as sqlite:///optuna.db or "
                         f"postgresql+psycopg2://user:password@host/db, got {url!r}")
    scheme, rest = url.split("://", 1)
    if scheme in ("postgresql", "postgres"):
        return "postgresql+psycopg2://" + rest
    if not (scheme.startswith("sqlite") or scheme.startswith("postgresql") or scheme.startswith("mysql")):
        raise ValueError(f"storage {redact(url)!r} has scheme {scheme!r}; use sqlite:///PATH or a "
                         "postgresql+psycopg2:// URL")
    return url


def redact(url: str) -> str:
    """The URL with its password replaced, for logs, pareto.json and error messages."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def trial_constraints(trial: FrozenTrial) -> list[float]:
    """Optuna's constraints_func: values stored on the trial before `tell` (<= 0 means satisfied)."""
    return list(trial.user_attrs.get(CONSTRAINTS_ATTR, []))


def make_sampler(search: SearchConfig) -> optuna.samplers.BaseSampler:
    constraints = trial_constraints if search.constraints.names else None
    if search.sampler == "nsga2":
        # passed explicitly: Optuna 5's default multi-objective sampler is TPE
        return optuna.samplers.NSGAIISampler(population_size=search.population_size, seed=search.seed,
                                             constraints_func=constraints)
    if search.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=search.seed, multivariate=True, constraints_func=constraints)
    raise ValueError(f"sampler must be nsga2 or tpe, got {search.sampler!r}")


def open_study(search: SearchConfig, storage_url: str | None = None) -> optuna.Study:
    """Create the study, or load it when it exists (same name): a second invocation continues it."""
    url = normalise_storage_url(storage_url or search.storage_url())
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
    metrics = search.objectives.metrics
    try:
        study = optuna.create_study(storage=storage, study_name=search.name, sampler=make_sampler(search),
                                    directions=["minimize"] * len(metrics), load_if_exists=True)
    except ValueError as exc:
        raise ValueError(f"storage {redact(url)}: study {search.name!r} exists with other directions ({exc}); "
                         "give the search another name") from None
    stored = study.user_attrs.get(OBJECTIVES_ATTR)
    if stored is not None and list(stored) != metrics:
        raise ValueError(f"study {search.name!r} in {redact(url)} optimises {stored} but the config asks for "
                         f"{metrics}; give the search another name or restore its objectives")
    if stored is None:
        study.set_user_attr(OBJECTIVES_ATTR, metrics)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(metrics)  # the dashboard labels the axes with them
    return study


def recover_stale_trials(study: optuna.Study, param_names: set[str]) -> list[int]:
    """Trials left RUNNING by a killed driver: marked FAIL and their parameters enqueued again.

    `param_names` are the parameters of one point: a trial killed before all of them were drawn trained
    nothing (training starts from a whole point), so it is only failed. The retry keeps the original run
    name, so its training resumes from the killed run's checkpoint. Assumes one driver per study at a
    time (a second live driver's trials would be taken for stale).
    """
    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for trial in stale:
        study.tell(trial.number, state=TrialState.FAIL)
        if not param_names <= set(trial.params):
            # Killed between ask and its last suggestion: nothing was trained, the sampler will ask afresh.
            log.warning("trial %d was left RUNNING before its parameters were all drawn (%s): marked FAIL",
                        trial.number, sorted(trial.params))
            continue
        run_name = trial.user_attrs.get(RUN_NAME_ATTR)
        attrs = {RETRY_OF_ATTR: trial.user_attrs.get(RETRY_OF_ATTR, trial.number)}
        if run_name:
            attrs[RUN_NAME_ATTR] = run_name
        study.enqueue_trial(trial.params, user_attrs=attrs, skip_if_exists=False)
        log.warning("trial %d was left RUNNING by a stopped driver: marked FAIL, its parameters queued again",
                    trial.number)
    return [t.number for t in stale]


def completed_trials(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
