"""`attamba sync`: walking a study folder, leaving a run's other files alone, quarantining torn journal lines.

Journals are written by a real MlflowTracker against one SQLite store; "undelivered" is made by dropping the
delivery state, and the sync delivers them again into a second store, as after an outage.
"""

import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.tracking.journal import JOURNAL_NAME
from pipeline.tracking.tracker import MlflowTracker, TrackingConfig, sync_journal


def _store(path: Path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{path}"
    MlflowClient(uri).search_experiments()  # creates the schema
    return uri


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("sync_stores")
    return _store(root / "first.db"), _store(root / "second.db")


def _run_folder(folder: Path, uri: str, name: str, steps: int = 4) -> int:
    """A run's folder as training leaves it (metrics.jsonl, config.yaml, tracking/ journal) whose journal
    was never delivered; returns the number of journal records."""
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"name: {name}\n")
    with open(folder / "metrics.jsonl", "w") as f:
        for step in range(steps):
            f.write(json.dumps({"step": step, "train/loss": 5.0 - step}) + "\n")
    with MlflowTracker(TrackingConfig(uri=uri, experiment="sync", run_name=name), journal_dir=folder / "tracking") as t:
        for step in range(steps):
            t.log_metrics({"train/loss": 5.0 - step}, step=step)
    for state in (folder / "tracking").glob("*.state.json"):
        state.unlink()   # as if the server had been down for the whole run
    return steps + 2     # start, the metric records, finish


def _runs(uri: str) -> dict:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sync")
    if exp is None:
        return {}
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}


def test_sync_walks_a_study_folder_and_lists_what_it_delivered(stores, tmp_path, capsys):
    first, second = stores
    study = tmp_path / "studies" / "s"
    records = {name: _run_folder(study / name, first, name) for name in ("run-a", "run-b")}
    before = {p.relative_to(tmp_path) for p in tmp_path.rglob("*")}

    assert main(["sync", str(tmp_path / "studies"), "--tracking-uri", second]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["journals"] == 2 and out["delivered"] == sum(records.values())
    assert out["pending"] == out["failed"] == out["busy"] == out["quarantined"] == 0
    assert [Path(f["folder"]) for f in out["folders"]] == [study / n / "tracking" for n in ("run-a", "run-b")]
    assert [f["delivered"] for f in out["folders"]] == [records["run-a"], records["run-b"]]
    runs = _runs(second)
    assert sorted(runs) == ["run-a", "run-b"] and all(r.info.status == "FINISHED" for r in runs.values())
    # only delivery state was added: no lock or state file for metrics.jsonl, nothing outside tracking/
    added = {p for p in tmp_path.rglob("*") if p.relative_to(tmp_path) not in before}
    assert added and all(p.parent.name == "tracking" and p.name.endswith(".state.json") for p in added), added


def test_sync_given_a_run_folder_reads_only_its_journal(stores, tmp_path):
    first, second = stores
    run = tmp_path / "run-c"
    n = _run_folder(run, first, "run-c")
    counts = sync_journal(run, uri=second)
    assert counts["journals"] == 1 and counts["delivered"] == n and counts["failed"] == 0
    assert not (run / "metrics.lock").exists() and not list(run.glob("metrics.state*"))
    assert "run-c" in _runs(second)
    assert sync_journal(run, uri=second)["delivered"] == 0   # idempotent


def test_sync_of_a_folder_without_journals_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    assert main(["sync", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no tracking journal" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]   # no lock file left


def test_torn_journal_lines_are_quarantined_once_and_the_rest_delivered(stores, tmp_path):
    first, second = stores
    run = tmp_path / "run-torn"
    n = _run_folder(run, first, "run-torn", steps=4)
    (journal,) = [p for p in (run / "tracking").iterdir() if JOURNAL_NAME.fullmatch(p.name)]
    lines = journal.read_bytes().split(b"\n")[:-1]
    # a crash tore a record in the middle (the next append glued onto it), and another at the end
    torn_middle = lines[2][: len(lines[2]) // 2] + lines[3]
    torn_tail = lines[-1][:10]
    journal.write_bytes(b"\n".join(lines[:2] + [torn_middle] + lines[4:-1]) + b"\n" + torn_tail)

    counts = sync_journal(run, uri=second)
    assert counts["quarantined"] == 2 and counts["failed"] == 0 and counts["pending"] == 0
    assert counts["delivered"] == n - 3   # lines 2, 3 (glued) and the finish record were lost to the tears
    side = journal.with_suffix(".quarantine").read_bytes().split(b"\n")
    assert side[1] == torn_middle and side[3] == torn_tail
    from mlflow import MlflowClient

    run_id = _runs(second)["run-torn"].info.run_id
    history = sorted((m.step, m.value) for m in MlflowClient(second).get_metric_history(run_id, "train/loss"))
    assert history == [(0, 5.0), (3, 2.0)]   # steps 1 and 2 were on the torn lines
    again = sync_journal(run, uri=second)     # not retried: the offset moved past them
    assert again["quarantined"] == 0 and again["delivered"] == 0 and again["pending"] == 0
