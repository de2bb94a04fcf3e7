"""A run folder's one MLflow run: `<out_dir>/run.json`, written before the folder's first step.

    {"key": "<32 hex>", "mlflow_run_id": "<id>" or null, "uri": "<the store that id lives in>" or null,
     "config_hash": "<hash of what a resume must not change>" or null, "created": "<time>"}

The key is chosen when the folder's first attempt starts (tmp + fsync + rename), whether MLflow is up or
not. The MLflow run itself is made by whichever delivery comes first (the live tracker, a later attempt,
`attamba sync`): `resolve_run` takes the recorded id when the store has it, else the run tagged
`run_key=<key>`, else creates that run, and records its id, all under a lock beside the file. So every
attempt, sync and `attamba eval` of the folder lands in one run, and none opens a second, however often
the run is killed and whether or not the server was reachable when each attempt began.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import time
import uuid
from pathlib import Path

from pipeline import schema

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
LEGACY_RUN_ID_FILE = "mlflow_run_id"   # what run folders held before run.json: the MLflow run id alone


@dataclasses.dataclass(frozen=True)
class RunFile:
    key: str
    mlflow_run_id: str | None = None
    uri: str | None = None
    config_hash: str | None = None
    created: str | None = None


def path_in(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / RUN_FILE


def read(path: str | os.PathLike) -> RunFile | None:
    """The run file at `path`; None when there is none. ValueError naming the file when it is unreadable."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        fields = {f.name for f in dataclasses.fields(RunFile)}
        return RunFile(**{k: v for k, v in data.items() if k in fields})
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path} is not a readable run file ({error}); it names the run folder's MLflow run: "
                         f"restore it, or delete it to give the folder a new run") from None


def write(path: str | os.PathLike, run: RunFile) -> None:
    """Replace the run file atomically: a reader sees the old or the new one, also after a power loss."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(dataclasses.asdict(run), f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(path: str | os.PathLike):
    """Exclusive lock for reading and updating the run file at `path` (a lock file beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure(out_dir: str | os.PathLike, *, key: str | None = None, run_id: str | None = None,
           config_hash: str | None = None, uri: str | None = None) -> RunFile:
    """The folder's run file, created when missing: with the `key` and `run_id` a checkpoint kept, else the
    id of a folder made before run files existed (its `mlflow_run_id` file), else a fresh key. An existing
    file is kept; a `run_id` given for a file that records none (or another one) is recorded."""
    out_dir = Path(out_dir)
    path = path_in(out_dir)
    with locked(path):
        current = read(path)
        if current is None:
            legacy = out_dir / LEGACY_RUN_ID_FILE
            if run_id is None and legacy.is_file():
                run_id = legacy.read_text().strip() or None
            current = RunFile(key=key or uuid.uuid4().hex, mlflow_run_id=run_id, uri=uri if run_id else None,
                              config_hash=config_hash, created=time.strftime("%Y-%m-%d %H:%M:%S"))
            write(path, current)
        elif run_id and run_id != current.mlflow_run_id:
            if current.mlflow_run_id:
                log.warning("%s names MLflow run %s; continuing run %s as asked", path, current.mlflow_run_id, run_id)
            current = dataclasses.replace(current, mlflow_run_id=run_id, uri=uri)
            write(path, current)
        elif config_hash and current.config_hash != config_hash:
            current = dataclasses.replace(current, config_hash=config_hash)
            write(path, current)
    return current


def _by_key(client, experiment_id: str, key: str):
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{schema.TAG_RUN_KEY}` = '{key}'",
                              max_results=2, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def resolve_run(client, uri: str, path: Path, experiment: str, *, create: dict) -> tuple[str, bool]:
    """(run id, whether it existed) of the folder's one run in the store `uri`, for the run file at `path`.
    The recorded id when this store has that run, else the run tagged with the folder's key, else a new run
    made with `create` (tags, run_name, start_time, parent_run_id). The id is recorded for the store the file
    names (a sync into another store finds its run by key each time instead)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import mlflow_client

    with locked(path):
        current = read(path)
        if current is None:
            raise ValueError(f"{path} is missing: the journal beside it belongs to a run folder whose run file "
                             f"was deleted; restore it, or deliver this journal with a run file of its own")
        ours = current.uri in (None, uri)
        if current.mlflow_run_id and ours:
            try:
                run = client.get_run(current.mlflow_run_id)
                if run.info.lifecycle_stage == "active":
                    if run.data.tags.get(schema.TAG_RUN_KEY) != current.key:
                        client.set_tag(run.info.run_id, schema.TAG_RUN_KEY, current.key)  # a folder made before keys
                    return run.info.run_id, True
                log.warning("MLflow run %s of %s is deleted; the folder gets a new run", current.mlflow_run_id, path)
            except MlflowException as error:
                if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise
                log.warning("MLflow run %s recorded in %s is not in %s; finding the folder's run by its key",
                            current.mlflow_run_id, path, uri)
        experiment_id = mlflow_client.ensure_experiment(client, uri, experiment)
        found = _by_key(client, experiment_id, current.key)
        existed = found is not None
        if found is not None:
            run_id = found.info.run_id
        else:
            tags = {**(create.get("tags") or {}), schema.TAG_RUN_KEY: current.key}
            if create.get("parent_run_id"):
                tags[mlflow_client.PARENT_RUN_TAG] = create["parent_run_id"]
            run_id = client.create_run(experiment_id, start_time=create.get("start_time"), tags=tags,
                                       run_name=create.get("run_name")).info.run_id
        if ours and current.mlflow_run_id != run_id:
            write(path, dataclasses.replace(current, mlflow_run_id=run_id, uri=uri))
        return run_id, existed


def close_abandoned(client, run_id: str) -> bool:
    """End the run KILLED when it is still RUNNING (called once no process writes its folder); True if so."""
    run = client.get_run(run_id)
    if run.info.status != "RUNNING":
        return False
    client.set_tag(run_id, schema.TAG_STATUS, "killed")
    client.set_terminated(run_id, status="KILLED")
    return True
