"""Thin MLflow helpers: clients with short HTTP retries, experiments, parent runs, run queries.

MLflow is imported inside functions so that importing the tracking package stays cheap.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from pipeline.tracking.config import check_status, resolve_uri
from pipeline.tracking.ui import all_runs_view_tag, ui_links

PARENT_RUN_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment without this tag in its GenAI view (traces, prompts); tagged
# "custom_model_development" it opens in the model-training view (runs, metrics, charts).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# MLflow's own HTTP retries default to 7 with exponential backoff: a dead server then holds each call for
# minutes. The journal's delivery thread does its own retrying, so each request should fail fast.
HTTP_MAX_RETRIES = "0"
HTTP_TIMEOUT_S = "5"

# Error codes that mean "this request will never succeed" (bad value, changed param, deleted run).
# Anything else (connection refused, timeouts, 5xx, rate limits) is retried later.
_PERMANENT_ERROR_CODES = frozenset({
    "INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "RESOURCE_ALREADY_EXISTS",
    "BAD_REQUEST", "INVALID_STATE",
})


def configure_http() -> None:
    """Short MLflow HTTP retries and timeout, unless the user set them in the environment."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", HTTP_MAX_RETRIES)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", HTTP_TIMEOUT_S)


def client(uri: str | None = None):
    configure_http()
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=resolve_uri(uri))


def is_permanent(error: BaseException) -> bool:
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException) and error.error_code in _PERMANENT_ERROR_CODES


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts go beside the database, not into ./mlruns of the working directory."""
    if not uri.startswith("sqlite:///") or uri.endswith(":memory:"):
        return None
    db_path = Path(uri[len("sqlite:///"):]).resolve()
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment)
    return (db_path.parent / "mlartifacts" / safe).as_uri()


def experiment_tags() -> dict[str, str]:
    """The tags every experiment of the project carries: its kind (EXPERIMENT_KIND) and the shared view
    that shows every run in the UI's charts (ui.ALL_RUNS_VIEW)."""
    view_tag, view = all_runs_view_tag()
    return {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, view_tag: view}


def ensure_experiment(mlflow_client, uri: str, name: str) -> str:
    """Experiment id of `name`, created if missing (tolerating a concurrent creator), with experiment_tags()
    (an existing experiment gets those it lacks, and the current all-runs view)."""
    from mlflow.exceptions import MlflowException

    tags = experiment_tags()
    found = mlflow_client.get_experiment_by_name(name)
    if found is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=default_artifact_location(uri, name),
                                                   tags=tags)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = mlflow_client.get_experiment_by_name(name)
    for key, value in tags.items():
        # The kind is set when missing (someone may have chosen another); the view is kept current.
        if key not in found.tags or (key != EXPERIMENT_KIND_TAG and found.tags[key] != value):
            mlflow_client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def start_parent_run(experiment: str, name: str, tags: Mapping[str, str] | None = None,
                     uri: str | None = None) -> str:
    """Create a RUNNING run that study trials nest under (their tag mlflow.parentRunId); returns its id."""
    uri = resolve_uri(uri)
    c = client(uri)
    run = c.create_run(ensure_experiment(c, uri, experiment), run_name=name,
                       tags={k: str(v) for k, v in (tags or {}).items()})
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status=check_status(status))


def _quote(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def find_runs(experiment: str, tags: Mapping[str, str] | None = None, uri: str | None = None,
              parent_run_id: str | None = None) -> list:
    """All runs of `experiment` whose tags equal `tags` (and nested under `parent_run_id` if given).

    Returns mlflow.entities.Run objects, newest first; [] when the experiment does not exist.
    """
    c = client(uri)
    found = c.get_experiment_by_name(experiment)
    if found is None:
        return []
    wanted = dict(tags or {})
    if parent_run_id is not None:
        wanted[PARENT_RUN_TAG] = parent_run_id
    filter_string = " and ".join(f"tags.`{k}` = {_quote(v)}" for k, v in wanted.items())
    return search_all(c, found.experiment_id, filter_string=filter_string)


def search_all(mlflow_client, experiment_id: str, page_size: int = 1000, **query) -> list:
    """Every run of `experiment_id` that `mlflow_client.search_runs` finds with `query` (filter_string,
    run_view_type, order_by ...), read page by page, `page_size` runs a page."""
    runs, token = [], None
    while True:
        page = mlflow_client.search_runs([experiment_id], max_results=page_size, page_token=token, **query)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def log_into_run(run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str], step: int,
                 uri: str | None = None) -> tuple[str | None, int]:
    """Add metrics (at `step`) and tags to an existing run: (None, metrics logged) when done, else (why it
    was not: the store unreachable, the run unknown to it; 0). A metric the run already holds at `step` or
    later is not logged again (a second point at one step)."""
    import time

    from mlflow.entities import Metric, RunTag

    try:
        mlflow_client = client(uri)
        held = latest_steps(mlflow_client, run_id)
        now = int(time.time() * 1000)
        new = [Metric(k, float(v), now, step) for k, v in metrics.items() if held.get(k, -1) < step]
        mlflow_client.log_batch(run_id, metrics=new, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    except Exception as exc:  # any store failure is reported, not raised: the numbers are printed anyway
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", 0
    return None, len(new)


def latest_steps(client, run_id: str) -> dict[str, int]:
    """The newest step of each metric of the run (MLflow keeps each metric's latest point with its step)."""
    run = client.get_run(run_id)
    latest = getattr(run.data, "_metric_objs", None)
    if latest is None:   # not exposed by this MLflow: one history call per metric
        return {key: max(m.step for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}
    return {m.key: m.step for m in latest}


def run_links(uri: str | None, run_id: str | None) -> dict | None:
    """`ui_links` for a run of the store at `uri` (its experiment looked up); None without a run, or when the
    store cannot be read now (the run is there all the same: the links are a convenience)."""
    if not (uri and run_id):
        return None
    try:
        experiment_id = client(uri).get_run(run_id).info.experiment_id
    except Exception:
        return None
    return ui_links(uri, experiment_id, run_id)
