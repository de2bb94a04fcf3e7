"""What the MLflow UI shows, on a real SQLite store: experiments open in the model-training view, runs
carry the code version, a parent run holds the params and files a driver logs to it and the answer as its
description, and the links the commands print open the UI on the runs (checked in a browser, slow)."""

import json
import os
import re
import signal
import subprocess

import pytest

from pipeline import schema
from pipeline.tracking.mlflow_client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment
from pipeline.tracking.parent import DESCRIPTION_TAG, find_parent, parent_run
from pipeline.tracking.mlflow_client import run_links
from pipeline.tracking.ui import ALL_RUNS_KEY, LOCAL_UI, all_runs_view_tag, ui_line, ui_links
from pipeline.tracking.tracker import MlflowTracker, TrackingConfig
from pipeline.tracking.version import code_version
from tests.helpers import REPO_ROOT
from tests.pipeline.tracking.mlflow_runs import client as mlflow_client


def _kind(uri, name):
    return mlflow_client(uri).get_experiment_by_name(name).tags.get(EXPERIMENT_KIND_TAG)


def test_experiments_made_by_runs_and_parents_open_in_the_training_view(store, tmp_path):
    assert EXPERIMENT_KIND_TAG == "mlflow.experimentKind" and EXPERIMENT_KIND == "custom_model_development"
    with MlflowTracker(TrackingConfig(uri=store, experiment="kind-run", flush_interval_s=0.1),
                       journal_dir=tmp_path / "run"):
        pass
    assert _kind(store, "kind-run") == EXPERIMENT_KIND
    with parent_run(store, "kind-parent", {schema.TAG_ROLE: "parent"}):
        pass
    assert _kind(store, "kind-parent") == EXPERIMENT_KIND


def test_an_existing_untagged_experiment_gets_the_kind_tag(store):
    c = mlflow_client(store)
    experiment_id = c.create_experiment("kind-old")
    assert _kind(store, "kind-old") is None
    assert ensure_experiment(c, store, "kind-old") == experiment_id
    assert _kind(store, "kind-old") == EXPERIMENT_KIND


def test_code_version_is_the_checkout_commit():
    sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                         check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=True).stdout.strip()
    assert code_version() == (f"{sha}-dirty" if dirty else sha)


def test_parent_run_holds_params_files_and_code_version(store, tmp_path):
    config = tmp_path / "study.yaml"
    config.write_text("name: p\nsizes: [tiny]\n")
    report = tmp_path / "report"
    report.mkdir()
    for name in ("report.html", "summary.md", "fits.json"):
        (report / name).write_text(name)
    with parent_run(store, "parent-files", {schema.TAG_ROLE: "parent"}) as parent:
        parent.log_params({"sizes": "tiny,s60m", "seeds": "0,1"})
        parent.log_artifacts([config], "study")
    # After the run ended, as the study driver does once the report is written.
    parent.log_artifacts([report / n for n in ("report.html", "summary.md", "fits.json", "missing.json")],
                         "report")
    c = mlflow_client(store)
    run = c.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"sizes": "tiny,s60m", "seeds": "0,1"}
    assert run.data.tags[schema.TAG_CODE_VERSION] == code_version()
    assert [a.path for a in c.list_artifacts(parent.run_id, "study")] == ["study/study.yaml"]
    assert sorted(a.path for a in c.list_artifacts(parent.run_id, "report")) == [
        "report/fits.json", "report/report.html", "report/summary.md"]
    local = c.download_artifacts(parent.run_id, "report/summary.md", str(tmp_path / "back"))
    assert open(local).read() == "summary.md"


def test_a_resumed_parent_keeps_its_params_and_warns_on_a_changed_one(store, caplog):
    tags = {schema.TAG_ROLE: "parent", schema.TAG_STUDY: "resumed"}
    with parent_run(store, "parent-resume", tags) as first:
        first.log_params({"seeds": "0"})
    with parent_run(store, "parent-resume", tags) as second:
        second.log_params({"seeds": "0"})       # the same value again: accepted
        second.log_params({"seeds": "0,1"})     # refused by MLflow: the run keeps its value
    assert second.run_id == first.run_id
    assert mlflow_client(store).get_run(first.run_id).data.params == {"seeds": "0"}
    assert "kept the parent run" in caplog.text


# ---------------------------------------------------------------- links into the UI

def test_every_experiment_carries_a_shared_view_that_shows_all_runs(store):
    with parent_run(store, "view-parent", {schema.TAG_ROLE: "parent"}):
        pass
    tag, value = all_runs_view_tag()
    assert tag == "mlflow.sharedViewState." + ALL_RUNS_KEY
    tags = mlflow_client(store).get_experiment_by_name("view-parent").tags
    view = json.loads(tags[tag])
    assert view["runsHiddenMode"] == "SHOW_ALL" and view["orderByKey"] == "metrics.`val/ppl`"
    # A view saved by an older version is brought up to date; a kind someone changed is left alone.
    c = mlflow_client(store)
    experiment_id = c.get_experiment_by_name("view-parent").experiment_id
    c.set_experiment_tag(experiment_id, tag, '{"runsHiddenMode": "FIRST_10_RUNS"}')
    c.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    ensure_experiment(c, store, "view-parent")
    tags = c.get_experiment_by_name("view-parent").tags
    assert tags[tag] == value and tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_links_open_the_training_view_and_say_how_to_serve_a_database_store():
    links = ui_links("sqlite:////data/my runs/mlflow.db", "3", "abc")
    assert links["run"] == "http://127.0.0.1:5000/#/experiments/3/runs/abc?workflowType=machine_learning"
    assert links["charts"] == ("http://127.0.0.1:5000/#/experiments/3/runs?workflowType=machine_learning"
                               f"&compareRunsMode=CHART&viewStateShareKey={ALL_RUNS_KEY}")
    assert links["serve"] == "mlflow ui --backend-store-uri 'sqlite:////data/my runs/mlflow.db'"
    server = ui_links("http://mlflow:5000/", "3", "abc")
    assert server["run"].startswith("http://mlflow:5000/#/experiments/3/runs/abc?") and server["serve"] is None
    secret = ui_links("postgresql://me:hunter2@db/mlflow", "3", "abc")
    assert "hunter2" not in json.dumps(secret) and "postgresql://me:***@db/mlflow" in secret["serve"]
    line = ui_line(links, "study's parent run")
    assert line.startswith("MLflow UI: run `mlflow ui --backend-store-uri") and links["run"] in line
    assert ui_line(None) is None


def test_run_links_find_the_runs_experiment_and_a_parent_gets_a_description(store):
    with parent_run(store, "described", {schema.TAG_ROLE: "parent"}) as parent:
        pass
    parent.describe("**The answer**\n\n- +13.6% [8.23, 19.0]")
    found = find_parent(store, "described", "parent")
    assert found.run_id == parent.run_id and find_parent(store, "described", "search") is None
    run = mlflow_client(store).get_run(parent.run_id)
    assert run.data.tags[DESCRIPTION_TAG] == "**The answer**\n\n- +13.6% [8.23, 19.0]"
    assert DESCRIPTION_TAG == "mlflow.note.content"
    links = run_links(store, parent.run_id)
    assert links["run"].endswith(f"/#/experiments/{run.info.experiment_id}/runs/{parent.run_id}"
                                 "?workflowType=machine_learning")
    assert run_links(store, None) is None and run_links(None, parent.run_id) is None
    assert run_links(store, "0" * 32) is None   # not in the store: no link, no error


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dom(browser: str, url: str, profile, ready=lambda dom: True, tries: int = 4) -> str:
    """The page's DOM once its scripts have run (headless Chromium, a fresh profile each time: GenAI is the
    UI's default view there), loaded again (up to `tries` times) until `ready` says the UI got that far: on
    a busy machine the UI's later requests (a shared view) can come after Chromium's time budget."""
    for attempt in range(tries):
        done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               "--disable-background-networking", "--disable-component-update", "--disable-sync",
                               f"--user-data-dir={profile}-{attempt}", "--virtual-time-budget=30000",
                               "--dump-dom", url], capture_output=True, text=True, timeout=180)
        if ready(done.stdout):
            break
    return done.stdout


@pytest.mark.slow
def test_the_printed_links_open_mlflows_ui_on_training_runs_with_every_run_shown(tmp_path):
    """A real `mlflow server` and a real browser: the run link lands in the model-training view (the
    experiment's plain address lands in GenAI, the switch this link gets past), and the charts link shows
    all 12 runs of a study (the UI's default view, 10)."""
    import shutil
    import time
    import urllib.request

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed: apt-get install -y chromium")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with parent_run(uri, "ui-study", {schema.TAG_ROLE: "parent"}) as parent:
        c = mlflow_client(uri)
        experiment_id = c.get_experiment_by_name("ui-study").experiment_id
        for i in range(12):
            child = c.create_run(experiment_id, run_name=f"child-{i:02d}",
                                 tags={"mlflow.parentRunId": parent.run_id})
            c.log_metric(child.info.run_id, "val/ppl", 100.0 + i)
            c.set_terminated(child.info.run_id)
    port = _free_port()
    server = subprocess.Popen(["mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "mlflow server did not start"
                time.sleep(1)
        base = f"http://127.0.0.1:{port}"
        links = {k: v.replace(LOCAL_UI, base) for k, v in run_links(uri, parent.run_id).items() if k != "serve"}
        sidebar = ("Model registry", "Judges")   # the training view's sidebar; the GenAI view's

        def boxes(dom: str) -> list[str]:   # each run row's visibility eye: the charts draw the open ones
            return re.findall(r"<input[^>]*is-visibility-toggle-checkbox[^>]*>", dom)

        run_page = _dom(browser, links["run"], tmp_path / "p1", lambda d: parent.run_id in d and any(
            s in d for s in sidebar))
        assert "Model registry" in run_page and "Judges" not in run_page
        plain = _dom(browser, f"{base}/#/experiments/{experiment_id}/runs/{parent.run_id}", tmp_path / "p2",
                     lambda d: any(s in d for s in sidebar))
        assert "Judges" in plain, "MLflow opens in its training view by itself now: the link's reason is gone"
        # Shared view: the children listed flat (sorted by val/ppl), every one shown.
        charts = _dom(browser, links["charts"], tmp_path / "p3", lambda d: len(boxes(d)) == 13)
        assert "shared view" in charts and len(boxes(charts)) == 13
        assert sum("checked" in b for b in boxes(charts)) == 13
        # The same list without the shared view: the UI's default shows the first 10 only.
        plain = links["charts"].split("&viewStateShareKey")[0].replace("compareRunsMode=CHART",
                                                                     "compareRunsMode=CHART&orderByKey=metrics.%60val%2Fppl%60")
        default = _dom(browser, plain, tmp_path / "p4", lambda d: len(boxes(d)) == 13)
        assert len(boxes(default)) == 13 and sum("checked" in b for b in boxes(default)) == 10
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
