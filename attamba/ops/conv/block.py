"""Causal depthwise conv over independent blocks of Q rows (each from a zero state): no segment masks.

When every segment starts its own block (the SSD aligned layout), the conv's reset at a segment start is
the block's start: tap k adds into rows [k, Q) of each block from rows [0, Q - k). Forward and backward are
written out as one autograd node: autograd over the sliced views would allocate a gradient buffer per tap.
"""

import torch
import torch.nn.functional as F


class _BlockConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):
        w, q = weight.shape[1], x.shape[2]
        last = weight[:, w - 1]
        y = torch.mul(x, last) if bias is None else torch.addcmul(bias, x, last)
        for k in range(1, min(w, q)):  # the tap k rows back
            y[:, :, k:].addcmul_(x[:, :, : q - k], weight[:, w - 1 - k])
        ctx.save_for_backward(x, weight, y)
        ctx.silu, ctx.has_bias = silu, bias is not None
        return F.silu(y) if silu else y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        w, q = weight.shape[1], x.shape[2]
        gy = torch.ops.aten.silu_backward(grad, y) if ctx.silu else grad
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mul(gy, weight[:, w - 1])
            for k in range(1, min(w, q)):
                gx[:, :, : q - k].addcmul_(gy[:, :, k:], weight[:, w - 1 - k])
        if ctx.needs_input_grad[1]:
            gw = weight.new_zeros(weight.shape)
            for k in range(min(w, q)):
                gw[:, w - 1 - k] = (gy[:, :, k:] * x[:, :, : q - k]).sum(dim=(0, 1, 2))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(dim=(0, 1, 2))
        return gx, gw, gb, None


def block_causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        activation: str | None = None) -> torch.Tensor:
    """x [Bt, nb, Q, Cc], weight [Cc, W], bias [Cc] | None -> y [Bt, nb, Q, Cc]: causal_conv1d of each block
    from a zero state (causal_conv1d with a new seq_idx at every block start)."""
    if activation not in (None, "silu"):
        raise ValueError(f"activation must be None or 'silu', got {activation!r}")
    if x.dim() != 4 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"x must be [Bt, nb, Q, Cc] and weight [Cc, W], got {tuple(x.shape)} and {tuple(weight.shape)}")
    if bias is not None and bias.shape != (x.shape[-1],):
        raise ValueError(f"bias must be [Cc] = {(x.shape[-1],)} or None, got {tuple(bias.shape)}")
    return _BlockConv.apply(x, weight, bias, activation == "silu")
