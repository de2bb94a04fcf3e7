"""What one run of a study or search asks of a cluster (`Resources`), and the arithmetic of fitting it:
a trial's needs, whether the cluster and its nodes can hold one, how many trials run at once. Pure: the
cluster's and nodes' totals come in as dicts (Ray's `cluster_resources()`, each node's `Resources`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from attamba.checks import at_least, one_of, positive

TRIAL_CPU = 0.01          # a 2+ worker trial only waits on its TorchTrainer; zero is refused by Tune
# Ray's placement-group strategies, for the workers of one run: PACK fills a node first, SPREAD spreads them
# where it can, STRICT_PACK puts all on one node, STRICT_SPREAD each on its own node
PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


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
