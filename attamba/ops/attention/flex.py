"""FlexAttention over concatenated keys: the CUDA path (FlexAttention has no backward on CPU).

The keys are [window ; compressed] as laid out by concat.py: the padded sequence, then the gathered
boundary keys. The BlockMask lists, per 128-row query block, the key blocks that hold a visible key:
a band of about (L + 128) / 128 + 1 window blocks and a staircase over the compressed blocks (boundaries
strictly before the block's window), so the kernel's work follows T x (T/P + L) instead of T x T.
Blocks where every pair is visible are listed as full (no mask evaluation); the others as partial,
where the kernel evaluates concat.py's mask_mod. The block tables are computed from the layout in
O(T/128 x (T + nb)/128), not by evaluating the mask on every pair; a CPU test checks them against the
dense mask.
"""

from __future__ import annotations

import torch

from attamba.ops.attention.concat import ConcatLayout, cached, cached_layout, concat_keys, pad_queries, pattern_key

try:
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # torch without FlexAttention
    BlockMask = flex_attention = None

AVAILABLE = flex_attention is not None
BLOCK_SIZE = 128  # FlexAttention's sparse block size; the layout pads both parts to multiples of it
_compiled = None


def _kernel():
    # Uncompiled flex_attention materialises the full score matrix; compile once per process.
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def block_grids(layout: ConcatLayout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, full): bool [window_len / block, kv_len / block]; any = the block holds a visible pair,
    full = every pair in it is visible. Needs layout.pad == block."""
    if layout.pad != block:
        raise ValueError(f"block_grids needs a layout padded to the block size {block}, got pad={layout.pad}")
    device, leading = layout.key_position.device, layout.leading_tokens
    num_q, num_window = layout.window_len // block, layout.window_len // block
    first = torch.arange(num_q, device=device)[:, None] * block  # first row of each query block
    last = first + block - 1
    # Window part, key block c: keys [c*B, c*B + B - 1]; visible iff 0 <= t - k <= L.
    key_first = torch.arange(num_window, device=device)[None, :] * block
    key_last = key_first + block - 1
    window_any = (key_first <= last) & (key_last >= first - leading)
    window_full = (key_last <= first) & (last - key_first <= leading)
    # Compressed part: row t sees the first count(t) entries, count(t) = #{b : b < t - L} (positions sorted).
    positions = layout.key_position[layout.window_len: layout.window_len + layout.num_compressed]
    count_first = torch.searchsorted(positions, first - leading)
    count_last = torch.searchsorted(positions, last - leading)
    entry_first = torch.arange(layout.compressed_len // block, device=device)[None, :] * block
    compressed_any = entry_first < count_last
    compressed_full = entry_first + block <= count_first
    return torch.cat([window_any, compressed_any], 1), torch.cat([window_full, compressed_full], 1)


def _tables(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bool [num_q, num_kv] -> (number of listed blocks int32 [1, 1, num_q], their ids int32 [1, 1, num_q, num_kv])."""
    count = grid.sum(-1, dtype=torch.int32)
    ids = torch.argsort(grid.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[None, None], ids[None, None]


def block_mask(layout: ConcatLayout):
    """The BlockMask of a layout padded to BLOCK_SIZE."""
    any_visible, full = block_grids(layout, BLOCK_SIZE)
    partial_count, partial_ids = _tables(any_visible & ~full)
    full_count, full_ids = _tables(full)
    return BlockMask.from_kv_blocks(
        partial_count, partial_ids, full_count, full_ids, BLOCK_SIZE=BLOCK_SIZE, mask_mod=layout.mask_mod(),
        seq_lengths=(layout.window_len, layout.kv_len),
    )


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
    return attend(q, k, v, boundaries, leading_tokens, scale)


def attend(q, k, v, boundaries, leading_tokens, scale=None) -> torch.Tensor:
    """The kernel call without the device check: on CPU it runs forward only (the CPU test of the block
    tables, which the compiled CPU kernel honours as the CUDA one does)."""
    seq_len = q.shape[-2]
    pattern = pattern_key(boundaries)
    layout = cached_layout(seq_len, boundaries, leading_tokens, q.device, BLOCK_SIZE, pattern)
    mask = cached(("block_mask", str(q.device), seq_len, leading_tokens, pattern), lambda: block_mask(layout))
    out = _kernel()(pad_queries(q, layout), concat_keys(k, layout), concat_keys(v, layout), block_mask=mask,
                    scale=scale)
    return out[:, :, :seq_len]
