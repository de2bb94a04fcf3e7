"""The `tracking` config section and the resolution of the tracking URI.

Kept free of MLflow imports: the run config imports this module, and a `NoopTracker` must cost nothing.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attamba.checks import at_least, boolean, fail, positive, safe_name, text

RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
DEFAULT_DB_NAME = "mlflow.db"

# Schemes MLflow 3 serves as tracking stores here; anything else (notably `file:` and bare paths, which
# MLflow reads as the deprecated ./mlruns file store) is refused before a run starts.
_ACCEPTED_SCHEMES = ("sqlite", "http", "https", "postgresql", "mysql", "mssql", "databricks")


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None                 # None -> $MLFLOW_TRACKING_URI -> sqlite:///<cwd>/mlflow.db
    experiment: str = "attamba"
    run_name: str | None = None
    parent_run_id: str | None = None       # nested run of a study: the child gets tag mlflow.parentRunId
    resume_run_id: str | None = None       # a run restarted from a checkpoint continues this MLflow run
    system_metrics: bool = False           # CPU/memory/disk/GPU via MLflow's monitors (needs psutil)
    system_metrics_interval_s: float = 10.0
    journal_dir: str | None = None         # None -> the directory the caller gives (beside checkpoints)
    flush_interval_s: float = 1.0          # how often the delivery thread sends what was journaled
    flush_timeout_s: float = 30.0          # how long finish() waits for undelivered records

    def __post_init__(self):
        boolean("tracking.enabled", self.enabled)
        if self.uri is not None:
            check_uri("tracking.uri", self.uri)
        safe_name("tracking.experiment", self.experiment)   # also the default report folder
        safe_name("tracking.run_name", self.run_name, or_none=True)
        for name in ("parent_run_id", "resume_run_id", "journal_dir"):
            text(f"tracking.{name}", getattr(self, name), or_none=True)
        boolean("tracking.system_metrics", self.system_metrics)
        for name in ("system_metrics_interval_s", "flush_interval_s"):
            positive(f"tracking.{name}", getattr(self, name), finite=True, fix="a number of seconds")
        at_least("tracking.flush_timeout_s", self.flush_timeout_s, 0, finite=True, fix="a number of seconds")
        if self.system_metrics and importlib.util.find_spec("psutil") is None:
            raise ValueError(
                "tracking.system_metrics=true needs psutil, which is not installed: "
                "pip install psutil, or set tracking.system_metrics=false"
            )


def check_uri(field: str, uri: str) -> None:
    """Refuse URIs MLflow 3 would not serve (or would serve from the deprecated ./mlruns file store)."""
    if not isinstance(uri, str) or not uri.strip():
        fail(field, uri, "a non-empty URI", f"e.g. sqlite:///{DEFAULT_DB_NAME}")
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme == "file" or scheme == "":
        raise ValueError(
            f"{field}={uri!r} names an MLflow file store (./mlruns), which MLflow 3 refuses; "
            f"use a database, e.g. sqlite:///{DEFAULT_DB_NAME}, or a server, e.g. http://127.0.0.1:5000"
        )
    if scheme not in _ACCEPTED_SCHEMES:
        raise ValueError(
            f"{field}={uri!r} has an unknown scheme {scheme!r}; use one of "
            f"{', '.join(s + ':' for s in _ACCEPTED_SCHEMES)}"
        )


def sqlite_path(uri: str) -> str | None:
    """The database path of a `sqlite:///PATH` URL (None for other URLs and in-memory databases)."""
    scheme, sep, rest = uri.partition(":///")
    if not sep or not scheme.lower().startswith("sqlite"):
        return None
    db = rest.partition("?")[0]
    return None if not db or db == ":memory:" else db


def check_store(uri: str, field: str = "tracking.uri") -> None:
    """A local SQLite store that can never open fails at once with the reason, instead of being retried as
    if a server were down: its path is a folder, lies under a file, or is in a folder (or is a file) this
    process cannot write. MLflow creates missing folders itself."""
    db = sqlite_path(uri)
    if db is None:
        return
    path = Path(db)
    if path.is_dir():
        raise ValueError(f"{field}={uri!r} names a folder, not a SQLite database file; name a file in it, "
                         f"e.g. sqlite:///{path.resolve() / DEFAULT_DB_NAME}")
    folder = path.absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{field}={uri!r}: {folder} is a file, so the database cannot be created below it; "
                         f"give a path in a folder")
    try:   # permission bits alone do not say it (root, read-only mounts, ACLs): make and remove a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".attamba-store-check-", dir=folder))
    except OSError as error:
        raise ValueError(f"{field}={uri!r}: the folder {folder} does not take new files ({error.strerror or error}); "
                         f"SQLite writes its database and journal there: use a writable folder") from None
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        raise ValueError(f"{field}={uri!r}: {path} cannot be read and written by this process; fix its "
                         f"permissions or use another file")


def resolve_uri(uri: str | None = None) -> str:
    """The URI to use: the given one, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db."""
    if uri is not None:
        check_uri("tracking.uri", uri)
        return uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        check_uri("MLFLOW_TRACKING_URI", env)
        return env
    return f"sqlite:///{Path.cwd() / DEFAULT_DB_NAME}"


def check_status(status: str) -> str:
    if status not in RUN_STATUSES:
        raise ValueError(f"status must be one of {', '.join(RUN_STATUSES)}, got {status!r}")
    return status
