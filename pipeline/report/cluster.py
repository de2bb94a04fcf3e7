"""The cluster view: where each run trained, attempt by attempt, so a preemption shows where it happened.

Fed by the study driver with each run's attempts (`pipeline.runs.markers.placements`: plain dicts read from
the run folder's attempt records), since MLflow does not hold them. One row per attempt: the Ray node (IP,
hostname, node id), when it started and ended, the steps it trained (from the checkpoint step it resumed
from to the last step it reached) and how it ended. An attempt that resumed below the step its predecessor
reached replayed the difference; the row says so.
"""
from __future__ import annotations

import time

import pandas as pd

from pipeline.report.empty import empty

TITLE = "Where each run trained (cluster view: Ray node and steps of every attempt)"
NOT_GIVEN = ("not known here: the attempts are in each run folder's study_attempts.jsonl, which `attamba study` "
             "reads for its report and timing JSON; `attamba report` reads MLflow (or a saved runs.csv) only")
NODE_ID_CHARS = 12


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t is not None else "?"


def _steps(attempt: dict, reached_before: int | None) -> str:
    """`80 -> 400`, with what the start means: `resumed from 80, 7 replayed` after a lost attempt."""
    start, last = attempt.get("resume_step"), attempt.get("last_step")
    text = f"{'?' if start is None else start} -> {'?' if last is None else last}"
    if start:
        text += f" (resumed from the checkpoint at step {start}"
        if reached_before is not None and reached_before > start:
            text += f"; steps {start + 1}-{reached_before} replayed"
        text += ")"
    return text


def cluster_table(attempts: dict[str, list[dict]] | None) -> pd.DataFrame:
    """One row per attempt of each run (run name -> its attempts, oldest first), runs in the given order."""
    if attempts is None:
        return empty(NOT_GIVEN)
    rows = []
    for run, tries in attempts.items():
        reached = None
        for a in tries:
            status = a.get("status") or "running"
            if a.get("died"):
                status += " (its process or node was lost)"
            rows.append({"run": run, "attempt": a.get("attempt"), "node": a.get("node_ip") or "?",
                         "host": a.get("host") or "?", "node id": (a.get("node_id") or "?")[:NODE_ID_CHARS],
                         "start (UTC)": _clock(a.get("start")), "end (UTC)": _clock(a.get("end")),
                         "steps": _steps(a, reached), "status": status})
            if a.get("last_step") is not None:
                reached = a["last_step"]
            if len(a.get("nodes") or ()) > 1:   # a run of 2+ workers: each rank's node, rank order
                rows[-1]["ranks' nodes"] = ", ".join((n or "?")[:NODE_ID_CHARS] for n in a["nodes"])
    if not rows:
        return empty("no run of this study has trained yet")
    return pd.DataFrame(rows).fillna("")
