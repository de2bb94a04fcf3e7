"""Named model sizes: a ladder from a CI-sized model to 1.3B parameters.

A preset fixes the architecture's width and depth; vocabulary, sequence length and the attention variant
come from the run's config. The parameter counts in comments are for vocab 32000, Attamba defaults.
"""

from __future__ import annotations

from dataclasses import fields

from .checks import one_of
from .config import ModelConfig

# name: (dim, n_layers, n_heads)
PRESETS: dict[str, tuple[int, int, int]] = {
    "micro": (32, 2, 2),      # tests: well under 1M parameters at small vocab
    "tiny": (64, 2, 4),
    "mini": (96, 3, 4),
    "small": (128, 4, 4),
    "s60m": (512, 8, 8),      # the paper's 60M model
    "s125m": (768, 12, 12),
    "s350m": (1024, 24, 16),
    "s760m": (1536, 24, 16),
    "s1_3b": (2048, 24, 32),
}


def model_config(size: str, **overrides) -> ModelConfig:
    """ModelConfig for a named size, with any field overridden (e.g. attention="full", chunk_size=4)."""
    one_of("size", size, PRESETS)
    dim, n_layers, n_heads = PRESETS[size]
    known = {f.name for f in fields(ModelConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown model field(s) {', '.join(unknown)}; valid fields: {', '.join(sorted(known))}")
    return ModelConfig(**{"dim": dim, "n_layers": n_layers, "n_heads": n_heads, **overrides})

