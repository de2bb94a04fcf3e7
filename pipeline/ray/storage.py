"""Is every output folder on storage every Ray node shares? Checked before a multi-node study or search starts.

A run's trial may start on any node and, after a node is lost, resume on another: its run folder (with the
checkpoints), the token cache and a SQLite MLflow store must be the same folders, with the same content, on
every node. A folder that merely exists everywhere is not enough (an image that creates `/data/attamba` on
each node's own disk passes that test); so the driver writes a probe file with a random token into each
folder and a task pinned to every alive node (NodeAffinitySchedulingStrategy) reads it back. Any node that
sees no probe, or another token, stops the driver with one line naming the folder and the node.

A cluster of one node that is the driver's own needs no check. Through Ray Client (`ray://`) the driver runs
elsewhere than the cluster, so there every node is checked, even one.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

PROBE_PREFIX = ".attamba-shared-probe-"
CHECK_TIMEOUT_S = 180.0     # a node's check task includes starting a Python worker there
DOCS = "docs/cluster.md"


def look(probes: dict[str, str]) -> dict:
    """On a node: which probe files (path -> token) this node cannot read with the driver's token.
    Returns {"host", "missing": [(path, what this node saw)]}."""
    missing = []
    for path, token in probes.items():
        try:
            seen = Path(path).read_text()
        except FileNotFoundError:
            missing.append((path, "no such file"))
            continue
        except OSError as error:
            missing.append((path, f"unreadable: {error.strerror or error}"))
            continue
        if seen != token:
            missing.append((path, "another file of that name (a different disk mounted at the same path)"))
    return {"host": socket.gethostname(), "missing": missing}


def needs_check(nodes: list[dict], driver_node: str | None, address: str | None) -> bool:
    """False only for a cluster of one node that the driver runs on."""
    if address and address.startswith("ray://"):
        return True
    return len(nodes) > 1 or any(n["NodeID"] != driver_node for n in nodes)


def refusal(label: str, folder: Path, node: dict, host: str, saw: str) -> str:
    """The one-line error for `folder` (what it holds: `label`) not visible from `node`."""
    home = os.environ.get("ATTAMBA_HOME", "").strip()
    under = f" (under ATTAMBA_HOME={home})" if home and Path(folder).is_relative_to(home) else ""
    fix = ("mount one shared folder (NFS, EFS, Filestore, a ReadWriteMany volume) at the same path on every node "
           "and set ATTAMBA_HOME" + (" and ATTAMBA_CACHE" if "cache" in label else "") + f" to it ({DOCS})")
    return (f"{label} {str(folder)!r}{under} is not on storage every Ray node shares: node "
            f"{node.get('NodeManagerAddress', '?')} ({host}, node id {node['NodeID'][:12]}) does not see the probe "
            f"file the driver wrote there ({saw}); {fix}")


def check_shared(folders: dict[str, Path], nodes: list[dict], timeout: float = CHECK_TIMEOUT_S) -> None:
    """ValueError unless every node of `nodes` (ray.nodes() entries, alive) reads the probe the driver writes
    into each of `folders` (label -> folder, created if missing). The probes are removed afterwards."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probes, by_path = {}, {}
    for label, folder in folders.items():
        folder = Path(folder).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        token = uuid.uuid4().hex
        path.write_text(token)
        probes[str(path)], by_path[str(path)] = token, (label, folder)
    task = ray.remote(num_cpus=0, max_retries=0)(look)
    try:
        refs = {task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(probes): n for n in nodes}
        ready, pending = ray.wait(list(refs), num_returns=len(refs), timeout=timeout)
        if pending:
            node = refs[pending[0]]
            raise ValueError(f"node {node.get('NodeManagerAddress', '?')} (node id {node['NodeID'][:12]}) did not "
                             f"answer the shared-storage check within {timeout:.0f} s; check that it is healthy "
                             f"(`ray status`) and can start Python workers with this package installed")
        for ref in ready:
            node = refs[ref]
            try:
                seen = ray.get(ref)
            except Exception as error:
                raise ValueError(f"the shared-storage check failed on node {node.get('NodeManagerAddress', '?')} "
                                 f"(node id {node['NodeID'][:12]}): {str(error).strip().splitlines()[-1]}; "
                                 f"every node needs this package installed (the image, or the job's "
                                 f"runtime env)") from None
            if seen["missing"]:
                path, saw = seen["missing"][0]
                label, folder = by_path[path]
                raise ValueError(refusal(label, folder, node, seen["host"], saw))
    finally:
        for path in probes:
            Path(path).unlink(missing_ok=True)
