"""The Tune callback that draws a study's progress board: Tune's trial events reach the board under each
trial's name, and a board without names to draw under is refused when the run is declared."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest

from pipeline.ray.tune import TuneRun, _progress_callback
from pipeline.runs.progress import ProgressBoard
from pipeline.runs.resources import Resources


def _trial(name: str) -> SimpleNamespace:
    return SimpleNamespace(config={"run": name})


def test_tune_events_reach_the_board_under_each_trials_name():
    from ray import tune

    board = ProgressBoard("demo", {"A": (10, 1.0), "B": (10, 1.0)}, io.StringIO(), tty=False)
    callback = _progress_callback(board, lambda config: config["run"].upper())   # the run's trial_name
    assert isinstance(callback, tune.Callback)
    callback.on_trial_start(0, [], _trial("a"))
    callback.on_trial_result(0, [], _trial("a"), {"step": 4})
    callback.on_trial_start(0, [], _trial("b"))
    callback.on_trial_error(0, [], _trial("b"))
    assert (board.trials["A"].status, board.trials["A"].step) == ("running", 4)
    assert board.trials["B"].status == "failed"
    callback.on_trial_recover(0, [], _trial("b"))
    callback.on_trial_complete(0, [], _trial("a"))
    assert (board.trials["A"].status, board.trials["A"].step) == ("done", 10)
    assert board.trials["B"].status == "running"


def test_a_progress_board_needs_trial_names(tmp_path):
    board = ProgressBoard("demo", {"a": (10, 1.0)}, io.StringIO(), tty=False)
    with pytest.raises(ValueError, match="trial_name"):
        TuneRun(print, Resources(), tmp_path, "tune", progress=board)
    assert TuneRun(print, Resources(), tmp_path, "tune", progress=board, trial_name=str).progress is board
