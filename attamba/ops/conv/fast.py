"""Vectorised causal depthwise conv: W shifted multiply-adds with a segment mask per tap (W is small)."""

import torch
import torch.nn.functional as F

from attamba.ops.conv._checks import check_conv_inputs


def causal_conv1d_fast(x, weight, bias=None, *, seq_idx=None, initial_state=None, activation=None,
                       return_final_state=False):
    """Same contract as causal_conv1d_naive: x [Bt, T, Cc], weight [Cc, W], bias [Cc] -> y [Bt, T, Cc]."""
    check_conv_inputs(x, weight, bias, seq_idx, initial_state, activation)
    bt, t_len, cc = x.shape
    w = weight.shape[1]
    past = initial_state.transpose(1, 2).to(x.dtype) if initial_state is not None else x.new_zeros(bt, w - 1, cc)
    full = torch.cat([past, x], dim=1)                                      # [Bt, W-1+T, Cc]
    if seq_idx is not None:
        ids = torch.cat([torch.zeros(bt, w - 1, dtype=seq_idx.dtype, device=x.device), seq_idx], dim=1)
    # Fused multiply-adds (addcmul): one pass over [Bt, T, Cc] per tap instead of a product and a sum.
    last = weight[:, w - 1]
    y = torch.mul(x, last) if bias is None else torch.addcmul(bias, x, last)
    for k in range(1, w):
        tap = full[:, w - 1 - k: w - 1 - k + t_len]
        if seq_idx is not None:
            # Masking the input tap (not the product) keeps the gradient of masked taps exactly zero.
            tap = tap * (ids[:, w - 1 - k: w - 1 - k + t_len] == seq_idx).unsqueeze(-1)
        y = torch.addcmul(y, tap, weight[:, w - 1 - k])
    if activation == "silu":
        y = F.silu(y)
    if return_final_state:
        return y, full[:, full.shape[1] - (w - 1):].transpose(1, 2)
    return y


def conv_step(x_t, conv_state, weight, bias=None, activation=None):
    """x_t [..., Cc], conv_state [..., Cc, W-1] (oldest first) -> (y_t [..., Cc], new_state [..., Cc, W-1]).

    weight [..., Cc, W] and bias [..., Cc] broadcast against the leading dims (decoding steps the K- and
    V-SSM together with their parameters stacked). A segment reset is the caller zeroing conv_state first.
    """
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    w = weight.shape[-1]
    if conv_state.shape != (*x_t.shape, w - 1):
        raise ValueError(f"conv_state must be [..., Cc, W-1] = {(*x_t.shape, w - 1)}, "
                         f"got {tuple(conv_state.shape)}")
    window = torch.cat([conv_state.to(x_t.dtype), x_t[..., None]], dim=-1)  # [..., Cc, W]
    y = torch.linalg.vecdot(window, weight)
    if bias is not None:
        y = y + bias
    if activation == "silu":
        y = F.silu(y)
    return y, window[..., 1:]
