"""Dense-mask references: what the released code did (a full T x T mask), written for clarity, not speed."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attamba.ops.attention.mask import attention_mask


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention through SDPA with the dense boolean mask. q, k, v: [B, H, T, D] -> [B, H, T, D].

    Costs B*H*T*T*D work whatever the mask: this is the reference the fast paths are measured against.
    """
    mask = attention_mask(q.shape[-2], boundaries, leading_tokens, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def einsum_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax(q k^T * scale + mask) v spelled out; the reference of the reference. [B, H, T, D] -> [B, H, T, D]."""
    mask = attention_mask(q.shape[-2], boundaries, leading_tokens, device=q.device)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    # Every query sees at least itself (t - t = 0 <= L), so no row is all -inf and softmax stays finite.
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v)
