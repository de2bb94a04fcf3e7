"""The Ray cluster a study or search runs on: which one (one address resolution), connecting to it or
starting a local one, and checking a trial's resources against it before anything is trained."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import sys
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

from attamba.checks import at_least, one_of, positive

TRIAL_CPU = 0.01          # a 2+ worker trial only waits on its TorchTrainer; zero is refused by Tune
OBJECT_STORE_BYTES = 100 * 2**20
RAY_TRAIN_HELPERS = 7     # processes a Ray Train run starts besides its workers (controller, sync actor, ...)
# The raylet's warning when more worker processes start than it expects per CPU (Ray prints it on stdout)
WORKER_START_WARNING = re.compile(r"WARNING: (\d+) PYTHON worker processes have been started on node")
# Ray's placement-group strategies, for the workers of one run: PACK fills a node first, SPREAD spreads them
# where it can, STRICT_PACK puts all on one node, STRICT_SPREAD each on its own node
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resources:
    workers: int = 1               # DeepSpeed data-parallel workers per run (Ray Train workers)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent: int = 0        # trials at once; 0 = as many as the cluster fits
    max_failures: int = 2          # retries of a failed trial, from its last checkpoint
    placement: str = "PACK"        # how a run's 2+ workers spread over nodes (PLACEMENTS)

    def __post_init__(self):
        at_least("resources.workers", self.workers, 1, integer=True)
        positive("resources.cpus_per_worker", self.cpus_per_worker, finite=True)
        at_least("resources.gpus_per_worker", self.gpus_per_worker, 0, finite=True)
        at_least("resources.max_concurrent", self.max_concurrent, 0, integer=True)
        at_least("resources.max_failures", self.max_failures, 0, integer=True, fix="0 = no retries")
        one_of("resources.placement", self.placement, PLACEMENTS, what="placement strategy",
               fix="STRICT_SPREAD puts each worker of a run on its own node, STRICT_PACK all on one")


def resolve_address(given: str | None, configured: str | None) -> str | None:
    """The Ray cluster to use: `--address`, else $RAY_ADDRESS, else the file's `address`; None: a local Ray."""
    return given or os.environ.get("RAY_ADDRESS") or configured


def trainable_resources(resources: Resources) -> dict:
    """What the Tune trainable of one trial asks for. A one-worker run trains in the trainable's own
    process, which therefore holds the worker's CPUs and GPUs; a run of 2+ workers only waits on its
    TorchTrainer, whose workers hold their own."""
    if resources.workers == 1:
        need = {"CPU": resources.cpus_per_worker}
        if resources.gpus_per_worker > 0:
            need["GPU"] = resources.gpus_per_worker
        return need
    return {"CPU": TRIAL_CPU}


def trial_needs(resources: Resources) -> dict:
    """Everything one trial holds while it runs: its trainable and, for 2+ workers, the workers."""
    trainable = trainable_resources(resources)
    if resources.workers == 1:
        return {"CPU": trainable["CPU"], "GPU": trainable.get("GPU", 0.0)}
    return {"CPU": resources.workers * resources.cpus_per_worker + trainable["CPU"],
            "GPU": resources.workers * resources.gpus_per_worker}


def check_resources(resources: Resources, cluster: dict) -> None:
    """ValueError when one trial asks for more than the whole cluster has."""
    need = trial_needs(resources)
    for key, field in (("CPU", "cpus_per_worker"), ("GPU", "gpus_per_worker")):
        have = float(cluster.get(key, 0.0))
        if need[key] > have + 1e-9:
            raise ValueError(
                f"resources.{field}={getattr(resources, field):g} x resources.workers={resources.workers} asks "
                f"{need[key]:g} {key} per trial but the Ray cluster has {have:g} {key}; lower resources.workers or "
                f"resources.{field}, or connect to a bigger cluster (--address)")


def _workers_fitting(resources: Resources, node: dict) -> int:
    """How many of a run's workers fit on a node with resources `node` (Ray's per-node totals)."""
    fits = math.floor(float(node.get("CPU", 0.0)) / resources.cpus_per_worker + 1e-9)
    if resources.gpus_per_worker > 0:
        fits = min(fits, math.floor(float(node.get("GPU", 0.0)) / resources.gpus_per_worker + 1e-9))
    return fits


def check_placement(resources: Resources, nodes: list[dict]) -> None:
    """ValueError when the cluster's nodes (each one's resources) cannot hold one run's workers as
    resources.placement asks: a worker needs its CPUs and GPUs on one node, so a cluster whose total is
    enough can still fit none (Ray would wait for a node forever)."""
    fits = [_workers_fitting(resources, node) for node in nodes]
    per_worker = f"resources.cpus_per_worker={resources.cpus_per_worker:g} CPU" + (
        f" and resources.gpus_per_worker={resources.gpus_per_worker:g} GPU" if resources.gpus_per_worker else "")
    shape = ", ".join(f"{float(n.get('CPU', 0)):g} CPU" + (f" {float(n.get('GPU', 0)):g} GPU" if n.get("GPU") else "")
                      for n in nodes)
    if not any(fits):
        raise ValueError(f"one worker asks {per_worker} on one node but no node of the Ray cluster has that "
                         f"(nodes: {shape}); lower them, or add a bigger node")
    if resources.workers == 1:
        return
    if resources.placement == "STRICT_SPREAD" and sum(f >= 1 for f in fits) < resources.workers:
        raise ValueError(f"resources.placement=STRICT_SPREAD puts each of resources.workers={resources.workers} "
                         f"workers on its own node, but only {sum(f >= 1 for f in fits)} node(s) fit a worker of "
                         f"{per_worker} (nodes: {shape}); lower resources.workers, add nodes, or use SPREAD")
    if resources.placement == "STRICT_PACK" and max(fits) < resources.workers:
        raise ValueError(f"resources.placement=STRICT_PACK puts all resources.workers={resources.workers} workers "
                         f"on one node, but a node fits at most {max(fits)} of {per_worker} (nodes: {shape}); "
                         f"lower resources.workers, or use PACK or SPREAD")
    if sum(fits) < resources.workers:
        raise ValueError(f"resources.workers={resources.workers} workers of {per_worker} each do not fit on the "
                         f"Ray cluster's nodes together ({sum(fits)} fit; nodes: {shape}); lower "
                         f"resources.workers or resources.cpus_per_worker, or add nodes")


def trial_slots(resources: Resources, cluster: dict) -> int:
    """How many trials run at once: max_concurrent, capped by what the cluster fits."""
    need = trial_needs(resources)
    # a small tolerance: 3 trials of 0.1 GPU fit in 0.3 GPU although 0.3 / 0.1 < 3 in floats
    fits = math.floor(float(cluster.get("CPU", 0.0)) / need["CPU"] + 1e-9)
    if need["GPU"] > 0:
        fits = min(fits, math.floor(float(cluster.get("GPU", 0.0)) / need["GPU"] + 1e-9))
    fits = max(1, fits)
    return min(fits, resources.max_concurrent) if resources.max_concurrent else fits


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
