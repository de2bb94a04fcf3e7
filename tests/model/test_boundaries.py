"""Chunk ends, cyclic offsets, random draws and segment ids."""

import torch

from attamba import boundaries as bnd


def test_uniform_and_cyclic_ends():
    pos = torch.arange(20)
    ends = bnd.chunk_ends("uniform", 4, 0, 8, pos)
    assert pos[ends].tolist() == [3, 7, 11, 15, 19]
    # cyclic spreads offsets evenly: P=4, 8 layers -> 0,0,1,1,2,2,3,3
    assert [bnd.layer_offset("cyclic", 4, layer, 8) for layer in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [bnd.layer_offset("cyclic", 8, layer, 4) for layer in range(4)] == [0, 2, 4, 6]
    # the released rule is uniform whenever P < n_layers
    assert [bnd.layer_offset("cyclic_released", 4, layer, 8) for layer in range(8)] == [0] * 8
    assert [bnd.layer_offset("cyclic_released", 16, layer, 4) for layer in range(4)] == [0, 4, 8, 12]
    ends = bnd.chunk_ends("cyclic", 4, 2, 8, pos)  # offset 1: ends at 0, 4, 8, ...
    assert pos[ends].tolist() == [0, 4, 8, 12, 16]


def test_random_ends_are_positional_and_seeded():
    pos = torch.arange(4000)
    a = bnd.chunk_ends("random", 8, 1, 4, pos, seed=3)
    assert abs(int(a.sum()) - 500) < 80
    assert torch.equal(a[:1000], bnd.chunk_ends("random", 8, 1, 4, pos[:1000], seed=3))
    assert not torch.equal(a, bnd.chunk_ends("random", 8, 1, 4, pos, seed=4))
    assert not torch.equal(a, bnd.chunk_ends("random", 8, 2, 4, pos, seed=3))
    assert bnd.chunk_ends("random", 1, 0, 1, pos).all()


def test_segment_ids_offsets_and_sink():
    ends = torch.tensor([0, 0, 1, 0, 1, 1, 0, 0], dtype=torch.bool)
    assert bnd.segment_ids(ends).tolist() == [0, 0, 0, 1, 1, 2, 3, 3]
    assert bnd.chunk_offsets(ends).tolist() == [0, 1, 2, 0, 1, 0, 0, 1]
    vis = bnd.visible_boundaries(ends, torch.arange(8))
    assert vis.tolist() == [True, False, True, False, True, True, False, False]
