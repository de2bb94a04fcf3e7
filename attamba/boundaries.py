"""Where chunks end (docs/method.md section 2): per layer, per strategy, as a function of absolute position.

Every rule here is a pure function of (strategy, P, layer, position, seed), never of the sequence length,
so the parallel forward over a prefix and step-by-step decoding see the same boundaries.

- chunk ends: the last token of each chunk. The K/V SSMs restart after every chunk end; the K/V at a
  chunk end summarises exactly its chunk.
- visible boundaries: chunk ends plus position 0, the always-visible sink. The sink only adds a visible
  key; it does not split the SSM's first chunk.
"""

from __future__ import annotations

import torch

from .config import BOUNDARY_STRATEGIES

_MASK32 = 0xFFFFFFFF


def layer_offset(strategy: str, chunk_size: int, layer: int, n_layers: int) -> int:
    """The shift o_l of layer l's chunk grid: chunks end at positions o_l - 1 + k*P."""
    if strategy in ("uniform", "random"):
        return 0
    if strategy == "cyclic":
        # Offsets spread evenly over [0, P) whatever the ratio of P to the number of layers.
        return (layer * chunk_size // n_layers) % chunk_size
    if strategy == "cyclic_released":
        # The released code's rule: 0 for every layer when P < n_layers.
        return min(chunk_size - 1, layer * (chunk_size // n_layers))
    raise ValueError(f"boundaries must be one of {', '.join(BOUNDARY_STRATEGIES)}, got {strategy!r}")


def _hash_uniform(positions: torch.Tensor, seed: int, layer: int) -> torch.Tensor:
    """A float64 in [0, 1) per position, from a 32-bit integer hash of (seed, layer, position)."""
    # seed & _MASK32: the same value modulo 2**32, and an int64 tensor never overflows with 64-bit seeds
    x = (positions.to(torch.int64) * 2654435761 + ((seed & _MASK32) * 40503 + layer * 97 + 12345)) & _MASK32
    for _ in range(3):
        x = ((x >> 16) ^ x) & _MASK32
        x = (x * 0x45D9F3B) & _MASK32
    x = ((x >> 16) ^ x) & _MASK32
    return x.to(torch.float64) / 2.0**32


def chunk_ends(strategy: str, chunk_size: int, layer: int, n_layers: int, positions: torch.Tensor,
               seed: int = 0) -> torch.Tensor:
    """bool [...] like `positions` (int64 absolute positions): True where a chunk ends."""
    if strategy == "random":
        # About one end every P tokens; P = 1 makes every token its own chunk, as for the other rules.
        return _hash_uniform(positions, seed, layer) < 1.0 / chunk_size
    offset = layer_offset(strategy, chunk_size, layer, n_layers)
    return torch.remainder(positions + 1 - offset, chunk_size) == 0


def visible_boundaries(ends: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Chunk ends plus the sink at position 0."""
    return ends | (positions == 0)


def segment_ids(ends: torch.Tensor) -> torch.Tensor:
    """int32 [T]: chunk index of each token (number of chunk ends strictly before it); monotone."""
    shifted = torch.zeros_like(ends, dtype=torch.int32)
    shifted[1:] = ends[:-1].to(torch.int32)
    return torch.cumsum(shifted, 0, dtype=torch.int32)


def chunk_offsets(ends: torch.Tensor) -> torch.Tensor:
    """int32 [T]: each token's offset within its chunk (what the released code passed as seq_idx)."""
    t = torch.arange(ends.shape[0], device=ends.device, dtype=torch.int64)
    starts = torch.where(torch.cat([ends.new_ones(1), ends[:-1]]), t, torch.zeros_like(t))
    return (t - torch.cummax(starts, 0).values).to(torch.int32)


def draw_training_seed(generator: torch.Generator | None = None) -> int:
    """A fresh seed for random boundaries in a training forward, from torch's RNG (checkpointed state)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
