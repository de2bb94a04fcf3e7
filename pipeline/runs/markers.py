"""The markers in a run's folder that say how its trial attempts went, written by `pipeline/ray/trainer.py`
around `train` and read by the drivers: the done file (the run finished) and the attempts file (one line
per attempt's start and end), and `placements`, where each attempt of a run trained, read from them."""

from __future__ import annotations

import json
from pathlib import Path

DONE_FILE = "study_done.json"       # written by rank 0 after `train` returned: the run is finished
ATTEMPTS_FILE = "study_attempts.jsonl"  # per trial attempt: a "train" line when rank 0 calls train (its
                                        # pid, host, Ray node, the step it resumes from) and an "attempt"
                                        # line when the attempt ends (status, the last step it reached)


def read_attempts(out_dir: Path) -> list[dict]:
    """The lines of a run's attempts file, oldest first: "train" events (rank 0 started training: time,
    pid, host, node_id and node_ip of its Ray node, `nodes` (every rank's node id, rank order), resume_step)
    and "attempt" events (a trial attempt ended: start, end, status, last_step)."""
    path = Path(out_dir) / ATTEMPTS_FILE
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # lines written before events were named are attempts
    return [{"event": "attempt", **r} if "event" not in r else r for r in records]


def done_record(out_dir: Path) -> dict | None:
    """What rank 0 wrote when `train` returned (result, loop times, step seconds); None if unfinished."""
    path = Path(out_dir) / DONE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


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


def is_done(out_dir: Path) -> bool:
    return (Path(out_dir) / DONE_FILE).is_file()


def append_line(path: Path, record: dict) -> None:
    """Add `record` as one JSON line to `path` (made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # O_APPEND: concurrent writers of one short line do not interleave
        f.write(json.dumps(record) + "\n")
