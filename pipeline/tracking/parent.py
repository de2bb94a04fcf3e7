"""The driver's side of tracking: the parent run a study's or search's runs nest under.

Study and search drivers go through `parent_run` and `ParentRun` and nothing else of MLflow: open (or
find again, on resume) the parent, tag a child found by its name, list the finished children, log files
to the parent, and end it FINISHED, FAILED or KILLED. Without a tracking URI every method does nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from pipeline import schema

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ParentRun:
    uri: str | None            # the tracking store; None: tracking is off
    experiment: str
    run_id: str | None = None
    failed: bool = False       # set by the driver when trials failed: the run then ends FAILED

    def tag_child(self, run_name: str | None, tags: dict) -> str | None:
        """Set `tags` on the child run named `run_name`; returns its id (None when there is none)."""
        if not (self.run_id and run_name):
            return None
        from pipeline.tracking.mlflow_client import client, find_runs

        runs = find_runs(self.experiment, tags={"mlflow.runName": run_name}, uri=self.uri, parent_run_id=self.run_id)
        if not runs:
            log.warning("no MLflow run named %s under the parent run %s; not tagged", run_name, self.run_id)
            return None
        run_id = runs[0].info.run_id
        c = client(self.uri)
        for key, value in tags.items():
            c.set_tag(run_id, key, str(value))
        return run_id

    def finished_trials(self) -> set[str]:
        """The trial tags of the children that finished."""
        if not self.run_id:
            return set()
        from pipeline.tracking.mlflow_client import find_runs

        return {r.data.tags.get(schema.TAG_TRIAL) for r in find_runs(self.experiment, uri=self.uri,
                                                                     parent_run_id=self.run_id)
                if r.info.status == "FINISHED"}

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        """Log the files among `paths` that exist."""
        if not self.run_id:
            return
        from pipeline.tracking.mlflow_client import client

        c = client(self.uri)
        for path in paths:
            if Path(path).is_file():
                c.log_artifact(self.run_id, str(path), artifact_path=artifact_path)


def open_parent(uri: str, experiment: str, tags: dict, run_id: str | None = None, find: bool = True) -> str:
    """The id of a RUNNING parent run named `experiment`: `run_id` when given and still in the store, else
    (with `find`) the oldest run of the experiment carrying `tags`, else a new run with `tags`."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_client import client, find_runs, start_parent_run

    if run_id is None and find:
        found = find_runs(experiment, tags=tags, uri=uri)
        run_id = found[-1].info.run_id if found else None  # the oldest, should there ever be two
    if run_id:
        try:
            client(uri).update_run(run_id, status="RUNNING")
            return run_id
        except MlflowException:
            log.warning("MLflow run %s is not in %s; starting a new parent run", run_id, uri)
    return start_parent_run(experiment, experiment, tags=tags, uri=uri)


@contextlib.contextmanager
def parent_run(uri: str | None, experiment: str, tags: dict, run_id: str | None = None, find: bool = True):
    """A `ParentRun` opened by `open_parent` (a no-op one when `uri` is None). On exit it ends FINISHED,
    FAILED (an error, or `failed` set by the body) or KILLED (Ctrl-C)."""
    parent = ParentRun(uri, experiment, open_parent(uri, experiment, tags, run_id, find) if uri else None)
    status = "FAILED"
    try:
        yield parent
        status = "FAILED" if parent.failed else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent.run_id is not None:
            from pipeline.tracking.mlflow_client import end_run

            end_run(parent.run_id, status, uri=uri)
