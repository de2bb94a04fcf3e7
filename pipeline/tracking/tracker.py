"""Experiment tracking behind a tiny interface: `Tracker`, a no-op one, and a journaled MLflow one.

`MlflowTracker` never talks to MLflow on the caller's thread. Each call is appended to a local journal
(see journal.py) and a background thread delivers the journal to MLflow in batches, retrying with
backoff while the server is down. The journal itself is the queue: it is bounded by disk, not memory,
so an outage of any length neither blocks the training loop nor drops a metric. What `finish()` could
not deliver in time stays in the journal; `sync_journal(dir)` (`attamba sync DIR`) uploads it later.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.tracking import identity
from pipeline.tracking.config import RUN_STATUSES, TrackingConfig, check_status, check_store, resolve_uri
from pipeline.tracking.journal import (Delivery, JournalWriter, StepLedger, journal_ids, new_journal_id, now_ms,
                                       sync_journal, try_lock)
from pipeline.tracking.mlflow_client import PARENT_RUN_TAG, end_run, find_runs, is_permanent, start_parent_run

__all__ = [
    "RUN_STATUSES", "PARENT_RUN_TAG", "TrackingConfig", "Tracker", "NoopTracker", "MlflowTracker",
    "make_tracker", "log_config", "flatten_config", "sync_journal", "start_parent_run", "end_run",
    "find_runs", "resolve_uri",
]

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 250          # MLflow's limit on metric, param and tag keys
MAX_PARAM_VALUE_LENGTH = 6000  # MLflow's limit on a param value
_BACKOFF_MIN_S, _BACKOFF_MAX_S = 0.5, 8.0


class Tracker:
    """What training, studies and searches log through. Use as a context manager: a clean exit finishes
    the run FINISHED, an exception FAILED, Ctrl-C KILLED."""

    run_id: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        raise NotImplementedError

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        raise NotImplementedError

    def log_text(self, text: str, name: str) -> None:
        raise NotImplementedError

    def finish(self, status: str = "FINISHED") -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish("FINISHED")
        else:
            self.finish("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


class NoopTracker(Tracker):
    """For non-zero ranks and tests: accepts every call, checks the status, touches nothing."""

    def log_params(self, params):
        pass

    def set_tags(self, tags):
        pass

    def log_metrics(self, metrics, step):
        pass

    def log_artifact(self, path, artifact_path=None):
        pass

    def log_text(self, text, name):
        pass

    def finish(self, status="FINISHED"):
        check_status(status)


def _check_key(kind: str, key: Any) -> str:
    if not isinstance(key, str) or not key or len(key) > MAX_KEY_LENGTH:
        raise ValueError(f"{kind} key must be a non-empty string of at most {MAX_KEY_LENGTH} chars, "
                         f"got {key!r}")
    return key


def _param_value(key: str, value: Any) -> str:
    text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        # The full value is still tracked in config.yaml; MLflow would refuse or truncate it anyway.
        log.warning("param %s is %d chars, truncated to MLflow's %d", key, len(text), MAX_PARAM_VALUE_LENGTH)
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


class MlflowTracker(Tracker):
    """Journaled MLflow tracking; see the module docstring. `run_id` is None until the run exists on the
    server (it is created by the delivery thread; the constructor waits up to `start_timeout_s` for the
    first delivery attempt, so with a reachable server `run_id` is known on return).

    With `run_file` (a training run folder's run.json, see identity.py) the tracker logs into that
    folder's one MLflow run, and first delivers what earlier attempts of the folder journaled and never
    delivered (their journals are locked meanwhile, so a concurrent `attamba sync` leaves them alone)."""

    def __init__(self, config: TrackingConfig, journal_dir: str | Path | None = None,
                 tags: Mapping[str, Any] | None = None, start_timeout_s: float = 30.0,
                 run_file: str | Path | None = None):
        directory = config.journal_dir or journal_dir
        if directory is None:
            raise ValueError("tracking.journal_dir is not set and no journal_dir was given; "
                             "pass the run's output directory (the journal lives beside its checkpoints)")
        self.config = config
        self.uri = resolve_uri(config.uri)
        check_store(self.uri)   # a local store that cannot open fails now, not after minutes of retries
        self.journal_dir = Path(directory)
        ledger = StepLedger()
        self._adopted = self._adopt(ledger) if run_file is not None else []
        self._writer = JournalWriter(self.journal_dir, new_journal_id())
        self._delivery = Delivery(self.journal_dir, self._writer.jid, self.uri, live=True, ledger=ledger)
        self._finished = False
        self._closing = threading.Event()
        self._abandon = threading.Event()
        self._first_try = threading.Event()  # set once the first delivery attempt ended
        self._fatal: BaseException | None = None
        self._spooled = 0
        start = {"op": "start", "uri": self.uri, "experiment": config.experiment, "run_name": config.run_name,
                 "parent_run_id": config.parent_run_id, "resume_run_id": config.resume_run_id,
                 "tags": {_check_key("tag", k): str(v) for k, v in (tags or {}).items()}, "time": now_ms()}
        if run_file is not None:
            known = identity.read(run_file)
            if known is None:
                raise ValueError(f"run file {str(run_file)!r} does not exist; create it first (identity.ensure)")
            start.update(run_key=known.key, run_file=os.path.relpath(Path(run_file).resolve(),
                                                                     self.journal_dir.resolve()))
        self._writer.append(start)
        self._thread = threading.Thread(target=self._deliver_loop, name="mlflow-journal", daemon=True)
        self._thread.start()
        self._first_try.wait(start_timeout_s)
        if self._fatal is not None:
            self._thread.join()
            self._close_writer()
            raise ValueError(f"MLflow refused to start the run ({self._describe_start()}): {self._fatal}")
        if self.run_id is None:
            log.warning("run not created on %s yet; journaling to %s, delivery goes on in the background",
                        self.uri, self.journal_dir)
        self._sampler = _SystemMetricsSampler(self, config.system_metrics_interval_s, self.uri) \
            if config.system_metrics else None

    def _adopt(self, ledger: StepLedger) -> list[tuple[Delivery, object]]:
        """The undelivered journals of earlier attempts in this folder, oldest first, each locked."""
        adopted = []
        if not self.journal_dir.is_dir():
            return adopted
        for jid in journal_ids(self.journal_dir):
            lock = try_lock(self.journal_dir / f"{jid}.lock")
            if lock is None:
                continue   # a sync is delivering it right now
            delivery = Delivery(self.journal_dir, jid, self.uri, superseded=True, ledger=ledger)
            if delivery.caught_up():
                lock.close()
                continue
            adopted.append((delivery, lock))
        if adopted:
            log.warning("delivering %d journal(s) of earlier attempts in %s first", len(adopted), self.journal_dir)
        return adopted

    def _describe_start(self) -> str:
        c = self.config
        return f"resume_run_id={c.resume_run_id!r}" if c.resume_run_id else f"experiment={c.experiment!r}"

    @property
    def run_id(self) -> str | None:
        return self._delivery.run_id

    def log_params(self, params):
        self._append({"op": "params", "params": {
            _check_key("param", k): _param_value(k, v) for k, v in params.items()}})

    def set_tags(self, tags):
        self._append({"op": "tags", "tags": {_check_key("tag", k): str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics, step):
        values = {}
        for key, value in metrics.items():
            try:
                values[_check_key("metric", key)] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"metric {key!r} must be a number, got {value!r}") from None
        self._append({"op": "metrics", "metrics": values, "step": int(step), "time": now_ms()})

    def log_artifact(self, path, artifact_path=None):
        source = Path(path)
        if not source.exists():
            raise ValueError(f"artifact path {str(source)!r} does not exist")
        # Copied now: the delivery may happen much later (or in `attamba sync`), after the file changed.
        self._spooled += 1
        relative = Path(self._writer.spool_dir().name) / str(self._spooled) / source.name
        target = self.journal_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        self._append({"op": "artifact", "spool": str(relative), "artifact_path": artifact_path})

    def log_text(self, text, name):
        self._append({"op": "text", "text": str(text), "name": name})

    def _append(self, record: dict) -> None:
        if self._finished:
            raise RuntimeError("tracker already finished")
        self._writer.append(record)

    def finish(self, status="FINISHED"):
        check_status(status)
        if self._finished:
            return
        if self._sampler is not None:
            self._sampler.stop()
        self._writer.append({"op": "finish", "status": status, "time": now_ms()})
        self._finished = True
        self._closing.set()
        self._thread.join(self.config.flush_timeout_s)
        if self._thread.is_alive():
            self._abandon.set()
            self._thread.join(1.0)
        self._close_writer()
        left = self.pending()
        if left:
            log.warning("%d tracking records not delivered to %s; they are kept in %s: run "
                        "`attamba sync %s` when the server is back", left, self.uri, self.journal_dir,
                        self.journal_dir)

    def pending(self) -> int:
        """Journal records not yet accepted by MLflow (this attempt's and the earlier ones it adopted)."""
        return self._delivery.count_pending() + sum(d.count_pending() for d, _ in self._adopted)

    def _close_writer(self) -> None:
        if not self._thread.is_alive():
            self._writer.close()
            for _, lock in self._adopted:
                lock.close()
        # else: the thread is stuck in a network call; the process exit releases the locks.

    def _deliver_all(self) -> None:
        for delivery, _ in self._adopted:
            if not delivery.caught_up():
                delivery.deliver_pending()
                delivery.quarantine_torn_tail()   # its writer is gone: nobody finishes that line
        self._delivery.deliver_pending()

    def _deliver_loop(self) -> None:
        delay = _BACKOFF_MIN_S
        outage = False
        while not self._abandon.is_set():
            closing = self._closing.is_set()
            try:
                self._writer.sync()
                self._deliver_all()
                ok = True
            except Exception as error:
                if self._delivery.run_id is None and (is_permanent(error) or isinstance(error, ValueError)):
                    self._fatal = error  # e.g. resume_run_id names no run: nothing can ever be delivered
                    log.error("MLflow refused to start the run (%s); the journal in %s keeps every call: %s",
                              self._describe_start(), self.journal_dir, error)
                    self._first_try.set()
                    return
                ok = False
                if not outage:
                    log.warning("tracking server %s unreachable, journaling and retrying: %s",
                                self.uri, str(error)[:300])
                outage = True
            self._first_try.set()
            if ok:
                if outage:
                    log.warning("tracking server %s reachable again; journal delivered", self.uri)
                outage, delay = False, _BACKOFF_MIN_S
                if closing:
                    return  # the finish record was appended before closing was set, so it is delivered
                self._closing.wait(self.config.flush_interval_s)
            else:
                self._abandon.wait(delay) if closing else self._closing.wait(delay)
                delay = min(2 * delay, _BACKOFF_MAX_S)


class _SystemMetricsSampler:
    """MLflow's system monitors (CPU, memory, disk, network, GPU), logged through the journal.

    MLflow's own SystemMetricsMonitor posts directly and stops for good at the first server error; here
    the samples are journaled like any metric, so they survive an outage too. Step = sample index."""

    def __init__(self, tracker: Tracker, interval_s: float, uri: str):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(run_id="", sampling_interval=interval_s, tracking_uri=uri)
        self._tracker, self._interval = tracker, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        step = 0
        while True:
            self._monitor.collect_metrics()
            if self._stop.wait(self._interval):
                return
            values = {f"system/{k}": v for k, v in self._monitor.aggregate_metrics().items()
                      if isinstance(v, (int, float)) and math.isfinite(v)}
            for monitor in self._monitor.monitors:
                monitor.clear_metrics()
            self._tracker.log_metrics(values, step)
            step += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def make_tracker(config: TrackingConfig, journal_dir: str | Path | None = None, rank: int = 0,
                 tags: Mapping[str, Any] | None = None, run_file: str | Path | None = None) -> Tracker:
    """The tracker a process should use: MLflow on rank 0 when enabled, else a no-op. `run_file`: the
    run folder's run.json, whose one MLflow run the tracker logs into."""
    if not config.enabled or rank != 0:
        return NoopTracker()
    return MlflowTracker(config, journal_dir=journal_dir, tags=tags, run_file=run_file)


def flatten_config(config: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 0.003}} -> {"optim.lr": "0.003"}; dataclasses are converted first."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    flat: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, prefix=name + "."))
        else:
            flat[name] = str(value)
    return flat


def log_config(tracker: Tracker, config: Mapping[str, Any] | Any, path: str | Path | None = None) -> None:
    """Every leaf of the (nested) config as a `section.key` param, and the whole as `config.yaml`: the file
    at `path` when given (the copy a run keeps in its directory), else a YAML dump of `config`.

    The delivery splits params into MLflow's 100-per-batch limit; values past 6000 chars are truncated
    in the params only, config.yaml keeps them whole."""
    import yaml

    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    tracker.log_params(flatten_config(config))
    if path is not None:
        if Path(path).name != "config.yaml":
            raise ValueError(f"log_config path must name a config.yaml file, got {str(path)!r}")
        tracker.log_artifact(path)
    else:
        tracker.log_text(yaml.safe_dump(_plain(config), sort_keys=False), "config.yaml")


def _plain(value):
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
