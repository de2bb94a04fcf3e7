"""The study's timing line and JSON say what happened without NaN, also when a resubmitted study had
nothing left to train."""
import json
import math

import pytest

from pipeline.cli import _print_json
from pipeline.study.timing import timing_line, timing_summary


def test_a_study_with_nothing_left_to_train_says_so_and_prints_no_nan(capsys):
    timing = timing_summary([], 41.7, 2)   # every run had finished before: none trained, none timed
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
