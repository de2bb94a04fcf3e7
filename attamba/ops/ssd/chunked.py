"""Chunked SSD scan in pure PyTorch, with mamba-ssm's seq_idx rules (the default backend).

Within a scan chunk of Q tokens the scan is a masked quadratic form; across chunks a per-chunk state is
passed on. Where no token reads the state passed into a chunk (every chunk start is a segment start,
which ssd_scan_aligned arranges), the passing is skipped: that is most of the speed for Attamba's short
chunks.
"""

import torch
import torch.nn.functional as F

from attamba.ops.ssd._checks import check_scan_inputs, compute_dtype


def ssd_chunked(x, dt, A, B, C, *, D=None, seq_idx=None, initial_state=None, scan_chunk=64,
                return_final_state=False):
    """x [Bt, T, H, Pd], dt [Bt, T, H], A [H], B/C [Bt, T, G, N], D [H], seq_idx [Bt, T],
    initial_state [Bt, H, Pd, N] -> y [Bt, T, H, Pd] (x.dtype) (, final_state [Bt, H, Pd, N] float32/64)."""
    check_scan_inputs(x, dt, A, B, C, D, seq_idx, initial_state, scan_chunk)
    bt, t_len, h, pd = x.shape
    g, n = B.shape[2:]
    r = h // g
    q = scan_chunk
    nc = -(-t_len // q)
    pad = nc * q - t_len
    cdt = compute_dtype(x)

    # Padding tokens have dt = 0: they add nothing and do not decay, so results are unchanged.
    xc = F.pad(x.to(cdt), (0, 0, 0, 0, 0, pad)).view(bt, nc, q, g, r, pd)
    dtc = F.pad(dt.to(cdt), (0, 0, 0, pad)).view(bt, nc, q, g, r)
    Bc = F.pad(B.to(cdt), (0, 0, 0, 0, 0, pad)).view(bt, nc, q, g, n)
    Cc = F.pad(C.to(cdt), (0, 0, 0, 0, 0, pad)).view(bt, nc, q, g, n)
    if seq_idx is None:
        sid = torch.zeros(bt, nc, q, dtype=torch.long, device=x.device)
    else:
        # Repeating the last id keeps "the chunk's last token" = the last real token, as the kernels read it.
        sid = torch.cat([seq_idx, seq_idx[:, -1:].expand(bt, pad)], dim=1).view(bt, nc, q)

    cs = torch.cumsum(dtc * A.to(cdt).view(g, r), dim=2)                   # [Bt, nc, Q, G, R]

    # Intra-chunk: token s feeds t (s <= t) iff their ids match.
    causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=x.device))
    allowed = causal & (sid[..., :, None] == sid[..., None, :])            # [Bt, nc, Q(t), Q(s)]
    cs_t = cs.permute(0, 1, 3, 4, 2)                                        # [Bt, nc, G, R, Q]
    diff = cs_t[..., :, None] - cs_t[..., None, :]
    # Mask before exp: exp of the (positive) upper triangle could overflow and poison the gradient.
    decay = torch.exp(diff.masked_fill(~allowed[:, :, None, None], float("-inf")))
    cb = torch.einsum("bctgn,bcsgn->bcgts", Cc, Bc)                         # [Bt, nc, G, Q, Q]
    w = decay * cb[:, :, :, None] * dtc.permute(0, 1, 3, 4, 2)[..., None, :]
    if D is not None:
        # The skip D x_t rides on the diagonal of the (small) mixing weights: no pass over y and x for it.
        w = w + D.to(cdt).view(g, r, 1, 1) * torch.eye(q, dtype=cdt, device=x.device)
    y = torch.einsum("bcgrts,bcsgrp->bctgrp", w, xc)

    end_sid = sid[:, :, -1]                                                 # [Bt, nc]
    prev_sid = torch.cat([torch.zeros_like(end_sid[:, :1]), end_sid[:, :-1]], dim=1)
    passes = end_sid == prev_sid                                            # state crosses the end of chunk c
    reads = (sid == prev_sid[..., None]).to(cdt)                            # row reads the incoming state
    chunk_decay = torch.exp(cs[:, :, -1])                                   # [Bt, nc, G, R]

    def local_state(c0: int) -> torch.Tensor:
        """States built inside chunks c0.. from their own tokens: [Bt, nc - c0, G, R, Pd, N]."""
        enters = (sid[:, c0:] == end_sid[:, c0:, None]).to(cdt)
        wt = torch.exp(cs[:, c0:, -1:] - cs[:, c0:]) * dtc[:, c0:] * enters[..., None, None]
        return torch.einsum("bcqgr,bcqgrp,bcqgn->bcgrpn", wt, xc[:, c0:], Bc[:, c0:])

    def carry(s_in: torch.Tensor, c: int) -> torch.Tensor:
        return (passes[:, c, None, None].to(cdt) * chunk_decay[:, c])[..., None, None] * s_in

    h0 = None
    if initial_state is not None:
        h0 = initial_state.to(cdt).view(bt, g, r, pd, n)
    zero = xc.new_zeros(bt, g, r, pd, n)
    final = None
    if nc > 1 and bool(reads[:, 1:].any()):
        local = local_state(0)
        s = h0 if h0 is not None else zero
        incoming = []
        for c in range(nc):
            incoming.append(s)
            s = carry(s, c) + local[:, c]
        final = s
        s_in = torch.stack(incoming, dim=1)                                 # [Bt, nc, G, R, Pd, N]
        y = y + torch.einsum("bctgn,bcgrpn->bctgrp", Cc, s_in) * (torch.exp(cs) * reads[..., None, None])[..., None]
    else:
        if h0 is not None:
            w0 = torch.exp(cs[:, 0]) * reads[:, 0, :, None, None]          # [Bt, Q, G, R]
            y0 = torch.einsum("btgn,bgrpn->btgrp", Cc[:, 0], h0) * w0[..., None]
            y = torch.cat([y[:, :1] + y0[:, None], y[:, 1:]], dim=1)
        if return_final_state:
            # Only chunks after the last one that blocks the state (in every row) matter for the end state.
            blocks = (~passes).all(dim=0).nonzero()
            c0 = int(blocks[-1]) if len(blocks) else 0
            local = local_state(c0)
            s = zero if len(blocks) else (h0 if h0 is not None else zero)
            for c in range(c0, nc):
                s = carry(s, c) + local[:, c - c0]
            final = s

    y = y.reshape(bt, nc * q, h, pd)[:, :t_len].to(x.dtype)
    if return_final_state:
        return y, final.reshape(bt, h, pd, n)
    return y
