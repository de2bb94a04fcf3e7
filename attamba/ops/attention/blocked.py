"""Exact Attamba attention in O(T * (T/P + L)) work from a few fused SDPA calls (CPU; also correct on CUDA).

Each query's visible keys split into two disjoint parts:
  window:   keys in [s - L, s + Bq) of its query block [s, s + Bq), under the Attamba mask restricted
            to that range. One SDPA call: the blocks ride in the heads dimension, the overlapping key
            windows are an as_strided view of the left-padded keys.
  boundary: the boundary keys b < s - L, all visible and outside the window. Gathered once; query
            blocks are grouped into superblocks, each one SDPA over a prefix of the gathered keys,
            masked only where a block's prefix is shorter than the superblock's longest.
The parts are merged with their log-sum-exps into one softmax. The backward calls the SDPA backward
per part with the merged output and log-sum-exp, which yields exactly that part's share of dq, dk, dv
(as in ring attention). The backward's window part runs on larger query blocks (BACKWARD_WINDOW_BLOCK)
with a mask that keeps each row's split between the parts where the forward put it.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Fractions of the exact visible-key work allowed as waste: window rows see up to Bq - 1 keys they cannot
# use; boundary rows in a superblock see masked keys up to the superblock's longest prefix.
WINDOW_WASTE = 0.04
BOUNDARY_WASTE = 0.05
BLOCK_SIZES = (64, 32, 16, 8)
# The CPU flash backward kernel pays a large fixed cost per query block: on blocks of 8 rows it ran ~4x
# slower than on blocks of 32 (T=4096, L=32), although 32 rows multiply more masked keys. The window part
# of the backward therefore runs on blocks of at least this many rows (the forward keeps the tight size).
BACKWARD_WINDOW_BLOCK = 32


@dataclass(frozen=True)
class Superblock:
    start: int  # first query row (padded coordinates, multiple of the block size)
    stop: int
    num_keys: int  # length of the boundary-key prefix shared by its rows
    mask: torch.Tensor | None  # [1, 1, stop - start, num_keys] additive; None when every row sees all
    empty_rows: torch.Tensor | None  # bool [stop - start], rows whose prefix is empty (log-sum-exp -inf)


@dataclass(frozen=True)
class WindowBlocks:
    """The window part cut into query blocks: block b holds rows [b*Bq, (b+1)*Bq) and keys [b*Bq - L, (b+1)*Bq).

    (Not to be confused with the SSM's ScanBlocks, tokens moved into scan blocks, nor with a layer's
    LayerChunks, where its chunks end.)"""

    block_size: int
    num_blocks: int
    mask: torch.Tensor  # [1, num_blocks, Bq, L + Bq] additive float


@dataclass(frozen=True)
class BlockedPlan:
    seq_len: int
    leading_tokens: int  # clamped to T - 1: a longer window is full causal
    window: WindowBlocks  # the forward's window part; its blocks are also the superblocks' granularity
    backward_window: WindowBlocks  # the window part of the backward (blocks of >= BACKWARD_WINDOW_BLOCK rows)
    boundary_index: torch.Tensor | None  # int64 [nb]
    superblocks: tuple[Superblock, ...]
    work: int  # query-key pairs the kernels multiply, padding included
    exact: int  # query-key pairs the mask makes visible

    @property
    def block_size(self) -> int:
        return self.window.block_size

    @property
    def num_blocks(self) -> int:
        return self.window.num_blocks


def _additive(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # The CPU flash kernel takes float masks added to the scores; a bool mask is not accepted there.
    zero = torch.zeros((), dtype=dtype, device=visible.device)
    return torch.where(visible, zero, torch.tensor(float("-inf"), dtype=dtype, device=visible.device))


def _choose_block_size(seq_len: int, leading: int, exact: int) -> int:
    # Each window row multiplies L + Bq keys where it needs about L + 1: largest Bq within the waste budget.
    for size in BLOCK_SIZES:
        if seq_len * (size - 1) <= WINDOW_WASTE * exact:
            return size
    return BLOCK_SIZES[-1]


def _superblocks(
    prefix: list[int], block: int, leading: int, dtype: torch.dtype, device: torch.device
) -> tuple[list[Superblock], int]:
    """Greedy grouping of query blocks with prefix[j] boundary keys; returns the groups and their work."""
    groups: list[tuple[int, int]] = []
    j, nblk = 0, len(prefix)
    while j < nblk and prefix[j] == 0:
        j += 1
    while j < nblk:
        first, waste, needed = j, 0, prefix[j] + leading + 1
        j += 1
        while j < nblk:
            extra = waste + (prefix[j] - prefix[j - 1]) * (j - first) * block
            if extra > BOUNDARY_WASTE * (needed + prefix[j] + leading + 1) * block:
                break
            waste, needed = extra, needed + prefix[j] + leading + 1
            j += 1
        groups.append((first, j))
    blocks_prefix = torch.tensor(prefix, dtype=torch.int64, device=device)
    result, work = [], 0
    for first, stop in groups:
        n = prefix[stop - 1]
        rows = torch.repeat_interleave(blocks_prefix[first:stop], block)
        work += n * rows.numel()
        mask = empty = None
        if prefix[first] != n:
            visible = torch.arange(n, device=device)[None, :] < rows[:, None]
            mask = _additive(visible, dtype)[None, None]
            if prefix[first] == 0:
                empty = rows == 0
        result.append(Superblock(first * block, stop * block, n, mask, empty))
    return result, work


def _window_blocks(seq_len: int, boundaries: torch.Tensor | None, leading: int, block: int, dtype: torch.dtype,
                   device: torch.device, partition_block: int | None = None) -> WindowBlocks:
    """Window-part blocks of `block` rows. The window part of row t owns the keys from s - L on, s being the
    start of t's block of `partition_block` rows (default: `block`); the boundary part owns those before.
    """
    partition_block = partition_block or block
    nblk = math.ceil(seq_len / block)
    padded = nblk * block
    span = leading + block
    flags = torch.zeros(padded, dtype=torch.bool, device=device)
    if boundaries is not None:
        flags[:seq_len] = boundaries.to(device)
    t = torch.arange(padded, device=device).view(nblk, block, 1)
    key = (torch.arange(nblk, device=device) * block - leading).view(nblk, 1, 1) + torch.arange(span, device=device)
    distance = t - key
    # Padded rows keep their own (zero) key visible so no row is empty; real rows never reach padded keys.
    flags_at_key = torch.where(key >= 0, flags[key.clamp(0, padded - 1)], torch.zeros_like(distance, dtype=torch.bool))
    visible = (key >= 0) & (distance >= 0) & ((distance <= leading) | ((distance > 0) & flags_at_key))
    if partition_block != block:
        visible &= key >= t // partition_block * partition_block - leading
    return WindowBlocks(block, nblk, _additive(visible, dtype)[None])


def make_plan(
    seq_len: int,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int | None = None,
) -> BlockedPlan:
    """Query blocks and masks for one (T, boundaries, L); they depend on neither batch nor heads."""
    from attamba.ops.attention.mask import visible_keys

    leading = seq_len - 1 if leading_tokens is None else min(leading_tokens, seq_len - 1)
    if leading == seq_len - 1:
        boundaries = None  # the window already holds every earlier key
    exact = int(visible_keys(seq_len, boundaries, leading).sum())
    block = block_size or _choose_block_size(seq_len, leading, exact)
    window = _window_blocks(seq_len, boundaries, leading, block, dtype, device)
    nblk, padded = window.num_blocks, window.num_blocks * block
    backward_block = max(block, BACKWARD_WINDOW_BLOCK)
    backward_window = window if backward_block == block else _window_blocks(
        seq_len, boundaries, leading, backward_block, dtype, device, partition_block=block)
    work = padded * (leading + block)  # forward work: what the FLOP accounting compares with the analytic count
    index, groups = None, []
    if boundaries is not None and bool(boundaries.any()):
        index = torch.nonzero(boundaries.to(device), as_tuple=False)[:, 0]
        starts = torch.arange(nblk, device=device) * block - leading
        prefix = torch.searchsorted(index, starts).tolist()
        groups, boundary_work = _superblocks(prefix, block, leading, dtype, device)
        work += boundary_work
    return BlockedPlan(seq_len, leading, window, backward_window, index, tuple(groups), work, exact)


_PLAN_CACHE: OrderedDict = OrderedDict()
_PLAN_CACHE_SIZE = 64  # one entry per distinct (length, window, boundary pattern): every layer of a deep model


def cached_plan(seq_len: int, boundaries: torch.Tensor | None, leading_tokens: int | None, dtype: torch.dtype,
                device: torch.device, block_size: int | None = None) -> BlockedPlan:
    """make_plan behind an LRU cache keyed by the boundary pattern's bytes: a layer's boundaries rarely
    change between steps (cyclic and uniform never, random once per training step), and a plan costs
    several milliseconds of small ops to build. Plans hold no tensor that a caller could modify."""
    pattern = b"" if boundaries is None else boundaries.to(dtype=torch.bool).cpu().numpy().tobytes()
    key = (str(device), dtype, seq_len, leading_tokens, block_size, pattern)
    plan = _PLAN_CACHE.get(key)
    if plan is not None:
        _PLAN_CACHE.move_to_end(key)
        return plan
    plan = make_plan(seq_len, boundaries, leading_tokens, dtype, device, block_size)
    _PLAN_CACHE[key] = plan
    if len(_PLAN_CACHE) > _PLAN_CACHE_SIZE:
        _PLAN_CACHE.popitem(last=False)
    return plan


def _windows(x: torch.Tensor, seq_len: int, leading: int, blocks: WindowBlocks) -> torch.Tensor:
    """[N, T, D] -> overlapping key windows [N, nblk, L + Bq, D], a view of one left-padded copy."""
    block, nblk = blocks.block_size, blocks.num_blocks
    xp = F.pad(x, (0, 0, leading, nblk * block - seq_len))
    n, _, d = xp.shape
    return xp.as_strided((n, nblk, leading + block, d), (xp.stride(0), block * d, d, 1))


def _fold(windows: torch.Tensor, seq_len: int, leading: int, blocks: WindowBlocks) -> torch.Tensor:
    """Adjoint of _windows: sum overlapping window gradients [N, nblk, L + Bq, D] back to [N, T, D]."""
    n, nblk, span, d = windows.shape
    block = blocks.block_size
    slabs = math.ceil(span / block)
    acc = windows.new_zeros(n, nblk + slabs, block, d)
    for r in range(slabs):
        width = min(block, span - r * block)
        acc[:, r : r + nblk, :width] += windows[:, :, r * block : r * block + width]
    flat = acc.view(n, (nblk + slabs) * block, d)
    return flat[:, leading : leading + seq_len]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero rows appended along dim 1 up to `rows` (which may be fewer than x has: then a slice)."""
    if rows == x.shape[1]:
        return x  # F.pad would copy
    return F.pad(x, (0, 0, 0, rows - x.shape[1])) if rows > x.shape[1] else x[:, :rows]


_flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class _BlockedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan: BlockedPlan, scale: float):
        b, h, t, d = q.shape
        n, nblk, block = b * h, plan.num_blocks, plan.block_size
        qf, kf, vf = (x.reshape(n, t, d) for x in (q, k, v))
        qp = _pad_rows(qf, nblk * block)
        out_w, lse_w = _flash(
            qp.view(n, nblk, block, d), _windows(kf, t, plan.leading_tokens, plan.window),
            _windows(vf, t, plan.leading_tokens, plan.window), 0.0, False, attn_mask=plan.window.mask, scale=scale,
        )
        out, lse = out_w.reshape(n, -1, d), lse_w.reshape(n, -1)
        if plan.superblocks:
            kb, vb = kf.index_select(1, plan.boundary_index), vf.index_select(1, plan.boundary_index)
            out_b, lse_b = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
            for sb in plan.superblocks:
                rows, keys = slice(sb.start, sb.stop), slice(0, sb.num_keys)
                o, l = _flash(
                    qp[:, None, rows], kb[:, None, keys], vb[:, None, keys], 0.0, False,
                    attn_mask=sb.mask, scale=scale,
                )
                out_b[:, rows], lse_b[:, rows] = o[:, 0], l[:, 0]
                if sb.empty_rows is not None:
                    # The kernel reports 0, not -inf, as the log-sum-exp of a row with no visible key.
                    lse_b[:, rows] = lse_b[:, rows].masked_fill(sb.empty_rows, float("-inf"))
                    out_b[:, rows] = out_b[:, rows].masked_fill(sb.empty_rows[:, None], 0.0)
            # One merge for all superblocks: every small elementwise op is a thread barrier, and on a
            # crowded machine barriers, not arithmetic, dominate.
            merged = torch.logaddexp(lse, lse_b)
            keep = torch.exp(lse - merged)[..., None].to(out.dtype)
            add = torch.exp(lse_b - merged)[..., None].to(out.dtype)
            out = torch.addcmul(out * keep, out_b, add)
            lse = merged
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.scale = plan, scale
        return out[:, :t].reshape(b, h, t, d)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        plan, scale = ctx.plan, ctx.scale
        b, h, t, d = q.shape
        n, nblk, block = b * h, plan.num_blocks, plan.block_size
        qf, kf, vf = (x.reshape(n, t, d) for x in (q, k, v))
        # Window part on the backward blocks (larger query blocks, see BACKWARD_WINDOW_BLOCK): every row
        # that is padding there has a zero gradient, so its (zero) log-sum-exp only has to be finite.
        win, leading = plan.backward_window, plan.leading_tokens
        padded = win.num_blocks * win.block_size
        go_w = _pad_rows(grad_out.reshape(n, t, d), padded).contiguous()
        dq_w, dk_w, dv_w = _flash_backward(
            go_w.view(n, win.num_blocks, win.block_size, d),
            _pad_rows(qf, padded).view(n, win.num_blocks, win.block_size, d),
            _windows(kf, t, leading, win), _windows(vf, t, leading, win),
            _pad_rows(out, padded).view(n, win.num_blocks, win.block_size, d),
            _pad_rows(lse[..., None], padded).view(n, win.num_blocks, win.block_size), 0.0, False,
            attn_mask=win.mask, scale=scale,
        )
        dq = _pad_rows(dq_w.reshape(n, padded, d), nblk * block)
        dk, dv = _fold(dk_w, t, leading, win), _fold(dv_w, t, leading, win)
        if plan.superblocks:
            go, qp = _pad_rows(go_w, nblk * block), _pad_rows(qf, nblk * block)
            index = plan.boundary_index
            kb, vb = kf.index_select(1, index), vf.index_select(1, index)
            dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
            for sb in plan.superblocks:
                rows, keys = slice(sb.start, sb.stop), slice(0, sb.num_keys)
                dq_s, dk_s, dv_s = _flash_backward(
                    go[:, None, rows], qp[:, None, rows], kb[:, None, keys], vb[:, None, keys],
                    out[:, None, rows], lse[:, None, rows], 0.0, False, attn_mask=sb.mask, scale=scale,
                )
                dq[:, rows] += dq_s[:, 0]
                dkb[:, keys] += dk_s[:, 0]
                dvb[:, keys] += dv_s[:, 0]
            dk = dk.index_add(1, index, dkb)
            dv = dv.index_add(1, index, dvb)
        shape = (b, h, t, d)
        return dq[:, :t].reshape(shape), dk.reshape(shape), dv.reshape(shape), None, None


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    boundaries: torch.Tensor | None,
    leading_tokens: int | None,
    scale: float | None = None,
    block_size: int | None = None,
) -> torch.Tensor:
    """Exact Attamba attention. q, k, v: [B, H, T, D] (same H) -> [B, H, T, D]; CPU flash kernels."""
    if q.device.type != "cpu":
        # The CUDA variant (aten._scaled_dot_product_efficient_attention + its backward) is not written yet.
        raise ValueError(f"backend 'blocked' runs on CPU tensors only, got device {q.device}; use 'flex' on CUDA")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    plan = cached_plan(q.shape[-2], boundaries, leading_tokens, q.dtype, q.device, block_size)
    return _BlockedAttention.apply(q, k, v, plan, float(scale))
