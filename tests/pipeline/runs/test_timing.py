"""The study's timing line and JSON say what happened without NaN, also when a resubmitted study had
nothing left to train."""
import json
import math
from pathlib import Path

import pytest

from pipeline.cli import _print_json
from pipeline.runs.markers import ATTEMPTS_FILE, DONE_FILE
from pipeline.runs.markers import placements
from pipeline.runs.timing import timing_line, timing_summary


def test_a_study_with_nothing_left_to_train_says_so_and_prints_no_nan(capsys):
    timing = timing_summary({}, 41.7, 2)   # every run had finished before: none trained, none timed
    assert timing["trials_timed"] == 0 and math.isnan(timing["startup_s_mean"])
    line = timing_line(timing, 12)
    assert line == "wall 42 s, nothing trained (all 12 runs had already finished); start-up: none timed"
    assert "nan" not in line.lower()
    _print_json({"timing": timing})
    out = capsys.readouterr().out
    strict = json.loads(out, parse_constant=lambda name: pytest.fail(f"non-strict constant {name}"))
    assert strict["timing"]["startup_s_mean"] is None and strict["timing"]["startup_s_max"] is None


def test_a_timed_study_gives_its_step_share_and_start_up():
    timing = {"wall_s": 300.2, "slots": 2, "trials_timed": 4, "step_fraction": 0.9, "startup_s_mean": 4.38}
    assert timing_line(timing, 4) == ("wall 300 s, 90% of 2 slot(s) in training steps, start-up 4.4 s per trial "
                                      "(4 trials timed)")
    timing["startup_s_mean"] = float("nan")   # runs whose first step was not recorded
    assert timing_line(timing, 4).endswith("start-up: not recorded (4 trials timed)")


def _attempts(folder: Path, *records: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ATTEMPTS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


A, B = "a" * 56, "b" * 56


def test_placements_say_where_each_attempt_trained_and_from_which_step(tmp_path):
    """A run whose node was lost at step 87 after a checkpoint at 80, resumed on another node; another run
    still under way; one recorded before nodes were."""
    lost = tmp_path / "lost"
    _attempts(lost,
              {"event": "train", "run": "lost", "time": 101.0, "pid": 7, "host": "w1", "workers": 1, "node_id": A,
               "node_ip": "10.0.0.1", "nodes": [A], "resume_step": 0, "attempt_start": 100.0},
              {"event": "attempt", "run": "lost", "start": 100.0, "end": 160.0, "status": "failed", "died": True,
               "last_step": 87},
              {"event": "train", "run": "lost", "time": 201.0, "pid": 9, "host": "w2", "workers": 1, "node_id": B,
               "node_ip": "10.0.0.2", "nodes": [B], "resume_step": 80, "attempt_start": 200.0},
              {"event": "attempt", "run": "lost", "start": 200.0, "end": 300.0, "status": "finished", "last_step": 400})
    (lost / DONE_FILE).write_text(json.dumps({"result": {"start_step": 80}}))
    tries = placements(lost)
    assert [(p["attempt"], p["node_ip"], p["host"], p["status"], p["died"], p["resume_step"], p["last_step"])
            for p in tries] == [(1, "10.0.0.1", "w1", "failed", True, 0, 87), (2, "10.0.0.2", "w2", "finished", False,
                                                                                 80, 400)]
    assert (tries[0]["start"], tries[0]["end"], tries[1]["node_id"]) == (100.0, 160.0, B)

    running = tmp_path / "running"
    _attempts(running, {"event": "train", "run": "running", "time": 5.0, "pid": 3, "host": "w1", "workers": 2,
                        "node_id": A, "node_ip": "10.0.0.1", "nodes": [A, B], "resume_step": 0, "attempt_start": 4.0})
    (now,) = placements(running)
    assert (now["status"], now["end"], now["nodes"]) == ("running", None, [A, B])
    old = tmp_path / "old"     # attempt records from before nodes and steps were recorded
    _attempts(old, {"event": "train", "run": "old", "time": 2.0, "pid": 3, "host": "h", "workers": 1,
                    "attempt_start": 1.0}, {"run": "old", "start": 1.0, "end": 9.0, "status": "finished"})
    (then,) = placements(old)
    assert (then["host"], then["node_id"], then["resume_step"], then["status"]) == ("h", None, None, "finished")
    assert placements(tmp_path / "never") == []
