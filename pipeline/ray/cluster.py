"""The Ray cluster a study or search runs on: which one (one address resolution), connecting to it or
starting a local one, and checking a trial's resources against it before anything is trained."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import signal
import threading
from pathlib import Path

from pipeline.runs.resources import Resources, check_placement, check_resources, trial_slots

OBJECT_STORE_BYTES = 100 * 2**20
RAY_TRAIN_HELPERS = 7     # processes a Ray Train run starts besides its workers (controller, sync actor, ...)
# The raylet's warning when more worker processes start than it expects per CPU (Ray prints it on stdout)
WORKER_START_WARNING = re.compile(r"WARNING: (\d+) PYTHON worker processes have been started on node")

log = logging.getLogger(__name__)


def resolve_address(given: str | None, configured: str | None) -> str | None:
    """The Ray cluster to use: `--address`, else $RAY_ADDRESS, else the file's `address`; None: a local Ray."""
    return given or os.environ.get("RAY_ADDRESS") or configured


def connect(address: str | None) -> bool:
    """Connect to `address` or start a local Ray; True when this process started (and must stop) it."""
    import ray

    common = dict(logging_level=logging.WARNING, log_to_driver=False)
    if address:
        # On a cluster the package comes with the job's runtime env (or is installed on every node); a
        # second runtime env here would conflict with the job's.
        try:
            ray.init(address=address, **common)
        except Exception as error:
            raise RayStartError(f"could not connect to the Ray cluster at {address!r}: {_first_line(error)}; "
                                "check the address (--address, $RAY_ADDRESS or the file's address) and that "
                                "the cluster is up (`ray status --address ...`)") from error
        return False
    # Workers of a local Ray import this package from the same checkout, wherever Ray starts them.
    root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    try:
        ray.init(address="local", include_dashboard=False, object_store_memory=OBJECT_STORE_BYTES,
                 _node_ip_address="127.0.0.1", runtime_env={"env_vars": env}, **common)
    except Exception as error:
        with contextlib.suppress(Exception):
            ray.shutdown()  # whatever half of it did start
        raise RayStartError(f"could not start a local Ray: {_first_line(error)}; a loaded machine can be too slow "
                            "for Ray's start-up timeouts: run the same command again, or start Ray yourself "
                            "(`ray start --head`) and pass --address") from error
    return True


def expected_processes(resources: Resources, slots: int) -> int:
    """Ray worker processes a study's running trials need: each trial's trainable and, for 2+ workers,
    its Ray Train workers and helpers."""
    per_trial = 1 + (resources.workers + RAY_TRAIN_HELPERS if resources.workers > 1 else 0)
    return slots * per_trial


class QuietRayStdout:
    """A stream over `stream` that drops the raylet's worker-start warning while the number of processes
    it names is within twice what the trials need (`expected`): on a machine with few cores Ray warns as
    soon as a few trials start their processes, which is expected. More than that (a leak, trials that
    start far more actors than planned) is shown. Whole lines are filtered; anything else passes."""

    def __init__(self, stream, expected: int):
        self.stream, self.expected = stream, expected
        self._partial = ""
        self._lock = threading.Lock()     # Ray prints from a background thread

    def keep(self, line: str) -> bool:
        match = WORKER_START_WARNING.search(line)
        if match and int(match.group(1)) <= 2 * self.expected:
            log.info("hidden (expected for %d trial processes): %s", self.expected, line.strip())
            return False
        return True

    def write(self, text: str) -> int:
        with self._lock:
            *lines, self._partial = (self._partial + text).split("\n")
            kept = "".join(line + "\n" for line in lines if self.keep(line))
            if kept:
                self.stream.write(kept)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._partial and self.keep(self._partial):
                self.stream.write(self._partial)
            self._partial = ""
            self.stream.flush()

    def __getattr__(self, name):
        return getattr(self.stream, name)


class RayStartError(ValueError):
    """Ray could not be started or reached; the message says what to do (a ValueError, so the CLI prints
    it as one line and exits 2, as for any error the user can act on)."""


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


@contextlib.contextmanager
def _stop_on_signals():
    """SIGTERM (and SIGHUP) become KeyboardInterrupt, like Ctrl-C, for the body: the `finally` blocks run
    and a Ray this process started shuts down instead of leaving its helper processes behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: a handler set outside Python


@dataclasses.dataclass(frozen=True)
class RaySession:
    slots: int                  # trials that fit at once
    cluster: dict               # the cluster's resources when the session began


@contextlib.contextmanager
def ray_session(address: str | None, resources: Resources, shared: dict[str, Path] | None = None):
    """Ray connected (a local one started when `address` is empty) and the cluster checked against
    `resources`, node by node; on a cluster of several nodes, every folder of `shared` (what it holds ->
    folder) checked to be the same on every node (`storage.check_shared`). A Ray started here stops on exit,
    whatever happened: an error, Ctrl-C, SIGTERM or SIGHUP (only SIGKILL leaves its processes to Ray's own
    clean-up). A start failure is one RayStartError."""
    import ray

    # Tune's own SIGINT handler would stop trials and return normally; a KeyboardInterrupt is what the CLI
    # turns into "interrupted; run the same command again".
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    started = connect(address)
    stdout = sys.stdout
    try:
        # After ray.init: Ray's core installs a fatal-signal handler of its own that aborts on SIGTERM.
        with _stop_on_signals():
            cluster = ray.cluster_resources()
            check_resources(resources, cluster)
            nodes = [n for n in ray.nodes() if n.get("Alive")]
            check_placement(resources, [n.get("Resources", {}) for n in nodes])
            if shared:
                from pipeline.ray import storage

                if storage.needs_check(nodes, ray.get_runtime_context().get_node_id(), address):
                    storage.check_shared(shared, nodes)
            slots = trial_slots(resources, cluster)
            sys.stdout = QuietRayStdout(stdout, expected_processes(resources, slots))
            yield RaySession(slots, cluster)
    finally:
        if started:
            ray.shutdown()
        if isinstance(sys.stdout, QuietRayStdout):
            sys.stdout.flush()
        sys.stdout = stdout
