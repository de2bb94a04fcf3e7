"""What a person watching a study sees: one line per running trial and an overall line, redrawn in place on
a terminal and printed as plain lines every `interval` seconds elsewhere (a log file, `ray job logs`).

Pure Python and fed by the Tune callback in `pipeline.ray.tune`: a trial's reports (step, tokens/s, its
latest validation loss) come in through `reported`, its end through `finished`, a retry through `retried`.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from pipeline import schema


def _loss(value: float | None, missing: str) -> str:
    """`val/loss 4.712`, `missing` before the first evaluation, and never `nan` (a diverged run)."""
    if value is None:
        return missing
    return f"val/loss {value:.3f}" if math.isfinite(value) else "val/loss not finite"

REDRAW_S = 0.5        # a terminal is redrawn at most this often


@dataclass
class TrialState:
    total_steps: int
    work: float                    # the run's share of the study's work (its training FLOPs): the overall ETA
    status: str = "pending"        # pending, running, done, failed
    step: int = 0
    tokens_per_s: float | None = None
    val_loss: float | None = None
    samples: list = field(default_factory=list)  # (time, step) of this attempt's first and latest reports


def duration(seconds: float | None) -> str:
    """`1:05`, `1:02:03`, or `?` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class ProgressBoard:
    """The board of one study: `runs` maps each run to train (name -> (total steps, work))."""

    def __init__(self, study: str, runs: dict[str, tuple[int, float]], stream: TextIO | None = None, *,
                 tty: bool | None = None, interval: float = 30.0, clock=time.monotonic, width: int = 24):
        self.study = study
        self.trials = {name: TrialState(int(steps), float(work)) for name, (steps, work) in runs.items()}
        self.stream = stream if stream is not None else sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.clock = clock
        self.width = width
        self.start = clock()
        self._drawn = 0            # lines of the board now on the terminal, below the cursor's line
        self._last_draw = -math.inf

    # ---- events ---------------------------------------------------------------------------------------

    def started(self, name: str) -> None:
        trial = self.trials[name]
        trial.status, trial.samples = "running", []
        self.refresh()

    def reported(self, name: str, result: dict) -> None:
        """A report of trial `name`: its step and, when present, tokens/s and validation loss."""
        trial = self.trials[name]
        if trial.status == "pending":
            trial.status = "running"
        if "step" in result:
            trial.step = int(result["step"])
            sample = (self.clock(), trial.step)
            trial.samples = [trial.samples[0], sample] if trial.samples else [sample]
        if schema.M_TOKENS_PER_S in result:
            trial.tokens_per_s = float(result[schema.M_TOKENS_PER_S])
        if schema.M_VAL_LOSS in result:
            trial.val_loss = float(result[schema.M_VAL_LOSS])
        self.refresh()

    def finished(self, name: str, ok: bool) -> None:
        trial = self.trials[name]
        trial.status = "done" if ok else "failed"
        if ok:
            trial.step = trial.total_steps
            loss = _loss(trial.val_loss, "no val/loss")
            self.note(f"  done   {name}: {loss}")
        else:
            self.note(f"  FAILED {name}")

    def retried(self, name: str) -> None:
        trial = self.trials[name]
        trial.status, trial.samples = "running", []
        self.note(f"  retry  {name} (resumes from its last checkpoint)")

    # ---- what is shown --------------------------------------------------------------------------------

    def trial_eta(self, trial: TrialState) -> float | None:
        """Seconds left at this attempt's measured speed (evaluations included); None before two reports."""
        if len(trial.samples) < 2:
            return None
        (t0, s0), (t1, s1) = trial.samples
        if s1 <= s0 or t1 <= t0:
            return None
        return (trial.total_steps - trial.step) * (t1 - t0) / (s1 - s0)

    def study_eta(self) -> float | None:
        """Seconds left at the study's measured speed: work done (finished runs and the done part of running
        ones) per second of wall time so far, start-up included, against the work left."""
        total = sum(t.work for t in self.trials.values())
        done = sum(t.work if t.status in ("done", "failed") else t.work * t.step / max(1, t.total_steps)
                   for t in self.trials.values())
        elapsed = self.clock() - self.start
        if done <= 0 or elapsed <= 0:
            return None
        return (total - done) * elapsed / done

    def lines(self) -> list[str]:
        """The overall line, then one line per running trial."""
        finished = sum(t.status in ("done", "failed") for t in self.trials.values())
        total = len(self.trials)
        filled = round(self.width * finished / total) if total else self.width
        failed = sum(t.status == "failed" for t in self.trials.values())
        head = (f"study {self.study} [{'#' * filled}{'.' * (self.width - filled)}] {finished}/{total} runs"
                f"{f' ({failed} failed)' if failed else ''}  elapsed {duration(self.clock() - self.start)}"
                f"  ETA {duration(self.study_eta())}")
        rows = [head]
        for name, t in self.trials.items():
            if t.status != "running":
                continue
            if not t.samples:
                rows.append(f"  {name}  starting (step {t.step}/{t.total_steps})")
                continue
            speed = (f"{t.tokens_per_s:,.0f} tok/s" if t.tokens_per_s is not None and math.isfinite(t.tokens_per_s)
                     else "? tok/s")
            loss = _loss(t.val_loss, "val/loss -")
            rows.append(f"  {name}  step {t.step}/{t.total_steps}  {speed}  {loss}  ETA {duration(self.trial_eta(t))}")
        return rows

    # ---- drawing --------------------------------------------------------------------------------------

    def refresh(self, force: bool = False) -> None:
        """Redraw the board (terminal, at most every REDRAW_S) or print it (elsewhere, every `interval`)."""
        now = self.clock()
        if not force and now - self._last_draw < (REDRAW_S if self.tty else self.interval):
            return
        self._last_draw = now
        if self.tty:
            self._erase()
            rows = self.lines()
            self.stream.write("".join(row + "\n" for row in rows))
            self._drawn = len(rows)
        else:
            self.stream.write("".join(row + "\n" for row in self.lines()))
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line that stays (a trial finished, retried or failed), printed above the board."""
        if self.tty:
            self._erase()
            self.stream.write(text + "\n")
            self._drawn = 0
            self.refresh(force=True)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        """The final board, left on screen (terminal) or printed once more (elsewhere)."""
        self.refresh(force=True)

    def _erase(self) -> None:
        if self._drawn:
            # to the start of the board's first line, then clear to the end of the screen
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0
