"""FlexAttention with a block-sparse BlockMask: the CUDA path (no backward on CPU, so CUDA only).

Exact (tested against the dense mask on an H100) but not yet fast: with a visible boundary every P tokens,
every 128-key block below the diagonal holds one, so the BlockMask skips no block and the kernel does
full causal work plus mask evaluation (measured 3-4x the dense-mask SDPA time at T=4096, batch 1).
The fix is the CPU path's decomposition (attamba/ops/attention/blocked.py): a banded window part and a
part over the gathered boundary keys, merged through their log-sum-exps.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # torch without FlexAttention
    create_block_mask = flex_attention = None

AVAILABLE = flex_attention is not None
_compiled = None
_MASK_CACHE: OrderedDict = OrderedDict()
_MASK_CACHE_SIZE = 64  # one entry per distinct (length, window, boundary pattern): every layer of a deep model


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
    block_mask = _block_mask(seq_len, leading_tokens, boundaries, q.device)
    return _kernel()(q, k, v, block_mask=block_mask, scale=scale)


def _block_mask(seq_len: int, leading_tokens: int | None, boundaries: torch.Tensor | None, device):
    """The BlockMask of (T, L, boundaries), built by a compiled create_block_mask and kept in an LRU cache.

    Building one evaluates the mask on every (query block, key block) pair, which costs more than the
    attention itself when done eagerly each call; a layer's boundaries rarely change between steps
    (cyclic and uniform never, random once per training step), so the pattern's bytes key the cache.
    """
    window = seq_len if leading_tokens is None else leading_tokens
    pattern = b"" if boundaries is None else boundaries.to(dtype=torch.bool).cpu().numpy().tobytes()
    key = (str(device), seq_len, window, pattern)
    cached = _MASK_CACHE.get(key)
    if cached is not None:
        _MASK_CACHE.move_to_end(key)
        return cached
    flags = (torch.zeros(seq_len, dtype=torch.bool, device=device) if boundaries is None
             else boundaries.to(device=device, dtype=torch.bool).clone())  # the cached mask keeps its own copy
    # A tensor, not a Python int: compiled code reads it as an input instead of recompiling for each L.
    window_t = torch.tensor(window, device=device)

    def mask_mod(batch, head, q_idx, kv_idx):
        distance = q_idx - kv_idx
        return (distance >= 0) & ((distance <= window_t) | ((distance > 0) & flags[kv_idx]))

    block_mask = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=device, _compile=True)
    _MASK_CACHE[key] = block_mask
    if len(_MASK_CACHE) > _MASK_CACHE_SIZE:
        _MASK_CACHE.popitem(last=False)
    return block_mask
