"""Disk space for checkpoints: what the next one takes, a warning before it cannot fit, and a full disk
during a save told in one line (the folder, the bytes needed and free) instead of torch's "unexpected pos".
"""

from __future__ import annotations

import errno
import os
import resource
import shutil
from pathlib import Path


class StorageFull(OSError):
    """A checkpoint did not fit: its disk was full (or a quota or the process's file size limit was hit).
    `strerror` is the one-line explanation: the folder, the bytes needed and free, what to do."""


_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def existing(path: Path) -> Path:
    """`path`, or its nearest parent that exists."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes free to this process on the file system holding `path` (or its nearest existing parent)."""
    return shutil.disk_usage(existing(path)).free


def folder_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def estimate_bytes(n_params: int, bf16: bool, tokenizer_path: str | None) -> tuple[int, str]:
    """(bytes, basis) of a first checkpoint, from the parameter count: model.pt in fp32, DeepSpeed's weights
    in the training precision, AdamW's two fp32 moments and, under bf16, an fp32 master copy."""
    per_param = 4 + (2 + 4 if bf16 else 4) + 8
    tokenizer = os.path.getsize(tokenizer_path) if tokenizer_path and os.path.isfile(tokenizer_path) else 0
    return n_params * per_param + tokenizer, f"{n_params:,} parameters x {per_param} bytes"


def size(n: int, basis: str | None = None) -> str:
    return f"{n:,} bytes ({n / 2**20:.1f} MiB{', ' + basis if basis else ''})"


def room_warning(folder: Path, need: int, basis: str, step: int) -> str | None:
    """A warning when the checkpoint of `step` (about `need` bytes) will not fit in `folder`; None if it will."""
    free = free_bytes(folder)
    if free >= need:
        return None
    return (f"the checkpoint of step {step} will not fit: it needs about {size(need, basis)} and "
            f"{existing(folder)} has {size(free)} free; free space there or move train.out_dir to a bigger disk "
            f"before then")


def _file_size_limit() -> int | None:
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def save_failure(error: BaseException | None, directory: Path, step: int, need: int, basis: str,
                 free_before: int) -> str | None:
    """Why the save into `directory` failed when space is the reason (a full disk, a quota, the file size
    limit), else None; either way the unsealed folder is deleted, giving back what the partial save took.
    `free_before`: the bytes free when the save began."""
    free_now = free_bytes(directory)
    largest = max((p.stat().st_size for p in directory.rglob("*") if p.is_file()), default=0) \
        if directory.is_dir() else 0
    shutil.rmtree(directory, ignore_errors=True)
    limit = _file_size_limit()
    code = error.errno if isinstance(error, OSError) else None
    low = free_before < need or free_now < min(need, 2**20)
    if limit is not None and not low and (largest >= limit or code == errno.EFBIG):
        return (f"checkpoint step {step} could not be written: a file of it reached this process's file size "
                f"limit (ulimit -f) of {size(limit)} in {existing(directory.parent)}; it needs about "
                f"{size(need, basis)} in all; raise the limit")
    full = low or code in _SPACE_ERRNOS
    if not full:
        return None
    return (f"checkpoint step {step} could not be written: no space left in {existing(directory.parent)}: it "
            f"needs about {size(need, basis)}, {size(free_before)} were free; free space there or set "
            f"train.out_dir on a bigger disk")
