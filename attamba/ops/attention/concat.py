"""Attamba attention over concatenated keys: the formulation of the CUDA path, and its dense CPU reference.

Query t's visible keys (method.md section 3) split into two disjoint parts:
  window:      k in [t - L, t], read from the sequence itself;
  compressed:  boundaries b < t - L, read from a gathered copy of the boundary keys and values.
Keys and values become [window ; compressed] = [k ; k[index]], of length T + nb with nb about T/P, and
one mask over that sequence selects a band (the window) and a staircase (the compressed keys: boundaries
are gathered in position order, so query t sees a prefix of them). Boundaries inside the window are read
from the window only, so no key counts twice. Gradients reach the boundary positions through the gather.

`concat_layout` builds what both paths share (the gather index, the position each concatenated key
stands for, the mask); `concat_attention` evaluates the mask densely and calls SDPA (any device, any
dtype: the reference of the formulation); flex.py hands the same mask to FlexAttention as block tables.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConcatLayout:
    """Where each key of [window ; compressed] comes from, for one (T, boundaries, L) and padding.

    The window part holds the T positions padded to `window_len` (a multiple of `pad`); the compressed
    part `compressed_len` entries: the nb boundaries that some query sees outside its window, then
    padding up to a multiple of `pad` (a power of two number of `pad`-sized blocks when pad > 1, so a
    compiled kernel meets few distinct lengths as random boundaries are redrawn).
    """

    seq_len: int
    leading_tokens: int  # clamped to T - 1: a longer window is full causal
    pad: int
    window_len: int
    num_compressed: int  # nb: real entries of the compressed part
    gather_index: torch.Tensor  # int64 [compressed_len]: source position of each compressed key (0 at padding)
    key_position: torch.Tensor  # int64 [window_len + compressed_len]: position each key stands for

    @property
    def compressed_len(self) -> int:
        return self.gather_index.shape[0]

    @property
    def kv_len(self) -> int:
        return self.window_len + self.compressed_len

    def mask_mod(self):
        """The mask as FlexAttention's mask_mod(batch, head, q_idx, kv_idx) -> bool; dense_mask evaluates it too."""
        return _mask_mod(self.key_position, torch.tensor(self.window_len, device=self.key_position.device),
                         torch.tensor(self.leading_tokens, device=self.key_position.device))

    def dense_mask(self) -> torch.Tensor:
        """bool [window_len, kv_len], row = (padded) query, column = concatenated key."""
        device = self.key_position.device
        rows = torch.arange(self.window_len, device=device)[:, None]
        return self.mask_mod()(None, None, rows, torch.arange(self.kv_len, device=device)[None, :])


def _mask_mod(key_position: torch.Tensor, window_len: torch.Tensor, leading: torch.Tensor):
    # Tensors, not Python ints, in the closure: compiled code reads them as inputs instead of
    # recompiling for each L. Tensor ops only, so FlexAttention can compile it.
    last = key_position.shape[0] - 1

    def visible(batch, head, q_idx, kv_idx):
        """True where query q_idx sees concatenated key kv_idx. Padding keys stand for position
        window_len, which no query's compressed part reaches and no real query's window reaches either."""
        distance = q_idx - kv_idx
        in_window = kv_idx < window_len
        window = in_window & (distance >= 0) & (distance <= leading)
        compressed = ~in_window & (key_position[kv_idx.clamp(max=last)] < q_idx - leading)
        return window | compressed

    return visible


def _round_compressed(count: int, pad: int) -> int:
    if count == 0 or pad == 1:
        return count
    blocks = math.ceil(count / pad)
    return pad * (1 << (blocks - 1).bit_length())


def concat_layout(
    seq_len: int, boundaries: torch.Tensor | None, leading_tokens: int | None, device: torch.device, pad: int = 1
) -> ConcatLayout:
    """The layout of one (T, boundaries [T] bool or None, L or None); pad = block size of the padding."""
    leading = seq_len - 1 if leading_tokens is None else min(leading_tokens, seq_len - 1)
    window_len = math.ceil(seq_len / pad) * pad
    # Boundary b is seen outside the window by some query t <= T - 1 iff b < T - 1 - L.
    reach = max(0, seq_len - 1 - leading)
    if boundaries is None or reach == 0:
        index = torch.zeros(0, dtype=torch.int64, device=device)
    else:
        index = torch.nonzero(boundaries[:reach].to(device), as_tuple=False)[:, 0]
    count = index.shape[0]
    padded = _round_compressed(count, pad)
    gather_index = F.pad(index, (0, padded - count))
    key_position = torch.cat([
        torch.arange(window_len, device=device),
        F.pad(index, (0, padded - count), value=window_len),
    ])
    return ConcatLayout(seq_len, leading, pad, window_len, count, gather_index, key_position)


_LAYOUT_CACHE: OrderedDict = OrderedDict()
_LAYOUT_CACHE_SIZE = 64  # one entry per distinct (length, window, boundary pattern): every layer of a deep model


def cached(key: tuple, build):
    """LRU cache shared by the layouts here and flex.py's block masks, keyed by the boundary pattern's bytes
    (a layer's boundaries rarely change between steps: cyclic and uniform never, random once per step)."""
    value = _LAYOUT_CACHE.get(key)
    if value is not None:
        _LAYOUT_CACHE.move_to_end(key)
        return value
    value = build()
    _LAYOUT_CACHE[key] = value
    if len(_LAYOUT_CACHE) > _LAYOUT_CACHE_SIZE:
        _LAYOUT_CACHE.popitem(last=False)
    return value


def pattern_key(boundaries: torch.Tensor | None) -> bytes:
    return b"" if boundaries is None else boundaries.to(dtype=torch.bool).cpu().numpy().tobytes()


def cached_layout(seq_len: int, boundaries: torch.Tensor | None, leading_tokens: int | None,
                  device: torch.device, pad: int = 1, pattern: bytes | None = None) -> ConcatLayout:
    """concat_layout behind the LRU cache; `pattern` = pattern_key(boundaries) when the caller has it."""
    pattern = pattern_key(boundaries) if pattern is None else pattern
    key = ("layout", str(device), seq_len, leading_tokens, pad, pattern)
    return cached(key, lambda: concat_layout(seq_len, boundaries, leading_tokens, device, pad))


def concat_keys(x: torch.Tensor, layout: ConcatLayout) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, kv_len, D]: the padded sequence, then its gathered boundary rows."""
    padded = F.pad(x, (0, 0, 0, layout.window_len - layout.seq_len))
    if layout.compressed_len == 0:
        return padded
    return torch.cat([padded, x.index_select(2, layout.gather_index)], dim=2)


def pad_queries(q: torch.Tensor, layout: ConcatLayout) -> torch.Tensor:
    """[B, H, T, D] -> [B, H, window_len, D], zero rows appended (their outputs are dropped)."""
    return F.pad(q, (0, 0, 0, layout.window_len - layout.seq_len))


def concat_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    scale: float | None = None,
    pad: int = 1,
) -> torch.Tensor:
    """The concatenated-keys formulation through SDPA with its dense mask. [B, H, T, D] -> [B, H, T, D].

    The reference of the CUDA path (same layout, same mask function); costs T x (T + nb) per head.
    pad > 1 lays the keys out exactly as the CUDA path does, padding included.
    """
    layout = cached_layout(q.shape[-2], boundaries, leading_tokens, q.device, pad)
    out = F.scaled_dot_product_attention(
        pad_queries(q, layout), concat_keys(k, layout), concat_keys(v, layout), attn_mask=layout.dense_mask(),
        scale=scale,
    )
    return out[:, :, : layout.seq_len]
