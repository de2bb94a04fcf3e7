"""Where to look at a run in the MLflow UI, in its model-training view, with every run in its charts.

MLflow 3's UI (3.17, 3.18) keeps a global GenAI / model-training switch in the browser's local storage
(`mlflow.workflowType`; GenAI in a fresh browser) that wins over an experiment's `mlflow.experimentKind` tag.
The URL overrides it: `?workflowType=machine_learning`. The UI routes after a hash:
`<server>/#/experiments/<experiment id>/runs/<run id>` for a run, `.../runs` for the experiment's runs, where
`compareRunsMode=CHART` opens the chart view.

That chart view draws the first 10 runs unless told otherwise. A view saved with the UI's Share button is
an experiment tag `mlflow.sharedViewState.<key>` holding the view's state as JSON, opened by
`?viewStateShareKey=<key>` (the UI then says it shows a shared view); ALL_RUNS_VIEW is such a state with every
run shown (`runsHiddenMode: SHOW_ALL`), set on each experiment this project creates or uses
(mlflow_client.ensure_experiment) and named by the charts link.
"""

from __future__ import annotations

import json
import re
import shlex

WORKFLOW_PARAM = "workflowType=machine_learning"
LOCAL_UI = "http://127.0.0.1:5000"            # where `mlflow ui` serves by default
SHARED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
ALL_RUNS_KEY = "attamba-all-runs"
# Every run shown in the charts (the UI's default, FIRST_10_RUNS, hides the rest), listed by validation
# perplexity, best first: a sort other than by start time also lists the children of a parent run flat, so
# the charts draw them (nested under a collapsed parent, they are not drawn).
ALL_RUNS_VIEW = json.dumps({"runsHiddenMode": "SHOW_ALL", "orderByKey": "metrics.`val/ppl`", "orderByAsc": True})


def all_runs_view_tag() -> tuple[str, str]:
    """(experiment tag, value) of the shared view that shows every run in the charts."""
    return SHARED_VIEW_TAG_PREFIX + ALL_RUNS_KEY, ALL_RUNS_VIEW


def _redact(uri: str) -> str:
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", uri)


def serve_command(uri: str) -> str | None:
    """The command that serves a database store's UI on this machine (`mlflow ui --backend-store-uri ...`,
    a password shown as ***); None for a tracking server, whose own address is the UI."""
    if uri.split(":", 1)[0].lower() in ("http", "https", "databricks"):
        return None
    return f"mlflow ui --backend-store-uri {shlex.quote(_redact(uri))}"


def ui_base(uri: str) -> str | None:
    """The UI's address: a tracking server's own URL, `mlflow ui`'s default for a database store; None for
    Databricks (its workspace UI has other routes)."""
    scheme = uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        return _redact(uri).rstrip("/")
    return None if scheme == "databricks" else LOCAL_UI


def ui_links(uri: str, experiment_id: str, run_id: str) -> dict:
    """{"run": the run's page, "charts": the experiment's runs in the chart view with every run shown,
    "serve": the command to start the UI first (None for a server)}, each in the model-training view.
    Without a known UI address (Databricks) the links are the route after the address's `#`."""
    base = ui_base(uri) or ""
    run = f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{WORKFLOW_PARAM}"
    charts = (f"{base}/#/experiments/{experiment_id}/runs?{WORKFLOW_PARAM}&compareRunsMode=CHART"
              f"&viewStateShareKey={ALL_RUNS_KEY}")
    return {"run": run, "charts": charts, "serve": serve_command(uri)}


def ui_line(links: dict | None, what: str = "run") -> str | None:
    """One line for stderr: where to open the `what` (and all runs' charts), after which command."""
    if not links:
        return None
    serve = f"run `{links['serve']}`, then open " if links["serve"] else "open "
    return f"MLflow UI: {serve}{links['run']} (the {what}; every run's charts: {links['charts']})"
