"""FlexAttention with a block-sparse BlockMask: the CUDA fast path (no backward on CPU, so CUDA only)."""

from __future__ import annotations

import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    create_block_mask = flex_attention = None

AVAILABLE = flex_attention is not None
_compiled = None


def _kernel():
    # Uncompiled flex_attention materialises the full score matrix; compile once per process.
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attamba attention on CUDA tensors. q, k, v: [B, H, T, D] -> [B, H, T, D]."""
    if not AVAILABLE:
        raise RuntimeError("backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5); use 'blocked'")
    if q.device.type != "cuda":
        raise ValueError(
            f"backend 'flex' runs on CUDA tensors only (FlexAttention has no CPU backward), got device "
            f"{q.device}; use backend='blocked' on CPU"
        )
    seq_len = q.shape[-2]
    window = seq_len if leading_tokens is None else leading_tokens
    if boundaries is None:
        flags = torch.zeros(seq_len, dtype=torch.bool, device=q.device)
    else:
        flags = boundaries.to(q.device)

    def mask_mod(batch, head, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & ((distance <= window) | ((distance > 0) & flags[kv_idx]))

    block_mask = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=q.device)
    return _kernel()(q, k, v, block_mask=block_mask, scale=scale)
