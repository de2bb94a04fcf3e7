"""Run the scan with every segment moved to start on a scan-chunk start, then move results back.

With monotone seq_idx and segments of at most `block` tokens, the aligned layout puts each segment
alone in one scan chunk of `block` tokens: the chunked backend then needs no state passing and its
quadratic part is only block x block. Padding tokens have dt = 0 and x = B = C = 0, so they change nothing.
"""

import torch


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
    pos = torch.arange(t_len, device=dev).expand(bt, t_len)
    is_start = torch.ones_like(seq_idx, dtype=torch.bool)
    is_start[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    seg = torch.cumsum(is_start.long(), dim=1) - 1                          # segment number of each token
    seg_start = torch.cummax(torch.where(is_start, pos, 0), dim=1).values
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
