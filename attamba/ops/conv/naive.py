"""Reference causal depthwise conv with causal-conv1d's seq_idx rule, an explicit loop over time and taps.

y[b, t, c] = bias[c] + sum_k weight[c, W-1-k] * x[b, t-k, c], the tap t-k used only if
seq_idx[t-k] == seq_idx[t]. Positions before 0 come from initial_state ([Bt, Cc, W-1], oldest first), whose
taps count as segment id 0 (the convention ssd_scan's initial state follows too).
"""

import torch
import torch.nn.functional as F

from attamba.ops.conv._checks import check_conv_inputs


def causal_conv1d_naive(x, weight, bias=None, *, seq_idx=None, initial_state=None, activation=None,
                        return_final_state=False):
    """x [Bt, T, Cc], weight [Cc, W], bias [Cc] -> y [Bt, T, Cc] (, final_state [Bt, Cc, W-1])."""
    check_conv_inputs(x, weight, bias, seq_idx, initial_state, activation)
    bt, t_len, cc = x.shape
    w = weight.shape[1]
    past = initial_state.transpose(1, 2) if initial_state is not None else x.new_zeros(bt, w - 1, cc)
    full = torch.cat([past.to(x.dtype), x], dim=1)                          # position p is full[:, p + W - 1]
    if seq_idx is not None:
        past_ids = torch.zeros(bt, w - 1, dtype=seq_idx.dtype, device=x.device)
        ids = torch.cat([past_ids, seq_idx], dim=1)
    ys = []
    for t in range(t_len):
        acc = bias.expand(bt, cc) if bias is not None else x.new_zeros(bt, cc)
        for k in range(w):
            tap = full[:, t + w - 1 - k] * weight[:, w - 1 - k]
            if seq_idx is not None:
                tap = tap * (ids[:, t + w - 1 - k] == seq_idx[:, t]).to(x.dtype)[:, None]
            acc = acc + tap
        ys.append(acc)
    y = torch.stack(ys, dim=1) if ys else x.new_zeros(bt, 0, cc)
    if activation == "silu":
        y = F.silu(y)
    if return_final_state:
        return y, full[:, full.shape[1] - (w - 1):].transpose(1, 2)
    return y
