"""Where a driver's wall time went (training steps against start-up, evaluation and scheduling), read from
the markers of each run's folder, with where each run trained (`placements`: the Ray node and steps of every
attempt)."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.runs.markers import done_record, placements, read_attempts


def timing_summary(out_dirs: dict[str, Path], wall_s: float, slots: int) -> dict:
    """Per trial and in all, from the done marker and attempt records of each run (name -> its folder);
    each trial's `placements` lists where every attempt of its run trained (this call's and earlier ones).

    step_fraction = sum over trials of time inside training steps / (wall time x concurrent trial slots)."""
    per_run = {}
    for name, out_dir in out_dirs.items():
        marker = done_record(out_dir)
        attempts = [a for a in read_attempts(out_dir) if a["event"] == "attempt"]
        if marker is None or not attempts:
            continue
        steps_s = float(marker["steps_s"])
        first_step = marker.get("first_step_start")
        last = attempts[-1]
        per_run[name] = {
            "trial_s": sum(a["end"] - a["start"] for a in attempts if "end" in a),
            "steps_s": steps_s,
            # from the attempt's start (its process's start for the first trial in a process) to its
            # first training step: imports, workers, process group, DeepSpeed
            "startup_s": (first_step - last["start"]) if first_step else float("nan"),
            "attempts": len(attempts),
            "placements": placements(out_dir),
        }
    steps = [r["steps_s"] for r in per_run.values() if math.isfinite(r["steps_s"])]
    startups = [r["startup_s"] for r in per_run.values() if math.isfinite(r["startup_s"])]
    total_steps = sum(steps)
    return {
        "wall_s": wall_s,
        "slots": slots,
        "trials_timed": len(per_run),
        "steps_s": total_steps,
        "step_fraction": total_steps / (wall_s * slots) if wall_s > 0 else float("nan"),
        "startup_s_mean": sum(startups) / len(startups) if startups else float("nan"),
        "startup_s_max": max(startups) if startups else float("nan"),
        "per_run": per_run,
    }


def timing_line(timing: dict, n_runs: int) -> str:
    """One line for the log, with no NaN in it: what was timed, or that nothing was trained this time."""
    wall = f"wall {timing['wall_s']:.0f} s"
    if not timing["trials_timed"]:
        return f"{wall}, nothing trained (all {n_runs} runs had already finished); start-up: none timed"
    startup = timing["startup_s_mean"]
    startup = f"start-up {startup:.1f} s per trial" if math.isfinite(startup) else "start-up: not recorded"
    return (f"{wall}, {100 * timing['step_fraction']:.0f}% of {timing['slots']} slot(s) in training steps, "
            f"{startup} ({timing['trials_timed']} trials timed)")
