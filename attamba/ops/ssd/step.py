"""One decoding step of the SSD recurrence."""

import torch

from attamba.ops.ssd._checks import compute_dtype


def ssd_step(x_t, dt_t, A, B_t, C_t, D, state):
    """x_t [Bt, H, Pd], dt_t [Bt, H], A [H], B_t/C_t [Bt, G, N], D [H] or None, state [Bt, H, Pd, N]
    -> (y_t [Bt, H, Pd] in x_t.dtype, new_state [Bt, H, Pd, N] in float32/64).

    A segment reset is the caller zeroing `state` before the step.
    """
    bt, h, pd = x_t.shape
    if state.shape != (bt, h, pd, B_t.shape[-1]):
        raise ValueError(f"state must be [Bt, H, Pd, N] = {(bt, h, pd, B_t.shape[-1])}, got {tuple(state.shape)}")
    if h % B_t.shape[1] != 0:
        raise ValueError(f"groups G must divide heads H={h}, got G={B_t.shape[1]}")
    cdt = compute_dtype(x_t)
    r = h // B_t.shape[1]
    xs, dts = x_t.to(cdt), dt_t.to(cdt)
    Bh = B_t.to(cdt).repeat_interleave(r, dim=1)
    Ch = C_t.to(cdt).repeat_interleave(r, dim=1)
    decay = torch.exp(dts * A.to(cdt))[..., None, None]
    new_state = decay * state.to(cdt) + (dts[..., None] * xs)[..., None] * Bh[:, :, None, :]
    y = torch.einsum("bhpn,bhn->bhp", new_state, Ch)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xs
    return y.to(x_t.dtype), new_state
