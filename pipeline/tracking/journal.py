"""The local journal every tracking call goes through first, and its delivery to MLflow.

Layout of a journal directory (one set of files per tracker instance, `<jid>` sorts by start time):
  <jid>.jsonl          one JSON record per call, appended and flushed by the caller, fsync'ed per batch
  <jid>.state.json     {"run_id", "offset"}: the MLflow run and how many bytes of the journal were delivered
  <jid>.rejected.jsonl entities MLflow refused for good (bad value, changed param), with the error
  <jid>.quarantine     lines that are not a readable record (torn by a crash), moved aside with their offset
  <jid>.spool/         copies of logged artifacts, so a later sync still finds them
  <jid>.lock           flock held by the live tracker, so `sync_journal` never races its delivery thread
The first record ("start") names the run: `run_file` (a training run's folder: its one run, see
identity.py; a journal found in a run folder's tracking/ belongs to that run whatever it says), a new one,
`resume_run_id` (a resumed run, set RUNNING again), `attach_run_id` (an existing run, status untouched: a
driver's tags or end for its parent) or `find_run` (a run found by name and parent at delivery: a driver's
tags for a child whose own journal may still hold its start; delivery waits until that run exists).
Only the live tracker's delivery sets a run RUNNING; a sync of a dead attempt's journal leaves the status
alone, and the end record of a journal older than the folder's newest is not applied (a later attempt
ends the run). Once no process writes a run folder, a sync ends a run still RUNNING as KILLED.
The offset only moves past a record once MLflow accepted all of it. Re-sending a record is harmless:
a metric point at or before the step MLflow already holds for that metric is not sent again (`StepLedger`),
params are re-sent with the same value, tags and artifacts overwrite themselves.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import threading
import time
from pathlib import Path

from pipeline.tracking import identity, mlflow_client

log = logging.getLogger(__name__)

# MLflow's log_batch limits (mlflow.utils.validation).
MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_ENTITIES_PER_BATCH = 1000
_READ_CHUNK = 8 << 20
# new_journal_id()'s form: other .jsonl files (a run's metrics.jsonl, rejected files) are not journals
JOURNAL_NAME = re.compile(r"(\d{8}-\d{6}-\d+-[0-9a-f]{6})\.jsonl")


def new_journal_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}-{os.urandom(3).hex()}"


def now_ms() -> int:
    return int(time.time() * 1000)


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def try_lock(path: Path):
    """An open file holding an exclusive flock on `path`, or None if another process holds it."""
    f = open(path, "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


class RunNotDelivered(Exception):
    """A journal names its run by name and that run is not in MLflow yet: retried later."""


SYSTEM_METRICS_PREFIX = "system/"   # MLflow's system monitors: their step is a sample index per attempt


class StepLedger:
    """The newest step MLflow holds for each metric of one run. A point at or before it is not sent again:
    a resumed attempt replays the steps after its checkpoint, a killed attempt's journal may hold steps a
    later attempt delivered, a rerun of a finished run re-logs its stored evaluation; MLflow would keep
    each as a second point at the same step. Loaded from the store once per run, advanced as points are
    batched, dropped after any failed send (and loaded again). Shared by the deliveries into one run.
    System metrics (a sample index that starts at 0 in every attempt) are not checked."""

    def __init__(self):
        self.run_id: str | None = None
        self.steps: dict[str, int] | None = None
        self.skipped = 0

    def invalidate(self) -> None:
        self.steps = None

    def keep(self, client, run_id: str | None, metric) -> bool:
        if run_id is None or metric.key.startswith(SYSTEM_METRICS_PREFIX):
            return True
        if self.steps is None or self.run_id != run_id:
            self.steps, self.run_id = mlflow_client.latest_steps(client, run_id), run_id
        last = self.steps.get(metric.key)
        if last is not None and metric.step <= last:
            self.skipped += 1
            return False
        self.steps[metric.key] = metric.step
        return True


class JournalWriter:
    """Appends records; `append` costs one json.dumps and one write() so the training loop never waits."""

    def __init__(self, directory: Path, jid: str):
        self.directory, self.jid = directory, jid
        directory.mkdir(parents=True, exist_ok=True)
        self.lock_file = try_lock(directory / f"{jid}.lock")
        assert self.lock_file is not None, "a fresh journal id cannot be locked by anyone else"
        self._file = open(directory / f"{jid}.jsonl", "ab")
        self._mutex = threading.Lock()

    def append(self, record: dict) -> None:
        line = (json.dumps(record, allow_nan=True) + "\n").encode()
        with self._mutex:
            self._file.write(line)
            self._file.flush()  # visible to the delivery reader and safe from a process crash

    def sync(self) -> None:
        with self._mutex:
            os.fsync(self._file.fileno())  # safe from a machine crash, once per delivered batch

    def spool_dir(self) -> Path:
        return self.directory / f"{self.jid}.spool"

    def close(self) -> None:
        with self._mutex:
            if not self._file.closed:
                os.fsync(self._file.fileno())
                self._file.close()
        self.lock_file.close()


class Delivery:
    """Sends a journal's undelivered records to MLflow, in order, advancing the delivered offset.

    `deliver_pending` raises the MLflow (or network) error of a transient failure after saving the
    progress made; permanent refusals are written to the rejected file and skipped.
    """

    def __init__(self, directory: Path, jid: str, uri: str | None = None, *, live: bool = False,
                 superseded: bool = False, ledger: StepLedger | None = None):
        """`live`: the delivery of a running tracker (its start sets the run RUNNING); `superseded`: a
        journal older than the run folder's newest (its end record is not applied); `ledger`: shared by
        the deliveries into one run."""
        self.directory, self.jid = directory, jid
        self.live, self.superseded = live, superseded
        self.ledger = ledger if ledger is not None else StepLedger()
        self.path = directory / f"{jid}.jsonl"
        self.state_path = directory / f"{jid}.state.json"
        state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        self.run_id: str | None = state.get("run_id")
        self.offset: int = state.get("offset", 0)
        self.uri = uri or self._recorded_uri()
        self.delivered = 0
        self.rejected = 0
        self.quarantined = 0
        self._client = None

    def _recorded_uri(self) -> str | None:
        with open(self.path, "rb") as f:
            first = f.readline()
        record = _parse(first) if first.endswith(b"\n") else None
        return record.get("uri") if record is not None else None

    def _save(self, offset: int) -> None:
        self.offset = max(self.offset, offset)
        _write_json_atomic(self.state_path, {"run_id": self.run_id, "offset": self.offset})

    def pending(self) -> list[tuple[int, dict]]:
        """(end offset, record) of each complete undelivered line. A line that is not a record (torn by a
        crash, then glued to the next append) is quarantined once everything before it is delivered."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(_READ_CHUNK)
            if b"\n" not in data and len(data) == _READ_CHUNK:
                data += f.read()
        items, pos = [], self.offset
        for line in data.split(b"\n")[:-1]:  # the last piece is incomplete (or empty)
            end = pos + len(line) + 1
            record = _parse(line)
            if record is None:
                if items:
                    break   # deliver what precedes it first: the offset must not pass undelivered records
                self._quarantine(line, pos, end, "not a journal record")
            else:
                items.append((end, record))
            pos = end
        return items

    def quarantine_torn_tail(self) -> None:
        """Move aside a last line without its newline. Only for a journal whose writer is gone (its lock
        is free): a live writer may be in the middle of that line."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            rest = f.read()
        if rest and b"\n" not in rest:
            self._quarantine(rest, self.offset, self.offset + len(rest), "a torn last line (its writer stopped in the middle)")

    def _quarantine(self, line: bytes, start: int, end: int, why: str) -> None:
        self.quarantined += 1
        side = self.directory / f"{self.jid}.quarantine"
        log.warning("journal %s: %s at byte %d (%d bytes), moved to %s and skipped", self.path, why, start,
                    len(line), side)
        with open(side, "ab") as f:
            f.write(json.dumps({"offset": start, "reason": why}).encode() + b"\n" + line + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._save(end)

    def count_pending(self) -> int:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            return f.read().count(b"\n")

    def caught_up(self) -> bool:
        return self.offset >= self.path.stat().st_size

    def deliver_pending(self) -> None:
        try:
            while True:
                items = self.pending()
                if not items:
                    return
                self._deliver(items)
        except Exception:
            self.ledger.invalidate()   # what MLflow took of a failed send is read back next time
            raise

    def ended(self) -> bool:
        """Whether the journal is delivered to its end and its last record ends the run (its tracker
        finished: FINISHED, FAILED or KILLED)."""
        if not self.caught_up() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(max(0, self.path.stat().st_size - 4096))
            last = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
        record = _parse(last)
        return record is not None and record["op"] == "finish"

    def run_file(self, record: dict | None = None) -> Path | None:
        """The run file of the folder this journal belongs to: the one its start record names, else a
        run.json beside its folder (journals written before run files existed), else None (a driver's)."""
        if record is None:
            with open(self.path, "rb") as f:
                record = _parse(f.readline()) or {}
        if record.get("attach_run_id") or record.get("find_run"):
            return None
        if record.get("run_file"):
            return (self.directory / record["run_file"]).resolve()
        beside = self.directory.parent / identity.RUN_FILE
        return beside if beside.is_file() else None

    def _mlflow(self):
        if self._client is None:
            self._client = mlflow_client.client(self.uri)
        return self._client

    def _deliver(self, items: list[tuple[int, dict]]) -> None:
        batch = _Batch()
        for end, record in items:
            op = record["op"]
            if op in ("metrics", "params", "tags"):
                for entity in _entities(record):
                    if entity[0] == "metrics" and not self.ledger.keep(self._mlflow(), self.run_id, entity[1]):
                        continue
                    if not batch.fits(entity):
                        self._send(batch)
                        batch = _Batch()
                    batch.add(entity)
                batch.complete(end)
                continue
            self._send(batch)
            batch = _Batch()
            if op == "start":
                self._start(record)
            elif self.run_id is None:
                raise RuntimeError(f"journal {self.path} has no run to deliver {op!r} to")
            else:
                self._single(record)
            self._save(end)
            self.delivered += 1
        self._send(batch)

    def _send(self, batch: _Batch) -> None:
        if not batch.empty():
            try:
                self._mlflow().log_batch(self.run_id, **batch.kwargs())
            except Exception as error:
                if not mlflow_client.is_permanent(error):
                    raise
                self._send_one_by_one(batch)
        if batch.complete_end is not None:
            self.delivered += batch.complete_records
            self._save(batch.complete_end)

    def _send_one_by_one(self, batch: _Batch) -> None:
        for kind, entity in batch.entities:
            try:
                self._mlflow().log_batch(self.run_id, **{kind: [entity]})
            except Exception as error:
                if not mlflow_client.is_permanent(error):
                    raise
                self._reject({"entity": kind, "key": entity.key, "value": entity.value}, error)

    def _reject(self, what: dict, error: BaseException) -> None:
        self.rejected += 1
        log.error("MLflow refused %s for good: %s", what, error)
        with open(self.directory / f"{self.jid}.rejected.jsonl", "a") as f:
            f.write(json.dumps({**what, "error": str(error)[:2000]}) + "\n")

    def _start(self, record: dict) -> None:
        if self.run_id is not None:
            return
        self.uri = self.uri or record["uri"]
        c = self._mlflow()
        run_file = self.run_file(record)
        if run_file is not None:
            self.run_id = self._start_folder_run(c, run_file, record)
            return
        if record.get("attach_run_id"):
            # A driver's later records for a run that exists (a tag, the parent's end): no status change.
            run_id = c.get_run(record["attach_run_id"]).info.run_id
        elif record.get("find_run"):
            run_id = self._find(record)
        elif record.get("resume_run_id"):
            run_id = record["resume_run_id"]
            c.get_run(run_id)  # RESOURCE_DOES_NOT_EXIST surfaces here, before anything is logged to it
            c.update_run(run_id, status="RUNNING")
        else:
            tags = dict(record.get("tags") or {})
            if record.get("parent_run_id"):
                tags[mlflow_client.PARENT_RUN_TAG] = record["parent_run_id"]
            experiment_id = mlflow_client.ensure_experiment(c, self.uri, record["experiment"])
            run_id = c.create_run(experiment_id, start_time=record["time"], tags=tags,
                                  run_name=record.get("run_name")).info.run_id
        self.run_id = run_id

    def _start_folder_run(self, c, run_file: Path, record: dict) -> str:
        """The run folder's one run (identity.resolve_run); a live tracker sets it RUNNING with its tags."""
        from mlflow.entities import RunTag

        tags = {k: str(v) for k, v in (record.get("tags") or {}).items()}
        create = {"tags": tags, "run_name": record.get("run_name"), "start_time": record.get("time"),
                  "parent_run_id": record.get("parent_run_id")}
        run_id, existed = identity.resolve_run(c, self.uri, run_file, record["experiment"], create=create)
        if existed and self.live:
            c.update_run(run_id, status="RUNNING")
            if tags:
                c.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        return run_id

    def _find(self, record: dict) -> str:
        """The run a driver's record names by run name (and parent): created by its own journal, which
        may not be delivered yet; then this journal waits (retried like an unreachable server)."""
        name, parent = record["find_run"]["run_name"], record["find_run"].get("parent_run_id")
        runs = mlflow_client.find_runs(record["experiment"], tags={"mlflow.runName": name}, uri=self.uri,
                                       parent_run_id=parent)
        if not runs:
            raise RunNotDelivered(f"no MLflow run named {name!r} (under parent {parent}) in {self.uri} yet; "
                                  f"sync that run's own journal first")
        return runs[0].info.run_id

    def _single(self, record: dict) -> None:
        c, op = self._mlflow(), record["op"]
        try:
            if op == "artifact":
                local = self.directory / record["spool"]
                if local.is_dir():
                    c.log_artifacts(self.run_id, str(local), record.get("artifact_path"))
                else:
                    c.log_artifact(self.run_id, str(local), record.get("artifact_path"))
            elif op == "text":
                c.log_text(self.run_id, record["text"], record["name"])
            elif op == "finish":
                if not self.superseded:   # a later attempt of the run ends it
                    c.set_terminated(self.run_id, status=record["status"], end_time=record["time"])
            else:
                raise ValueError(f"unknown journal op {op!r} in {self.path}")
        except Exception as error:
            if not mlflow_client.is_permanent(error):
                raise
            self._reject({"op": op}, error)


def _parse(line: bytes) -> dict | None:
    """The record on a journal line, or None when the line is not one."""
    try:
        record = json.loads(line)
    except ValueError:   # JSONDecodeError and UnicodeDecodeError both are
        return None
    return record if isinstance(record, dict) and isinstance(record.get("op"), str) else None


def _entities(record: dict):
    from mlflow.entities import Metric, Param, RunTag

    op = record["op"]
    if op == "metrics":
        for key, value in record["metrics"].items():
            yield "metrics", Metric(key, float(value), record["time"], record["step"])
    elif op == "params":
        for key, value in record["params"].items():
            yield "params", Param(key, value)
    else:
        for key, value in record["tags"].items():
            yield "tags", RunTag(key, value)


class _Batch:
    def __init__(self):
        self.entities: list[tuple[str, object]] = []
        self.counts = {"metrics": 0, "params": 0, "tags": 0}
        self.param_keys: set[str] = set()
        # Records that ended inside this batch: the offset may pass them once it is accepted. A record
        # split over several batches completes in its last one.
        self.complete_end: int | None = None
        self.complete_records = 0

    def complete(self, end: int) -> None:
        self.complete_end = end
        self.complete_records += 1

    def fits(self, entity: tuple[str, object]) -> bool:
        kind, value = entity
        if len(self.entities) >= MAX_ENTITIES_PER_BATCH:
            return False
        if kind == "params" and value.key in self.param_keys:
            return False  # MLflow refuses a batch naming one param twice
        limit = MAX_METRICS_PER_BATCH if kind == "metrics" else MAX_PARAMS_TAGS_PER_BATCH
        return self.counts[kind] < limit

    def add(self, entity: tuple[str, object]) -> None:
        kind, value = entity
        self.entities.append(entity)
        self.counts[kind] += 1
        if kind == "params":
            self.param_keys.add(value.key)

    def empty(self) -> bool:
        return not self.entities

    def kwargs(self) -> dict:
        out = {"metrics": [], "params": [], "tags": []}
        for kind, value in self.entities:
            out[kind].append(value)
        return out


def journal_ids(directory: Path) -> list[str]:
    """The journals in `directory` (not below it), oldest first."""
    return sorted(m.group(1) for p in directory.glob("*.jsonl") if (m := JOURNAL_NAME.fullmatch(p.name)))


def journal_folders(root: Path) -> list[Path]:
    """`root` and every folder below it that holds a journal (a run's `tracking/`, a study's runs, ...)."""
    found = {p.parent for p in root.rglob("*.jsonl") if JOURNAL_NAME.fullmatch(p.name)
             and not any(part.endswith(".spool") for part in p.relative_to(root).parts)}
    return sorted(found)


COUNTS = ("journals", "delivered", "pending", "rejected", "quarantined", "skipped", "busy", "failed", "killed")


def sync_journal(journal_dir: str | os.PathLike, uri: str | None = None, *, stop_at_outage: bool = False) -> dict:
    """Deliver whatever the journals in `journal_dir`, and in every folder below it, still hold; idempotent.

    `uri` overrides the tracking URI recorded when each run started. Journals held by a live tracker are
    skipped (counted as `busy`). A run folder that no process writes any more (no busy journal) and whose
    run is still RUNNING in MLflow (its last attempt was killed) has its run ended KILLED (`killed`).
    Returns the totals (journals, delivered and pending records, rejected entities, quarantined lines,
    `skipped` metric points MLflow already held at their step, busy journals, `failed` journals whose
    server was unreachable, `killed` runs) and the same counts for each folder that holds a journal, under
    `folders`. `stop_at_outage`: stop at the first unreachable server (a driver's start-up, which should
    not wait on every journal of a study while the server is down).
    """
    from pipeline.tracking.config import check_store, check_uri

    if uri is not None:
        check_uri("--tracking-uri", uri)
        check_store(uri, "--tracking-uri")
    directory = Path(journal_dir)
    if not directory.is_dir():
        raise ValueError(f"journal_dir {str(directory)!r} is not a directory; pass a run's folder, its tracking "
                         f"folder, or a study or search folder")
    folders = journal_folders(directory)
    if not folders:
        raise ValueError(f"no tracking journal in {str(directory)!r} or below it (journals are named like "
                         f"{new_journal_id()}.jsonl, in each run's tracking/ folder); pass a run, study or "
                         f"search folder")
    totals = dict.fromkeys(COUNTS, 0)
    listing = []
    for folder in folders:
        counts = _sync_folder(folder, uri)
        for key in COUNTS:
            totals[key] += counts[key]
        listing.append({"folder": str(folder), **counts})
        if stop_at_outage and counts["failed"]:
            log.warning("tracking store unreachable; the journals of %d more folder(s) under %s wait for the next "
                        "sync", len(folders) - len(listing), directory)
            break
    return {**totals, "folders": listing}


def _sync_folder(directory: Path, uri: str | None) -> dict[str, int]:
    counts = dict.fromkeys(COUNTS, 0)
    ids = journal_ids(directory)
    ledger = StepLedger()   # the journals of one folder deliver into one run (or are a driver's)
    newest = None
    for jid in ids:
        counts["journals"] += 1
        lock_path = directory / f"{jid}.lock"
        existed = lock_path.exists()
        lock = try_lock(lock_path)
        if lock is None:
            counts["busy"] += 1
            continue
        try:
            delivery = Delivery(directory, jid, uri, ledger=ledger)
            in_run_folder = delivery.run_file() is not None
            delivery.superseded = in_run_folder and jid != ids[-1]
            try:
                delivery.deliver_pending()
                delivery.quarantine_torn_tail()   # the lock is free: nobody will finish that line
            except Exception as error:
                if mlflow_client.is_permanent(error) or isinstance(error, ValueError):
                    raise
                counts["failed"] += 1
                log.warning("journal %s: tracking server unreachable: %s", jid, error)
            counts["delivered"] += delivery.delivered
            counts["rejected"] += delivery.rejected
            counts["quarantined"] += delivery.quarantined
            counts["pending"] += delivery.count_pending()
            if jid == ids[-1] and in_run_folder:
                newest = delivery
        finally:
            lock.close()
            if not existed:
                lock_path.unlink(missing_ok=True)   # leave the folder as it was found
    counts["skipped"] = ledger.skipped
    if newest is not None and not counts["busy"] and not counts["failed"] and not newest.ended():
        counts["killed"] = int(_close_abandoned(newest, uri))
    return counts


def _close_abandoned(delivery: Delivery, uri: str | None) -> bool:
    """End the run of a folder nobody writes any more KILLED if it is still RUNNING (its last attempt died
    without ending it). True when it did."""
    run_id = delivery.run_id
    if run_id is None:
        known = identity.read(delivery.run_file())
        if known is None or not known.mlflow_run_id or (uri and known.uri not in (None, uri)):
            return False
        run_id = known.mlflow_run_id
    try:
        closed = identity.close_abandoned(delivery._mlflow(), run_id)
    except Exception as error:
        if mlflow_client.is_permanent(error):
            return False
        log.warning("could not end the abandoned run %s: %s", run_id, error)
        return False
    if closed:
        log.warning("MLflow run %s of %s was RUNNING with no process writing its folder; ended it KILLED",
                    run_id, delivery.directory.parent)
    return closed
