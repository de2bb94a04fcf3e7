"""What the MLflow UI shows, on a real SQLite store: experiments open in the model-training view, runs
carry the code version, and a parent run holds the params and files a driver logs to it."""

import subprocess

from pipeline import schema
from pipeline.tracking.mlflow_client import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, ensure_experiment
from pipeline.tracking.parent import parent_run
from pipeline.tracking.tracker import MlflowTracker, TrackingConfig
from pipeline.tracking.version import code_version
from tests.conftest import REPO_ROOT
from tests.pipeline.tracking.conftest import mlflow_client


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
