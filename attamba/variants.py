"""Evaluation variants: a trained model's weights evaluated under another attention setting.

Attamba's attention settings (P, L, boundaries, segmentation, pseudo-chunk) and a transformer's window
change which keys a query sees, never a parameter; so the same weights load into the model built with
them. A variant is a mapping of such fields; `evaluated_as` gives the config a run's weights are evaluated
as (None where the variant does not apply to that kind of run), `check_same_shapes` refuses anything that
would change a parameter's shape.
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch

from .checks import fail
from .config import ModelConfig

# Fields an Attamba run may be evaluated with; `window` is the transformers' (full, iso_kv, swa).
ATTAMBA_FIELDS = ("chunk_size", "leading_tokens", "boundaries", "boundary_seed", "ssm_segmentation", "pseudo_chunk")
WINDOW_FIELDS = ("window",)
VARIANT_FIELDS = ATTAMBA_FIELDS + WINDOW_FIELDS
_ONLY_ATTENTION = ("evaluation variants may only change the attention setting: "
                   + ", ".join(VARIANT_FIELDS) + " (the weights must load unchanged)")


def check_variant(overrides, where: str) -> dict:
    """A validated copy of one variant, `where` its place in the config (e.g. "eval.variants[2]"); a
    "model." prefix on a key is accepted. Values are checked as ModelConfig checks them."""
    if not isinstance(overrides, dict) or not overrides:
        fail(where, overrides, "a non-empty mapping of model fields to values, e.g. {chunk_size: 16}")
    out = {}
    for key, value in overrides.items():
        name = key[len("model."):] if isinstance(key, str) and key.startswith("model.") else key
        if name not in VARIANT_FIELDS:
            fail(f"{where}.{key}", value, "an attention setting", _ONLY_ATTENTION)
        out[name] = value
    kinds = [bool(set(out) & set(ATTAMBA_FIELDS)), bool(set(out) & set(WINDOW_FIELDS))]
    if all(kinds):
        fail(where, overrides, "either Attamba fields or a window, not both",
             "a window applies to transformers, the others to Attamba: list them as two variants")
    try:  # the values, checked by ModelConfig itself
        replace(ModelConfig(vocab_size=2, dim=8, n_layers=1, n_heads=1, max_seq_len=8), **out)
    except ValueError as exc:
        raise ValueError(f"{where}.{exc}") from None
    return out


def evaluated_as(cfg: ModelConfig, overrides: dict) -> ModelConfig | None:
    """The config `cfg`'s weights are evaluated as under `overrides` (from check_variant); None where the
    variant does not apply to this kind of run. A window on a full transformer is the swa model; on an
    iso_kv transformer it is the same module with its sliding_window on."""
    if set(overrides) <= set(ATTAMBA_FIELDS):
        return replace(cfg, **overrides) if cfg.attention == "attamba" else None
    window = overrides["window"]
    if cfg.attention in ("full", "swa"):
        return replace(cfg, attention="swa", window=window)
    if cfg.attention == "iso_kv":
        return replace(cfg, window=window, sliding_window=True)
    return None


def changed_fields(base: ModelConfig, new: ModelConfig) -> str:
    """The fields `new` sets differently from `base`, as "field=value,...", in declaration order."""
    def text(v):
        return str(v).lower() if isinstance(v, bool) else str(v)
    return ",".join(f"{f.name}={text(getattr(new, f.name))}" for f in fields(ModelConfig)
                    if getattr(new, f.name) != getattr(base, f.name))


def check_same_shapes(base: ModelConfig, new: ModelConfig, what: str) -> None:
    """Refuse `new` unless every parameter of AttambaLM(new) has the name and shape it has in AttambaLM(base).
    Both are built on the meta device: no memory, no compute."""
    from .model import AttambaLM

    with torch.device("meta"):
        a, b = AttambaLM(base).state_dict(), AttambaLM(new).state_dict()
    for name in sorted(set(a) | set(b)):
        shape_a = tuple(a[name].shape) if name in a else "absent"
        shape_b = tuple(b[name].shape) if name in b else "absent"
        if shape_a != shape_b:
            raise ValueError(f"{what} changes parameter {name} from {shape_a} to {shape_b}; {_ONLY_ATTENTION}")
