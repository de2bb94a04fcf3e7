"""What a person watching a study sees: the progress board on fake trial states (a terminal redrawn in
place, a log's plain lines every `interval` seconds, per-trial and study ETAs from measured speed)."""

from __future__ import annotations

import io
import re

import pytest

from pipeline import schema
from pipeline.runs.progress import ProgressBoard, duration

RUNS = {"small": (100, 1.0), "large": (100, 3.0)}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _board(tty: bool, interval: float = 30.0):
    clock, out = Clock(), io.StringIO()
    return ProgressBoard("demo", RUNS, out, tty=tty, interval=interval, clock=clock), clock, out


def test_duration_reads_as_minutes_and_hours():
    assert [duration(s) for s in (0, 5, 65, 3723)] == ["0:00", "0:05", "1:05", "1:02:03"]
    assert duration(None) == "?" and duration(float("nan")) == "?" and duration(-1) == "?"


def test_lines_show_each_running_trial_with_step_speed_loss_and_eta():
    board, clock, _ = _board(tty=False)
    board.started("small")
    board.started("large")
    assert board.lines()[1:] == ["  small  starting (step 0/100)", "  large  starting (step 0/100)"]
    clock.now += 10
    board.reported("small", {"step": 10, schema.M_TOKENS_PER_S: 2500.0, schema.M_LOSS: 4.0})
    clock.now += 20
    board.reported("small", {"step": 30, schema.M_VAL_LOSS: 3.25})
    board.reported("large", {"step": 5, schema.M_TOKENS_PER_S: 800.0})
    head, *rows = board.lines()
    # 20 steps in 20 s: 70 steps left -> 70 s; the large run has one report only: no speed yet
    assert rows == ["  small  step 30/100  2,500 tok/s  val/loss 3.250  ETA 1:10",
                    "  large  step 5/100  800 tok/s  val/loss -  ETA ?"]
    # work done: 1.0 x 0.30 + 3.0 x 0.05 = 0.45 of 4.0 in 30 s -> 3.55 / 0.45 x 30 s = 236.7 s left
    assert head == "study demo [........................] 0/2 runs  elapsed 0:30  ETA 3:57"


def test_a_diverged_runs_loss_reads_not_finite_never_nan():
    board, clock, out = _board(tty=False)
    board.started("small")
    clock.now += 10
    board.reported("small", {"step": 10, schema.M_TOKENS_PER_S: 2500.0, schema.M_VAL_LOSS: float("nan")})
    assert "val/loss not finite" in board.lines()[1]
    board.finished("small", ok=True)
    assert "  done   small: val/loss not finite\n" in out.getvalue() and "nan" not in out.getvalue().lower()


def test_finished_runs_fill_the_bar_and_leave_the_running_lines():
    board, clock, out = _board(tty=False)
    for name in RUNS:
        board.started(name)
    clock.now += 40
    board.reported("small", {"step": 100, schema.M_VAL_LOSS: 2.5})
    board.finished("small", ok=True)
    board.reported("large", {"step": 50})
    head, *rows = board.lines()
    assert head.startswith("study demo [############............] 1/2 runs  elapsed 0:40")
    # 1.0 + 1.5 of 4.0 done in 40 s -> 1.5 / 2.5 x 40 = 24 s
    assert head.endswith("ETA 0:24") and [r.split()[0] for r in rows] == ["large"]
    board.finished("large", ok=False)
    head, *rows = board.lines()
    assert "2/2 runs (1 failed)" in head and "ETA 0:00" in head and rows == []
    assert "  done   small: val/loss 2.500\n" in out.getvalue() and "  FAILED large\n" in out.getvalue()


def test_a_retried_trial_measures_its_speed_again():
    board, clock, out = _board(tty=False)
    board.started("small")
    board.reported("small", {"step": 10})
    clock.now += 10
    board.reported("small", {"step": 20})
    assert board.trial_eta(board.trials["small"]) == pytest.approx(80.0)
    board.retried("small")
    assert "  retry  small (resumes from its last checkpoint)\n" in out.getvalue()
    board.reported("small", {"step": 20})  # resumed from its checkpoint at step 20
    assert board.trial_eta(board.trials["small"]) is None
    clock.now += 5
    board.reported("small", {"step": 30})
    assert board.trial_eta(board.trials["small"]) == pytest.approx(35.0)


def test_without_a_terminal_the_board_is_printed_as_plain_lines_every_interval():
    board, clock, out = _board(tty=False, interval=30.0)
    board.started("small")                      # first board at once
    for _ in range(5):                          # reports within the interval print nothing
        clock.now += 5
        board.reported("small", {"step": board.trials["small"].step + 5})
    printed = out.getvalue()
    assert printed.count("study demo [") == 1
    clock.now += 6                              # 31 s after the first board
    board.refresh()
    printed = out.getvalue()
    assert printed.count("study demo [") == 2 and "  small  step 25/100" in printed
    assert "\x1b" not in printed and "\r" not in printed   # nothing but plain lines in a log


def test_on_a_terminal_the_board_is_redrawn_in_place():
    board, clock, out = _board(tty=True)
    board.started("small")                      # head + one running trial: 2 lines drawn
    first = out.getvalue()
    assert first.count("\n") == 2 and "\x1b" not in first
    clock.now += 1
    board.reported("small", {"step": 10})
    redraw = out.getvalue()[len(first):]
    # back to the board's first line, clear below, draw it again
    assert redraw.startswith("\x1b[2F\x1b[J") and "  small  step 10/100" in redraw
    clock.now += 0.1                            # within REDRAW_S: not redrawn
    board.reported("small", {"step": 11})
    assert out.getvalue() == first + redraw
    board.started("large")                      # a new trial: 3 lines next time
    clock.now += 1
    board.refresh()
    assert out.getvalue()[len(first + redraw):].startswith("\x1b[2F\x1b[J")
    board.finished("small", ok=True)            # a note goes above the board, which is drawn below it
    tail = out.getvalue().split("  done   small")[1]
    assert out.getvalue().split("  done   small")[0].endswith("\x1b[3F\x1b[J")
    assert re.search(r"study demo \[#+\.+\] 1/2 runs", tail) and "  large  starting (step 0/100)" in tail


