"""Reference SSD (Mamba2) scans, written for clarity, not speed.

Shapes: x [Bt, T, H, Pd], dt [Bt, T, H] (> 0), A [H] (< 0), B, C [Bt, T, G, N], D [H] or None,
seq_idx [Bt, T] integer or None, initial_state [Bt, H, Pd, N] or None.
Returns y [Bt, T, H, Pd] and, if asked, final_state [Bt, H, Pd, N] (float32 or float64).

Recurrence: h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T ;  y_t = C_t h_t + D x_t.
"""

import torch

from attamba.ops.ssd._checks import check_scan_inputs, compute_dtype


def _heads(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H // G)."""
    return t.repeat_interleave(n_heads // t.shape[-2], dim=-2)


def ssd_naive(x, dt, A, B, C, *, D=None, seq_idx=None, initial_state=None, return_final_state=False):
    """Sequential loop over t; the state resets to zero wherever seq_idx changes from t-1.

    Valid for monotone seq_idx. The initial state is used by the tokens of segment id 0 only, as in
    mamba-ssm's kernels: with seq_idx starting at 0 that is the first segment.
    """
    check_scan_inputs(x, dt, A, B, C, D, seq_idx, initial_state, 1)
    bt, t_len, h, pd = x.shape
    cdt = compute_dtype(x)
    xs, dts, As = x.to(cdt), dt.to(cdt), A.to(cdt)
    Bs, Cs = _heads(B.to(cdt), h), _heads(C.to(cdt), h)
    state = x.new_zeros(bt, h, pd, B.shape[-1], dtype=cdt)
    if initial_state is not None:
        state = initial_state.to(cdt)
        if seq_idx is not None and t_len > 0:
            state = state * (seq_idx[:, 0] == 0).to(cdt)[:, None, None, None]
    ys = []
    for t in range(t_len):
        if seq_idx is not None and t > 0:
            same = (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None, None, None]
            state = state * same
        decay = torch.exp(dts[:, t] * As)[:, :, None, None]
        state = decay * state + (dts[:, t, :, None] * xs[:, t])[..., None] * Bs[:, t, :, None, :]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Cs[:, t]))
    y = torch.stack(ys, dim=1) if ys else xs.new_zeros(bt, 0, h, pd)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xs
    y = y.to(x.dtype)
    return (y, state) if return_final_state else y


def _kernel_masks(seq_idx: torch.Tensor, scan_chunk: int):
    """The rules of mamba-ssm's Triton SSD kernels, as dense masks.

    Returns allowed [Bt, T, T] (token s feeds token t), init_to_y [Bt, T], to_final [Bt, T], init_to_final [Bt].
    - same scan chunk: s <= t and seq_idx[s] == seq_idx[t] (bmm_chunk masks CB by equality);
    - chunk_state: s enters its chunk's state only if seq_idx[s] == seq_idx[last token of its chunk];
    - state_passing: the state crosses the end of chunk k only if seq_idx[end of k] == seq_idx[end of k-1]
      (0 before the first chunk);
    - chunk_scan: row t of chunk c reads the incoming state only if seq_idx[t] == seq_idx[c*Q - 1] (0 for c = 0).
    """
    bt, t_len = seq_idx.shape
    pos = torch.arange(t_len, device=seq_idx.device)
    chunk = pos // scan_chunk
    n_chunks = int(chunk[-1]) + 1
    chunk_end = torch.clamp((torch.arange(n_chunks, device=seq_idx.device) + 1) * scan_chunk, max=t_len) - 1
    end_sid = seq_idx[:, chunk_end]                                         # [Bt, nc]
    prev_end_sid = torch.cat([torch.zeros_like(end_sid[:, :1]), end_sid[:, :-1]], dim=1)
    passes = end_sid == prev_end_sid                                        # [Bt, nc]
    row_reads_state = seq_idx == prev_end_sid[:, chunk]                     # [Bt, T]
    enters_state = seq_idx == end_sid[:, chunk]                             # [Bt, T]

    # blocked[b, k] = number of chunks <= k whose end does not pass the state on.
    blocked = torch.cumsum((~passes).long(), dim=1)
    # The state built in chunk a survives to the start of chunk c > a iff no block in chunks a+1 .. c-1.
    a, c = chunk[None, :], chunk[:, None]                                   # s along columns, t along rows
    blocks_between = blocked[:, (c - 1).clamp(min=0)] - blocked[:, a]       # [Bt, T, T]
    carried = (a < c) & (blocks_between == 0) & row_reads_state[:, :, None] & enters_state[:, None, :]
    same_chunk = (a == c) & (seq_idx[:, :, None] == seq_idx[:, None, :])
    causal = pos[None, :] <= pos[:, None]
    allowed = causal & (same_chunk | carried)

    # The initial state is the incoming state of chunk 0.
    blocks_before = torch.where(chunk[None, :] > 0, blocked[:, (chunk - 1).clamp(min=0)], 0)
    init_to_y = row_reads_state & (blocks_before == 0)
    after = blocked[:, -1:] - blocked[:, chunk]                             # blocks in chunks after s's chunk
    to_final = enters_state & (after == 0)
    init_to_final = blocked[:, -1] == 0
    return allowed, init_to_y, to_final, init_to_final


def ssd_naive_kernel_semantics(x, dt, A, B, C, *, D=None, seq_idx=None, initial_state=None, scan_chunk=64,
                               return_final_state=False):
    """Quadratic reference of mamba_chunk_scan_combined's seq_idx rules, for any seq_idx and scan_chunk.

    y_t = sum_s allowed[t, s] exp(sum_{s<u<=t} dt_u A) (C_t . B_s) dt_s x_s + [init rule] ... + D x_t.
    On monotone seq_idx this equals ssd_naive whatever scan_chunk is.
    """
    check_scan_inputs(x, dt, A, B, C, D, seq_idx, initial_state, scan_chunk)
    bt, t_len, h, pd = x.shape
    cdt = compute_dtype(x)
    xs, dts, As = x.to(cdt), dt.to(cdt), A.to(cdt)
    Bs, Cs = _heads(B.to(cdt), h), _heads(C.to(cdt), h)
    if seq_idx is None:
        seq_idx = torch.zeros(bt, t_len, dtype=torch.long, device=x.device)
    allowed, init_to_y, to_final, init_to_final = _kernel_masks(seq_idx, scan_chunk)

    dA = (dts * As).transpose(1, 2)                                         # [Bt, H, T]
    # seg[t, s] = sum_{u in (s, t]} dA_u, summed exactly (no cumsum difference) for a precise reference.
    strictly_after = torch.tril(torch.ones(t_len, t_len, dtype=torch.bool, device=x.device), -1)
    seg = torch.cumsum(dA[..., :, None].expand(-1, -1, -1, t_len).masked_fill(~strictly_after, 0.0), dim=-2)
    decay = torch.exp(seg.masked_fill(~allowed[:, None], float("-inf")))    # [Bt, H, T, T]
    cb = torch.einsum("bthn,bshn->bhts", Cs, Bs)
    y = torch.einsum("bhts,bsh,bshp->bthp", decay * cb, dts, xs)

    decay_from_start = torch.exp(torch.cumsum(dA, dim=-1))                  # [Bt, H, T]
    if initial_state is not None:
        h0 = initial_state.to(cdt)
        w = decay_from_start * init_to_y[:, None].to(cdt)
        y = y + torch.einsum("bht,bthn,bhpn->bthp", w, Cs, h0)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xs
    y = y.to(x.dtype)
    if not return_final_state:
        return y
    total = decay_from_start[..., -1:] if t_len > 0 else dA.new_ones(bt, h, 1)
    # exp(sum_{u in (s, T-1]} dA_u) written as a reversed cumsum so no division by a tiny decay happens.
    tail = torch.flip(torch.cumsum(torch.flip(dA, [-1]), -1), [-1]) - dA
    w = torch.exp(tail) * dts.transpose(1, 2) * to_final[:, None].to(cdt)   # [Bt, H, T]
    final = torch.einsum("bht,bthp,bthn->bhpn", w, xs, Bs)
    if initial_state is not None:
        final = final + (total * init_to_final[:, None, None].to(cdt))[..., None] * initial_state.to(cdt)
    return y, final
