"""The report's cluster view: where each run trained, attempt by attempt, in summary.md and report.html."""
from __future__ import annotations

from pipeline.report import make_report
from pipeline.report.cluster import NOT_GIVEN, TITLE, cluster_table
from tests.pipeline.report.test_report import _log_run, _md_section, mlflow_experiment

A, B = "a" * 56, "b" * 56


def test_the_cluster_view_shows_each_attempts_node_and_steps(tmp_path):
    uri, client, exp_id = mlflow_experiment(tmp_path, "cluster")
    _log_run(client, exp_id, "full-s1-seed0", "full", "full", "s1", 0, "", "", 2.5, 4e5)
    attempts = {"full-s1-seed0": [
        {"attempt": 1, "node_id": A, "node_ip": "10.0.0.1", "host": "spot-1", "nodes": [A], "start": 0.0,
         "end": 60.0, "status": "failed", "died": True, "resume_step": 0, "last_step": 87},
        {"attempt": 2, "node_id": B, "node_ip": "10.0.0.2", "host": "spot-2", "nodes": [B], "start": 90.0,
         "end": 200.0, "status": "finished", "died": False, "resume_step": 80, "last_step": 400}]}
    make_report("cluster", tmp_path / "out", tracking_uri=uri, n_bootstrap=0, attempts=attempts)
    rows = _md_section((tmp_path / "out" / "summary.md").read_text(), TITLE)
    assert [(r["run"], r["attempt"], r["node"], r["host"], r["node id"], r["status"]) for r in rows] == [
        ("full-s1-seed0", "1", "10.0.0.1", "spot-1", A[:12], "failed (its process or node was lost)"),
        ("full-s1-seed0", "2", "10.0.0.2", "spot-2", B[:12], "finished")]
    assert rows[1]["steps"] == "80 -> 400 (resumed from the checkpoint at step 80; steps 81-87 replayed)"
    assert (rows[0]["start (UTC)"], rows[1]["end (UTC)"]) == ("1970-01-01 00:00:00", "1970-01-01 00:03:20")
    html = (tmp_path / "out" / "report.html").read_text()
    assert "spot-2" in html.split(TITLE, 1)[1]

    make_report("cluster", tmp_path / "again", tracking_uri=uri, n_bootstrap=0)   # `attamba report`: MLflow only
    assert NOT_GIVEN in (tmp_path / "again" / "summary.md").read_text().split(TITLE, 1)[1]


def test_every_attempt_is_a_row_also_one_under_way_or_recorded_before_nodes_were():
    lost = {"attempt": 1, "node_id": A, "node_ip": "10.0.0.1", "host": "w1", "nodes": [A], "start": 100.0,
            "end": 160.0, "status": "failed", "died": True, "resume_step": 0, "last_step": 87}
    resumed = {**lost, "attempt": 2, "node_id": B, "nodes": [B], "status": "finished", "died": False,
               "resume_step": 80, "last_step": 400}
    running = {"attempt": 1, "node_id": A, "node_ip": "10.0.0.1", "host": "w1", "nodes": [A, B], "start": 4.0,
               "end": None, "status": "running", "died": False, "resume_step": 0, "last_step": None}
    old = {"attempt": 1, "node_id": None, "node_ip": None, "host": "h", "nodes": None, "start": 1.0, "end": 9.0,
           "status": "finished", "died": False, "resume_step": None, "last_step": None}
    table = cluster_table({"lost": [lost, resumed], "running": [running], "old": [old]})
    assert table["run"].tolist() == ["lost", "lost", "running", "old"]
    assert table["steps"].tolist() == [
        "0 -> 87", "80 -> 400 (resumed from the checkpoint at step 80; steps 81-87 replayed)", "0 -> ?", "? -> ?"]
    assert table["status"].tolist() == ["failed (its process or node was lost)", "finished", "running", "finished"]
    assert table["node id"].tolist() == [A[:12], B[:12], A[:12], "?"]
    assert table["ranks' nodes"].tolist() == ["", "", f"{A[:12]}, {B[:12]}", ""]    # a run of 2 workers
    assert table["start (UTC)"][0] == "1970-01-01 00:01:40" and table["end (UTC)"][2] == "?"
    assert cluster_table(None).attrs["empty_reason"] == NOT_GIVEN
    assert cluster_table({}).attrs["empty_reason"] == "no run of this study has trained yet"
