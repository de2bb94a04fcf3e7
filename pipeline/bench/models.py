"""What every model benchmark builds: an Attamba LM and the full transformer of the same shape."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class BenchModels:
    """Two models of `dim` x `n_layers` x `n_heads` over `vocab` tokens: Attamba with chunk size P =
    `chunk_size`, L = `leading_tokens` and `boundaries`, and the full transformer."""

    chunk_size: int = 8
    leading_tokens: int = 32
    dim: int = 512
    n_layers: int = 4
    n_heads: int = 8
    vocab: int = 4096
    boundaries: str = "cyclic"
