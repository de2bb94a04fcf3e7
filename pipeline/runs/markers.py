"""The markers in a run's folder that say how its trial attempts went, written by `pipeline/ray/trainer.py`
around `train` and read by the drivers: the done file (the run finished) and the attempts file (one line
per attempt's start and end)."""

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


def is_done(out_dir: Path) -> bool:
    return (Path(out_dir) / DONE_FILE).is_file()


def append_line(path: Path, record: dict) -> None:
    """Add `record` as one JSON line to `path` (made if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:  # O_APPEND: concurrent writers of one short line do not interleave
        f.write(json.dumps(record) + "\n")
