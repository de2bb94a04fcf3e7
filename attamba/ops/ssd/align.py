"""Run the scan with every segment moved to start on a scan-chunk start, then move results back.

With monotone seq_idx and segments of at most `block` tokens, the aligned layout puts each segment
alone in one scan chunk of `block` tokens: the chunked backend then needs no state passing and its
quadratic part is only block x block. Padding tokens have dt = 0 and x = B = C = 0, so they change nothing.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _segments(seq_idx: torch.Tensor):
    """seq_idx [Bt, T] -> (positions [Bt, T], is_start bool [Bt, T], start of each token's segment [Bt, T])."""
    bt, t_len = seq_idx.shape
    pos = torch.arange(t_len, device=seq_idx.device).expand(bt, t_len)
    is_start = torch.ones_like(seq_idx, dtype=torch.bool)
    is_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return pos, is_start, torch.cummax(torch.where(is_start, pos, 0), dim=1).values


def aligned_layout(seq_idx: torch.Tensor, block: int):
    """seq_idx [Bt, T] monotone -> (new_pos [Bt, T], src [Bt, T'], aligned_seq_idx [Bt, T']).

    new_pos[b, t] is token t's position in the aligned layout; src[b, j] is the token at aligned position j,
    or T for padding. Segment i starts at the sum of its predecessors' lengths rounded up to `block`.
    """
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be an int >= 1, got {block!r}")
    if seq_idx.dim() != 2:
        raise ValueError(f"seq_idx must be [Bt, T], got shape {tuple(seq_idx.shape)}")
    if bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any()):
        raise ValueError("seq_idx must be non-decreasing along T for the aligned layout; "
                         "use ssd_scan for the kernels' rules on arbitrary seq_idx")
    bt, t_len = seq_idx.shape
    dev = seq_idx.device
    pos, is_start, seg_start = _segments(seq_idx)
    seg = torch.cumsum(is_start.long(), dim=1) - 1                          # segment number of each token
    lengths = torch.zeros(bt, t_len, dtype=torch.long, device=dev).scatter_add_(1, seg, torch.ones_like(seg))
    padded = (lengths + block - 1) // block * block
    aligned_start = torch.cumsum(padded, dim=1) - padded
    new_pos = aligned_start.gather(1, seg) + (pos - seg_start)
    t_new = int(padded.sum(dim=1).max())
    rows = torch.arange(bt, device=dev)[:, None]
    src = torch.full((bt, t_new), t_len, dtype=torch.long, device=dev)
    src[rows, new_pos] = pos
    # Padding inherits the id of the segment before it (ids are non-decreasing, so a running max fills it).
    filled = torch.full((bt, t_new), -1, dtype=seq_idx.dtype, device=dev)
    filled[rows, new_pos] = seq_idx
    aligned_seq_idx = torch.cummax(filled, dim=1).values
    return new_pos, src, aligned_seq_idx


def to_aligned(t: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """[Bt, T, ...] -> [Bt, T', ...], zeros at padding (differentiable)."""
    ext = torch.cat([t, t.new_zeros(t.shape[0], 1, *t.shape[2:])], dim=1)
    return ext[torch.arange(t.shape[0], device=t.device)[:, None], src]


def from_aligned(t: torch.Tensor, new_pos: torch.Tensor) -> torch.Tensor:
    """[Bt, T', ...] -> [Bt, T, ...] (differentiable)."""
    return t[torch.arange(t.shape[0], device=t.device)[:, None], new_pos]


@dataclass(frozen=True)
class ScanBlocks:
    """A batch's tokens moved into SSD scan blocks of `block` tokens, each segment starting a block (the
    aligned layout): [Bt, T, ...] <-> [Bt, nb * block, ...].

    Where every sequence's segments are the same and all but the first and last are `block` long (uniform
    and cyclic chunks), the layout is a shift: aligned position = t + shift (the first segment ends its
    block), so moving there is a pad and moving back a slice. Otherwise gather: int64 [Bt * nb * block],
    rows of the [Bt * (T + 1), F] table that stacks each sequence's T rows and one zero row (padding), and
    scatter: int64 [Bt * T], rows of the [Bt * nb * block] aligned table in token order.
    seq_idx: [Bt, nb * block], the aligned segment ids.
    """

    block: int
    num_blocks: int
    seq_len: int
    shift: int | None
    gather: torch.Tensor | None
    scatter: torch.Tensor | None
    seq_idx: torch.Tensor

    def to_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[Bt, T, F] -> [Bt, nb * block, F], zeros at padding (differentiable)."""
        bt, t_len, feat = x.shape
        if self.shift is not None:
            return F.pad(x, (0, 0, self.shift, self.num_blocks * self.block - t_len - self.shift))
        table = F.pad(x, (0, 0, 0, 1)).reshape(-1, feat)
        return table.index_select(0, self.gather).view(bt, -1, feat)

    def from_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """[Bt, nb * block, F] -> [Bt, T, F] (differentiable)."""
        bt, _, feat = x.shape
        if self.shift is not None:
            return x[:, self.shift: self.shift + self.seq_len]
        return x.reshape(-1, feat).index_select(0, self.scatter).view(bt, self.seq_len, feat)


def scan_blocks(seq_idx: torch.Tensor, block: int) -> ScanBlocks | None:
    """ScanBlocks for monotone seq_idx [Bt, T], or None when a segment is longer than `block`."""
    bt, t_len = seq_idx.shape
    dev = seq_idx.device
    pos, is_start, seg_start = _segments(seq_idx)
    if int((pos - seg_start).max()) >= block:
        return None
    starts = torch.nonzero(is_start[0])[:, 0]
    lengths = torch.diff(starts, append=starts.new_tensor([t_len]))
    if bool((seq_idx == seq_idx[:1]).all()) and bool((lengths[1:-1] == block).all()):
        # Regular chunks: right-align the first segment in its block and everything is one shift. The
        # padding in front gets an id of its own (ids move up by one to keep them non-negative): the scan
        # then keeps it apart, and the conv reads its zero inputs exactly as a zero state.
        shift = block - int(lengths[0])
        nb = -(-(t_len + shift) // block)
        ids = seq_idx + 1
        aligned_idx = torch.cat([ids.new_zeros(bt, shift), ids, ids[:, -1:].expand(bt, nb * block - t_len - shift)], 1)
        return ScanBlocks(block, nb, t_len, shift, None, None, aligned_idx)
    new_pos, src, aligned_idx = aligned_layout(seq_idx, block)
    nb = src.shape[1] // block
    rows = torch.arange(bt, device=dev)
    gather = (src + (rows * (t_len + 1))[:, None]).reshape(-1)
    scatter = (new_pos + (rows * nb * block)[:, None]).reshape(-1)
    return ScanBlocks(block, nb, t_len, None, gather, scatter, aligned_idx)
