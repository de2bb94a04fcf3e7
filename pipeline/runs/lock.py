"""One writer per folder: an exclusive `flock` held for as long as a run (or a driver) writes there.

The lock file holds the holder's PID, host and start time, so a refused second process can say who
writes. The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
stopped run never leaves a stale lock behind; the file itself stays (removing it would let two processes
lock two different files of one name). Linux `flock` also works on NFS v4 shares, with the server
keeping the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch.distributed as dist

RUN_LOCK_FILE = "train.lock"   # in a run's out_dir, held by rank 0 for the whole of `train()`


def holder(path: Path) -> dict:
    """What the lock file at `path` says about its holder ({} while a holder is still writing it)."""
    for _ in range(20):  # the holder writes right after locking; give it a moment
        try:
            text = Path(path).read_text()
            if text.strip():
                return json.loads(text)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, what: str, fix: str):
    """Hold an exclusive lock on `path` (created with its folder) for the body; raise at once a
    ValueError naming `what`, the holder's PID and host and `fix` when another process holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = holder(path)
            raise ValueError(f"{what} is in use by process {who.get('pid', '?')} on host {who.get('host', '?')} "
                             f"(since {who.get('since', '?')}; lock file {path}); {fix}") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
        f.flush()
        yield path
    finally:
        f.close()  # closing the only descriptor releases the flock


def _rank() -> int:
    """This process's rank: from the process group when there is one (Ray Train sets it up before
    `train`), else from the launcher's RANK (torchrun, deepspeed), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


@contextlib.contextmanager
def run_folder(out_dir: str | os.PathLike):
    """Rank 0 holds the run folder's lock for the body; other ranks of the same run write there under
    rank 0's lead and take none (their launcher or Ray Train stops them when rank 0 fails)."""
    if _rank() != 0:
        yield None
        return
    with exclusive(Path(out_dir) / RUN_LOCK_FILE, f"run folder {str(out_dir)!r}",
                   "wait for that run to end, or give this run another train.out_dir") as path:
        yield path
