"""Where a study's wall time went (training steps against start-up, evaluation and scheduling) and where
each run trained (`placements`: the Ray node and steps of every attempt)."""

from __future__ import annotations

import math
from pathlib import Path

from pipeline.runs.markers import done_record, read_attempts
from pipeline.study.spec import RunSpec


def placements(out_dir: Path) -> list[dict]:
    """Where each attempt of a run trained, oldest first, from its attempt records: attempt (1, 2, ...),
    node_id, node_ip, host and pid of rank 0, nodes (every rank's node id), start and end (epoch seconds),
    status (finished, failed, or running: no end record yet), died (its process or node was lost),
    resume_step (the checkpoint step it began from) and last_step (the last step it reached). Records written
    before nodes were recorded give None for what they lack; an attempt that ended before calling `train`
    has no node."""
    records = read_attempts(out_dir)
    trains = {r.get("attempt_start"): r for r in records if r["event"] == "train"}
    ends = [r for r in records if r["event"] == "attempt"]
    done = done_record(out_dir)
    out = []
    for end in ends:
        out.append(_placement(trains.pop(end["start"], {}), end))
    out += [_placement(train, {}) for train in trains.values()]     # under way, or records without a start
    out.sort(key=lambda p: p["start"] if p["start"] is not None else float("inf"))
    for i, p in enumerate(out, 1):
        p["attempt"] = i
    if out and out[-1]["status"] == "finished" and done is not None:
        out[-1]["resume_step"] = done["result"].get("start_step", out[-1]["resume_step"])  # train's own word
    return out


def _placement(train: dict, end: dict) -> dict:
    return {"attempt": None, "node_id": train.get("node_id"), "node_ip": train.get("node_ip"),
            "host": train.get("host"), "pid": train.get("pid"), "nodes": train.get("nodes"),
            "start": end.get("start", train.get("attempt_start", train.get("time"))), "end": end.get("end"),
            "status": end.get("status", "running"), "died": bool(end.get("died")),
            "resume_step": train.get("resume_step"), "last_step": end.get("last_step")}


def timing_summary(specs: list[RunSpec], wall_s: float, slots: int) -> dict:
    """Per trial and in all, from each run's done marker and attempt records; each trial's `placements`
    lists where every attempt of its run trained (this call's and earlier ones).

    step_fraction = sum over trials of time inside training steps / (wall time x concurrent trial slots)."""
    per_run = {}
    for spec in specs:
        marker = done_record(spec.out_dir)
        attempts = [a for a in read_attempts(spec.out_dir) if a["event"] == "attempt"]
        if marker is None or not attempts:
            continue
        steps_s = float(marker["steps_s"])
        first_step = marker.get("first_step_start")
        last = attempts[-1]
        per_run[spec.name] = {
            "trial_s": sum(a["end"] - a["start"] for a in attempts if "end" in a),
            "steps_s": steps_s,
            # from the attempt's start (its process's start for the first trial in a process) to its
            # first training step: imports, workers, process group, DeepSpeed
            "startup_s": (first_step - last["start"]) if first_step else float("nan"),
            "attempts": len(attempts),
            "placements": placements(spec.out_dir),
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
