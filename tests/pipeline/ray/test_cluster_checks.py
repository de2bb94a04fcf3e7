"""Checks made before a study or search trains on a cluster of several nodes: the workers' placement against
each node's resources."""

from __future__ import annotations

import pytest

from pipeline.ray.cluster import PLACEMENTS, Resources, check_placement

NODE = {"CPU": 1.0}


def test_placement_is_one_of_rays_strategies():
    assert PLACEMENTS == ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    assert Resources().placement == "PACK"
    with pytest.raises(ValueError, match=r"resources.placement: unknown placement strategy 'spread'; choose from "
                                         r"PACK, SPREAD, STRICT_PACK, STRICT_SPREAD"):
        Resources(placement="spread")


def test_a_worker_needs_its_cpus_and_gpus_on_one_node_whatever_the_cluster_total():
    check_placement(Resources(cpus_per_worker=0.99), [{"CPU": 0.0}, NODE, NODE])
    # 2 CPUs in all, but no node holds a 1.5-CPU worker: Ray would wait for ever
    with pytest.raises(ValueError, match=r"one worker asks resources.cpus_per_worker=1.5 CPU on one node but no node "
                                         r"of the Ray cluster has that \(nodes: 0 CPU, 1 CPU, 1 CPU\)"):
        check_placement(Resources(cpus_per_worker=1.5), [{"CPU": 0.0}, NODE, NODE])
    with pytest.raises(ValueError, match=r"and resources.gpus_per_worker=1 GPU on one node"):
        check_placement(Resources(gpus_per_worker=1), [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 0.5}])
    check_placement(Resources(gpus_per_worker=1), [{"CPU": 8.0}, {"CPU": 8.0, "GPU": 1.0}])


@pytest.mark.parametrize("placement, nodes, words", [
    ("STRICT_SPREAD", [NODE], "STRICT_SPREAD puts each of resources.workers=2 workers on its own node, but only 1 "
                              "node(s) fit"),
    ("STRICT_PACK", [NODE, NODE], "STRICT_PACK puts all resources.workers=2 workers on one node, but a node fits "
                                  "at most 1"),
    ("PACK", [NODE], "resources.workers=2 workers of resources.cpus_per_worker=0.6 CPU each do not fit"),
])
def test_a_placement_the_nodes_cannot_give_is_refused(placement, nodes, words):
    with pytest.raises(ValueError) as info:
        check_placement(Resources(workers=2, cpus_per_worker=0.6, placement=placement), nodes)
    assert words in str(info.value)


def test_placements_the_nodes_can_give_pass():
    two = [{"CPU": 0.0}, NODE, NODE]
    for placement in PLACEMENTS:
        check_placement(Resources(workers=2, cpus_per_worker=0.49, placement=placement), two)
    check_placement(Resources(workers=2, cpus_per_worker=0.6, placement="STRICT_SPREAD"), two)
    check_placement(Resources(workers=2, cpus_per_worker=0.6, placement="SPREAD"), two)
