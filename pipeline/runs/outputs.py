"""Where a study's or search's outputs go, so that they outlive the process that wrote them.

Relative output folders (`out_dir: studies`) and relative SQLite paths (`sqlite:///mlflow.db`) resolve
against one stated root: `$ATTAMBA_HOME`, else the working directory. Inside a Ray job the working
directory is a temporary package folder of the Ray session (`ray job submit --working-dir`), deleted with
it, so there a relative path without `$ATTAMBA_HOME` is refused before any compute.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.tracking.config import DEFAULT_DB_NAME, resolve_uri, sqlite_path

HOME_ENV = "ATTAMBA_HOME"
# Set by Ray's job supervisor for a job's entrypoint (ray/dashboard/modules/job/job_supervisor.py).
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# The folder under a Ray session that holds unpacked working_dir packages.
RAY_PACKAGES_DIR = "runtime_resources"


def in_ray_job() -> bool:
    """True when this process is a Ray job's entrypoint or runs inside a Ray runtime-env package folder."""
    return bool(os.environ.get(RAY_JOB_ENV)) or RAY_PACKAGES_DIR in Path.cwd().parts


def output_root() -> Path | None:
    """$ATTAMBA_HOME (absolute), else the working directory; None inside a Ray job without $ATTAMBA_HOME."""
    raw = os.environ.get(HOME_ENV, "").strip()
    if raw:
        root = Path(raw).expanduser()
        if not root.is_absolute():
            raise ValueError(f"{HOME_ENV}={raw!r} is a relative path; set it to an absolute folder that outlives "
                             f"the job, e.g. {HOME_ENV}=/data/attamba")
        return root
    return None if in_ray_job() else Path.cwd()


def durable_path(path: str | Path, field: str) -> Path:
    """`path` if absolute, else under the output root; refused inside a Ray job without $ATTAMBA_HOME."""
    path = Path(path).expanduser()
    if path.is_absolute():
        return path
    root = output_root()
    if root is None:
        raise ValueError(
            f"{field}={str(path)!r} is a relative path and this runs as a Ray job, whose working directory "
            f"({Path.cwd()}) is a temporary folder deleted with the Ray session; set {HOME_ENV} to an absolute "
            f"folder on storage every node shares (jobs/submit_study.sh forwards it), or give {field} as an "
            f"absolute path")
    return root / path


def durable_uri(uri: str, field: str) -> str:
    """A SQLite URI with a relative database path made durable like `durable_path`; others unchanged."""
    db = sqlite_path(uri)
    if db is None or db.startswith("/"):
        return uri
    scheme, _, rest = uri.partition(":///")
    return f"{scheme}:///{durable_path(db, field)}{rest[len(db):]}"


def tracking_uri(uri: str | None) -> str:
    """The tracking store of a study or search: `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db,
    a relative SQLite path made durable like `durable_path`."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None and not env:
        return durable_uri(f"sqlite:///{DEFAULT_DB_NAME}", "tracking.uri")
    return durable_uri(resolve_uri(uri), "tracking.uri" if uri is not None else "MLFLOW_TRACKING_URI")


def output_folders(out: Path, cache: Path, uri: str | None) -> dict[str, Path]:
    """The folders trials write into or read, by what they hold: the study's or search's folder (run folders,
    checkpoints, Ray's trial state), the token cache and, for a SQLite MLflow store, its database's folder
    (trials log their runs there; `uri`: the tracking URI, None without tracking). On a multi-node cluster
    every node must share them (ray/storage.py)."""
    folders = {"the run folder": Path(out), "the token cache (data.cache_dir / ATTAMBA_CACHE)": Path(cache)}
    db = sqlite_path(uri) if uri else None
    if db is not None:
        folders["the MLflow SQLite store's folder"] = Path(db).parent
    return folders
