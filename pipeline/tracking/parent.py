"""The driver's side of tracking: the parent run a study's or search's runs nest under.

Study and search drivers go through `parent_run` and `ParentRun` and nothing else of MLflow: open (or
find again, on resume) the parent, tag a child found by its name, list the finished children, log params
and files to the parent, and end it FINISHED, FAILED or KILLED. Without a tracking URI every method does nothing.

An MLflow outage never stops a driver. A call that fails for a reason other than a permanent refusal is
written to a journal (journal.py's format) in the driver's `journal_dir`, which the next driver run
delivers first, as does `attamba sync JOURNAL_DIR`: tags for a child (found again by its run name and
parent when delivered), files and the end status of the parent. A parent that cannot be opened (MLflow
down at start, and no id kept from an earlier run) leaves the runs unnested; they are still tracked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import shutil
import time
from pathlib import Path

from pipeline import schema
from pipeline.tracking.config import check_store
from pipeline.tracking.journal import JournalWriter, journal_folders, new_journal_id, now_ms, sync_journal
from pipeline.tracking.version import code_version

log = logging.getLogger(__name__)

DESCRIPTION_TAG = "mlflow.note.content"   # a run's description in MLflow's UI (Markdown)


def _transient(error: BaseException) -> bool:
    from pipeline.tracking.mlflow_client import is_permanent

    return not is_permanent(error)


def is_outage(error: BaseException) -> bool:
    """Whether `error`, raised by an MLflow call, may pass once the server is back (not a refusal, not a
    bad input): what a driver waits out instead of stopping."""
    return not isinstance(error, ValueError) and _transient(error)


@dataclasses.dataclass
class ParentRun:
    uri: str | None            # the tracking store; None: tracking is off
    experiment: str
    run_id: str | None = None
    failed: bool = False       # set by the driver when trials failed: the run then ends FAILED
    journal_dir: Path | None = None   # where calls that MLflow could not take wait (see the module docstring)

    def _journal(self, start: dict, records: list[dict], files: list[Path] = ()) -> Path | None:
        """Write `start` then `records` (and copies of `files`, each an artifact record) to a new journal."""
        if self.journal_dir is None:
            return None
        writer = JournalWriter(Path(self.journal_dir), new_journal_id())
        try:
            writer.append({"op": "start", "uri": self.uri, "experiment": self.experiment, "time": now_ms(), **start})
            for path, artifact_path in files:
                spool = writer.spool_dir()
                spool.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, spool / Path(path).name)
                writer.append({"op": "artifact", "spool": f"{spool.name}/{Path(path).name}",
                               "artifact_path": artifact_path})
            for record in records:
                writer.append(record)
        finally:
            writer.close()
        return Path(self.journal_dir)

    def _deferred(self, what: str, error: BaseException, journal: Path | None) -> None:
        where = f"journaled in {journal}; `attamba sync {journal}` (or the next run) delivers it" if journal \
            else "not kept (no journal folder)"
        log.warning("MLflow unreachable (%s): %s %s", type(error).__name__, what, where)

    def tag_child(self, run_name: str | None, tags: dict) -> str | None:
        """Set `tags` on the child run named `run_name`; returns its id (None when there is none or MLflow is
        unreachable: then the tags are journaled and arrive later)."""
        if not (self.uri and self.run_id and run_name):
            return None
        from pipeline.tracking.mlflow_client import client, find_runs

        tags = {key: str(value) for key, value in tags.items()}
        try:
            runs = find_runs(self.experiment, tags={"mlflow.runName": run_name}, uri=self.uri,
                             parent_run_id=self.run_id)
            if runs:
                run_id = runs[0].info.run_id
                c = client(self.uri)
                for key, value in tags.items():
                    c.set_tag(run_id, key, value)
                return run_id
        except Exception as error:
            if not _transient(error):
                raise
            self._deferred(f"tags {tags} for run {run_name}", error, self._journal(
                {"find_run": {"run_name": run_name, "parent_run_id": self.run_id}}, [{"op": "tags", "tags": tags}]))
            return None
        # Not there yet: the run's own journal may still hold its start (MLflow was down when it began).
        journal = self._journal({"find_run": {"run_name": run_name, "parent_run_id": self.run_id}},
                                [{"op": "tags", "tags": tags}])
        log.warning("no MLflow run named %s under the parent run %s yet; its tags are journaled in %s",
                    run_name, self.run_id, journal)
        return None

    def finished_trials(self) -> set[str]:
        """The trial tags of the children that finished (empty when MLflow is unreachable)."""
        if not (self.uri and self.run_id):
            return set()
        from pipeline.tracking.mlflow_client import find_runs

        try:
            runs = find_runs(self.experiment, uri=self.uri, parent_run_id=self.run_id)
        except Exception as error:
            if not _transient(error):
                raise
            log.warning("MLflow unreachable (%s): finished runs are known from their folders only", error)
            return set()
        return {r.data.tags.get(schema.TAG_TRIAL) for r in runs if r.info.status == "FINISHED"}

    def finished_child(self, run_name: str) -> dict | None:
        """The metrics of the FINISHED child run named `run_name`; None when there is none (or MLflow is
        unreachable)."""
        if not (self.uri and self.run_id):
            return None
        from pipeline.tracking.mlflow_client import find_runs

        try:
            runs = find_runs(self.experiment, tags={"mlflow.runName": run_name}, uri=self.uri,
                             parent_run_id=self.run_id)
        except Exception as error:
            if not _transient(error):
                raise
            log.warning("MLflow unreachable (%s): cannot tell whether run %s finished", error, run_name)
            return None
        done = [r for r in runs if r.info.status == "FINISHED"]
        return dict(done[0].data.metrics) if done else None

    def log_params(self, params: dict) -> None:
        """Log `params` (values as strings) on the parent. A param the run already holds with another
        value (a resumed study run with different overrides) stays as it was, with a warning."""
        if not (self.uri and self.run_id):
            return
        from mlflow.entities import Param

        from pipeline.tracking.mlflow_client import client

        params = {key: str(value) for key, value in params.items()}
        try:
            client(self.uri).log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])
        except Exception as error:
            if _transient(error):
                self._deferred(f"params {sorted(params)}", error, self._journal(
                    {"attach_run_id": self.run_id}, [{"op": "params", "params": params}]))
            else:
                log.warning("MLflow kept the parent run %s's earlier params (%s); this driver's are %s",
                            self.run_id, error, params)

    def ui_links(self) -> dict | None:
        """Where MLflow's UI shows this run (mlflow_client.run_links): None without tracking or when MLflow is down."""
        from pipeline.tracking.mlflow_client import run_links

        return run_links(self.uri, self.run_id)

    def describe(self, text: str) -> None:
        """Set the parent's description (the Markdown MLflow's UI shows on the run's page)."""
        self.set_tags({DESCRIPTION_TAG: text})

    def set_tags(self, tags: dict) -> None:
        """Set `tags` (values as strings) on the parent; journaled while MLflow is unreachable."""
        if not (self.uri and self.run_id):
            return
        from mlflow.entities import RunTag

        from pipeline.tracking.mlflow_client import client

        tags = {key: str(value) for key, value in tags.items()}
        try:
            client(self.uri).log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as error:
            if not _transient(error):
                raise
            self._deferred(f"tags {sorted(tags)}", error, self._journal(
                {"attach_run_id": self.run_id}, [{"op": "tags", "tags": tags}]))

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        """Log the files among `paths` that exist."""
        if not (self.uri and self.run_id):
            return
        from pipeline.tracking.mlflow_client import client

        paths = [Path(p) for p in paths if Path(p).is_file()]
        try:
            c = client(self.uri)
            for path in paths:
                c.log_artifact(self.run_id, str(path), artifact_path=artifact_path)
        except Exception as error:
            if not _transient(error):
                raise
            self._deferred(f"files {[p.name for p in paths]}", error,
                           self._journal({"attach_run_id": self.run_id}, [], [(p, artifact_path) for p in paths]))

    def end(self, status: str) -> None:
        from pipeline.tracking.mlflow_client import end_run

        try:
            end_run(self.run_id, status, uri=self.uri)
        except Exception as error:
            if not _transient(error):
                raise
            self._deferred(f"the parent run's end ({status})", error, self._journal(
                {"attach_run_id": self.run_id}, [{"op": "finish", "status": status, "time": now_ms()}]))


def find_parent(uri: str | None, experiment: str, role: str) -> ParentRun | None:
    """The `ParentRun` of `experiment` whose schema.TAG_ROLE is `role` (the oldest, should there be two);
    None without tracking, without such a run, or when MLflow is unreachable."""
    if not uri:
        return None
    from pipeline.tracking.mlflow_client import find_runs

    try:
        found = find_runs(experiment, tags={schema.TAG_ROLE: role}, uri=uri)
    except Exception as error:
        if not _transient(error):
            raise
        log.warning("MLflow unreachable (%s): the %s run of %s is not known", error, role, experiment)
        return None
    return ParentRun(uri, experiment, found[-1].info.run_id) if found else None


def open_parent(uri: str, experiment: str, tags: dict, run_id: str | None = None, find: bool = True) -> str:
    """The id of a RUNNING parent run named `experiment`: `run_id` when given and still in the store, else
    (with `find`) the oldest run of the experiment carrying `tags`, else a new run with `tags`. Either way
    it carries the code version of this driver (schema.TAG_CODE_VERSION)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking.mlflow_client import client, find_runs, start_parent_run

    version = code_version()
    if run_id is None and find:
        found = find_runs(experiment, tags=tags, uri=uri)
        run_id = found[-1].info.run_id if found else None  # the oldest, should there ever be two
    if run_id:
        try:
            c = client(uri)
            c.update_run(run_id, status="RUNNING")
            c.set_tag(run_id, schema.TAG_CODE_VERSION, version)  # the code that resumed it
            return run_id
        except MlflowException as error:
            if _transient(error):
                raise
            log.warning("MLflow run %s is not in %s; starting a new parent run", run_id, uri)
    return start_parent_run(experiment, experiment, tags={**tags, schema.TAG_CODE_VERSION: version}, uri=uri)


def deliver_journals(journal_dir: Path | None, settle_s: float = 0.0) -> dict | None:
    """Deliver what earlier runs journaled below `journal_dir` (a driver's own journals, or a whole study or
    search folder: its runs' too), when MLflow takes it now, and end KILLED the runs nobody writes any more
    that were left RUNNING; stops at the first unreachable store. With `settle_s`, waits up to that long
    for journals still held by processes that are ending (trials of a Ray that just stopped). Never raises;
    returns the counts (None when there was nothing to deliver or it failed)."""
    if journal_dir is None or not Path(journal_dir).is_dir() or not journal_folders(Path(journal_dir)):
        return None
    deadline = time.monotonic() + settle_s
    while True:
        try:
            counts = sync_journal(journal_dir, stop_at_outage=True)
        except Exception as error:
            log.warning("could not deliver the journals in %s: %s", journal_dir, error)
            return None
        if not counts["busy"] or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if any(counts[key] for key in ("delivered", "pending", "failed", "killed", "quarantined")):
        log.warning("journals in %s: %s", journal_dir, {k: v for k, v in counts.items() if k != "folders"})
    return counts


@contextlib.contextmanager
def run_journals(folder: Path, uri: str | None):
    """Around a driver's whole run (outside its Ray session): first deliver what its runs' journals below
    `folder` still hold (attempts killed earlier); at the end, however the driver ends (Ctrl-C and SIGTERM
    included) and once its Ray has stopped, deliver what the trials left and end KILLED the runs of trials
    that died (their runs would otherwise stay RUNNING; a rerun that completes them makes them FINISHED)."""
    if uri:
        deliver_journals(folder)
    try:
        yield
    finally:
        if uri:
            deliver_journals(folder, settle_s=10.0)


@contextlib.contextmanager
def parent_run(uri: str | None, experiment: str, tags: dict, run_id: str | None = None, find: bool = True,
               journal_dir: Path | None = None):
    """A `ParentRun` opened by `open_parent` (a no-op one when `uri` is None). On exit it ends FINISHED,
    FAILED (an error, or `failed` set by the body) or KILLED (Ctrl-C). With MLflow unreachable it keeps
    `run_id` (the runs still nest under it once delivered) or, without one, tracks no parent."""
    opened = None
    if uri:
        check_store(uri)   # a local store that can never open fails now, not after minutes of retries
        deliver_journals(journal_dir)
        try:
            opened = open_parent(uri, experiment, tags, run_id, find)
        except Exception as error:
            if not _transient(error):
                raise
            opened = run_id
            log.warning("MLflow unreachable at %s (%s): %s", uri, type(error).__name__,
                        f"runs nest under the earlier parent run {run_id}" if run_id else
                        "this driver tracks no parent run (its runs are still tracked)")
    parent = ParentRun(uri, experiment, opened, journal_dir=journal_dir)
    status = "FAILED"
    try:
        yield parent
        status = "FAILED" if parent.failed else "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent.run_id is not None:
            parent.end(status)
