"""Attamba attention (docs/method.md section 3) with a dense-mask reference and fast paths.

Backends: "naive" (dense T x T mask + SDPA), "blocked" (exact, O(T * (T/P + L)) work, CPU flash kernels),
"concat" (SDPA over [window keys ; gathered boundary keys] with a dense mask: the reference of "flex"),
"flex" (FlexAttention over those concatenated keys with a block-sparse mask, O(T * (T/P + L)) work, CUDA
only) and "auto": full causal attention goes to SDPA(is_causal=True), what a transformer pays; otherwise
"flex" on CUDA and "blocked" elsewhere. The default comes from the environment variable
ATTAMBA_ATTENTION_BACKEND, read once at import; `backend=` overrides it per call.
An explicitly named backend that cannot run raises; it never falls back silently.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from attamba.ops.attention import flex as _flex
from attamba.ops.attention import flops as _flops
from attamba.ops.attention.blocked import blocked_attention
from attamba.ops.attention.concat import concat_attention
from attamba.ops.attention.mask import attention_mask, check_mask_args, visible_keys
from attamba.ops.attention.naive import einsum_attention, naive_attention

BACKENDS = ("auto", "naive", "blocked", "concat", "flex")
KERNELS = ("causal", "naive", "blocked", "concat", "flex")
ENV_VAR = "ATTAMBA_ATTENTION_BACKEND"

_flops.register()


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "flex" and not _flex.AVAILABLE:
        raise RuntimeError(
            f"{source}='flex' but torch.nn.attention.flex_attention cannot be imported; choose 'blocked' or 'auto'"
        )
    return name


DEFAULT_BACKEND = _check_backend(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def resolve_backend(backend: str | None, device: torch.device, full_causal: bool) -> str:
    """The kernel a call will use, one of KERNELS: `backend` (None: the default), "auto" being causal SDPA for
    full causal attention (`full_causal`), else "flex" on CUDA where FlexAttention imports and "blocked"."""
    name = DEFAULT_BACKEND if backend is None else _check_backend(backend, "backend")
    if name != "auto":
        return name
    if full_causal:
        return "causal"
    return "flex" if device.type == "cuda" and _flex.AVAILABLE else "blocked"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    boundaries: torch.Tensor | None = None,
    leading_tokens: int | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attamba attention. q, k, v: [B, H, T, D] (same H); boundaries: bool [T] or None -> out [B, H, T, D].

    Query t sees key k iff k <= t and ((k < t and boundaries[k]) or t - k <= leading_tokens).
    boundaries=None, leading_tokens=None is full causal; boundaries=None, leading_tokens=W-1 a W-key window.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"q, k, v must share the shape [B, H, T, D], got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}; "
            "repeat k/v heads before calling"
        )
    seq_len = q.shape[-2]
    check_mask_args(seq_len, boundaries, leading_tokens)
    # A window of T or more keys already contains every earlier position.
    full_causal = leading_tokens is None or leading_tokens >= seq_len - 1
    kernel = resolve_backend(backend, q.device, full_causal)
    if kernel == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    elif kernel == "naive":
        return naive_attention(q, k, v, boundaries, leading_tokens, scale)
    elif kernel == "blocked":
        return blocked_attention(q, k, v, boundaries, leading_tokens, scale)
    elif kernel == "concat":
        return concat_attention(q, k, v, boundaries, leading_tokens, scale)
    elif kernel == "flex":
        return _flex.flex_attention_forward(q, k, v, boundaries, leading_tokens, scale)
    else:
        raise ValueError(f"attention kernel must be one of {KERNELS}, got {kernel!r}")


__all__ = [
    "BACKENDS",
    "KERNELS",
    "attention",
    "attention_mask",
    "blocked_attention",
    "concat_attention",
    "einsum_attention",
    "naive_attention",
    "resolve_backend",
    "visible_keys",
]
