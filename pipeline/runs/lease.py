"""One driver at a time: the lease a study or search driver holds on its state for its whole run.

A study's state is its folder; a search's is its Optuna study (storage URL + study name). The lease is
the run-folder lock of `pipeline.runs.lock` on a file beside that state: for a SQLite storage, beside the
database file (every driver of that study, whatever its out_dir, meets there); for a server storage
(PostgreSQL), in the search's folder. Drivers on other machines sharing a server storage are not seen by
a file lock; there Optuna's heartbeats keep each driver from taking the other's live trials for stale.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pipeline.runs.lock import exclusive

DRIVER_LOCK_FILE = "driver.lock"


def study_lease(folder: str | Path):
    """Held by `attamba study` on its study folder (out_dir/name)."""
    return exclusive(Path(folder) / DRIVER_LOCK_FILE, f"study folder {str(folder)!r}",
                     "wait for that study driver to end (or stop it), or give the study another name or out_dir")


def search_lock_path(storage_url: str, study_name: str, folder: str | Path) -> Path:
    """Where the lease of search `study_name` in `storage_url` lives (see the module docstring)."""
    if storage_url.startswith("sqlite:///") and not storage_url.endswith(":memory:"):
        db = Path(storage_url[len("sqlite:///"):]).resolve()
        return db.with_name(f"{db.name}.{study_name}.{DRIVER_LOCK_FILE}")
    key = hashlib.sha256(f"{storage_url}\n{study_name}".encode()).hexdigest()[:16]
    return Path(folder) / f"driver-{key}.lock"


def search_lease(storage_url: str, study_name: str, folder: str | Path, shown_url: str):
    """Held by `attamba search` on its Optuna study; `shown_url` is the storage URL with its password hidden."""
    return exclusive(search_lock_path(storage_url, study_name, folder),
                     f"search {study_name!r} in {shown_url}",
                     "wait for that search driver to end (or stop it); a second driver would take its "
                     "running trials for stale")
