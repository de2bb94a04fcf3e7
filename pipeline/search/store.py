"""The Optuna side of a search: storage URLs, the sampler, the study, and recovery after a killed driver.

Only the driver process calls into this module: with SQLite, a second writer would corrupt or lock the
database, so Ray workers return metrics and the driver alone asks and tells.

Which RUNNING trials are stale (left by a stopped driver) is decided by Optuna's heartbeats: the driver
records one for each trial it runs every HEARTBEAT_INTERVAL_S, and stamps the trial with its host and
PID. A trial is stale when its heartbeat is older than GRACE_PERIOD_S, when its driver ran on this host
and that process is gone, or when it carries no stamp (asked before any heartbeat was recorded).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import warnings

import optuna
from optuna.trial import FrozenTrial, TrialState

from pipeline.search.space import SearchConfig

log = logging.getLogger(__name__)

CONSTRAINTS_ATTR = "constraints"      # trial user attr: constraint values, feasible when all <= 0
RETRY_OF_ATTR = "retry_of"            # trial user attr: number of the trial a killed driver left RUNNING
COPY_OF_ATTR = "copy_of"              # trial user attr: a completed trial with the same parameters, values reused
RUN_NAME_ATTR = "run_name"            # trial user attr: the training run (and MLflow run) name
OBJECTIVES_ATTR = "objectives"        # study user attr: metric names of the objectives, in order
REFERENCE_ATTR = "reference"          # study user attr: the same-size transformer's metrics
PARENT_ATTR = "mlflow_parent_run_id"  # study user attr: the MLflow run the trials nest under
DRIVER_ATTR = "driver"                # trial user attr: {"host", "pid"} of the driver running the trial

HEARTBEAT_INTERVAL_S = 20   # how often a driver records a heartbeat for each trial it runs
GRACE_PERIOD_S = 90         # a RUNNING trial whose last heartbeat is older than this is stale


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


def open_study(search: SearchConfig, storage_url: str | None = None, *, heartbeat_interval: int = HEARTBEAT_INTERVAL_S,
               grace_period: int = GRACE_PERIOD_S) -> optuna.Study:
    """Create the study, or load it when it exists (same name): a second invocation continues it.
    Its storage has heartbeats on (see the module docstring)."""
    url = normalise_storage_url(storage_url or search.storage_url())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                             heartbeat_interval=heartbeat_interval, grace_period=grace_period)
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


def claim(study: optuna.Study, trial: optuna.Trial) -> None:
    """Mark `trial` as this driver's: a first heartbeat, then the host and PID stamp."""
    study._storage.record_heartbeat(trial._trial_id)
    trial.set_user_attr(DRIVER_ATTR, {"host": socket.gethostname(), "pid": os.getpid()})


def beat(study: optuna.Study, trials: list[optuna.Trial]) -> None:
    """Record a heartbeat for each of `trials` (the driver's live ones)."""
    for trial in trials:
        study._storage.record_heartbeat(trial._trial_id)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def stale_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The RUNNING trials no live driver works on (see the module docstring); the others are left alone."""
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    # Optuna's own staleness test (what optuna.storages.fail_stale_trials uses), without failing them yet:
    # a stale trial whose run finished is told its result instead.
    expired = set(study._storage._get_stale_trial_ids(study._study_id))
    host, stale = socket.gethostname(), []
    for trial in running:
        driver = trial.user_attrs.get(DRIVER_ATTR)
        if (driver is None or trial._trial_id in expired
                or (driver.get("host") == host and _process_gone(int(driver.get("pid", 0))))):
            stale.append(trial)
        else:
            log.warning("trial %d is RUNNING under a live driver (pid %s on %s, heartbeat within %s s): left alone",
                        trial.number, driver.get("pid"), driver.get("host"), GRACE_PERIOD_S)
    return stale


def recover_stale_trials(study: optuna.Study, param_names: set[str], finished=None) -> list[int]:
    """Stale trials (`stale_trials`) left by a stopped driver: told their result when `finished(trial)`
    tells them (their run had finished before the driver could), else marked FAIL and their parameters
    enqueued again. Returns the numbers of the stale trials.

    `param_names` are the parameters of one point: a trial killed before all of them were drawn trained
    nothing (training starts from a whole point), so it is only failed. The retry keeps the original run
    name, so its training resumes from the killed run's checkpoint (or is told from the run's saved result
    when that run finished)."""
    stale = stale_trials(study)
    for trial in stale:
        whole = param_names <= set(trial.params)
        if whole and finished is not None and finished(trial):
            log.warning("trial %d had finished training when its driver stopped: told from its saved result",
                        trial.number)
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        if not whole:
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
