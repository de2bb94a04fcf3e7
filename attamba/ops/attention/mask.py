"""The Attamba attention mask (docs/method.md section 3) and argument checks shared by every backend."""

from __future__ import annotations

import torch


def check_mask_args(seq_len: int, boundaries: torch.Tensor | None, leading_tokens: int | None) -> None:
    """Raise ValueError naming the field when `boundaries` or `leading_tokens` cannot describe a mask."""
    if leading_tokens is not None:
        if isinstance(leading_tokens, bool) or not isinstance(leading_tokens, int):
            raise ValueError(f"leading_tokens must be an int >= 0 or None, got {leading_tokens!r}")
        if leading_tokens < 0:
            raise ValueError(f"leading_tokens must be >= 0 (None means no window), got {leading_tokens}")
    if boundaries is not None:
        if not isinstance(boundaries, torch.Tensor):
            raise ValueError(f"boundaries must be a bool tensor of shape [T] or None, got {type(boundaries).__name__}")
        if boundaries.dtype != torch.bool:
            raise ValueError(f"boundaries must have dtype torch.bool, got {boundaries.dtype}; pass a bool mask")
        if tuple(boundaries.shape) != (seq_len,):
            raise ValueError(
                f"boundaries must have shape [T] = [{seq_len}], got {list(boundaries.shape)}; one flag per position"
            )


def attention_mask(
    seq_len: int,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Reference mask, True = visible: [T, T] bool, row = query t, column = key k.

    t sees k iff k <= t and ((k < t and boundaries[k]) or t - k <= leading_tokens).
    boundaries=None means no compressed keys; leading_tokens=None means an unbounded window, so both
    None is full causal attention and boundaries=None with leading_tokens=W-1 is a W-key sliding window.
    """
    check_mask_args(seq_len, boundaries, leading_tokens)
    if device is None and boundaries is not None:
        device = boundaries.device
    pos = torch.arange(seq_len, device=device)
    distance = pos[:, None] - pos[None, :]
    causal = distance >= 0
    if leading_tokens is None:
        window = causal
    else:
        window = causal & (distance <= leading_tokens)
    if boundaries is None:
        return window
    compressed = (distance > 0) & boundaries.to(device)[None, :]
    return window | compressed


def visible_keys(seq_len: int, boundaries: torch.Tensor | None, leading_tokens: int | None) -> torch.Tensor:
    """Number of keys each query sees: int64 [T], computed in O(T) without building the mask.

    Count for query t: min(L+1, t+1) window keys plus the boundaries strictly before the window.
    """
    check_mask_args(seq_len, boundaries, leading_tokens)
    device = boundaries.device if boundaries is not None else None
    t = torch.arange(seq_len, device=device)
    if leading_tokens is None:
        return t + 1
    window = torch.clamp(t + 1, max=leading_tokens + 1)
    if boundaries is None:
        return window
    # Boundaries at positions < t - L: inclusive prefix sum read at t - L - 1.
    prefix = torch.cumsum(boundaries.to(torch.int64), 0)
    before = t - leading_tokens - 1
    earlier = torch.where(before >= 0, prefix[before.clamp(min=0)], torch.zeros_like(t))
    return window + earlier
