"""One decoding step of the SSD recurrence."""

import torch

from attamba.ops.ssd._checks import compute_dtype


def ssd_step(x_t, dt_t, A, B_t, C_t, D, state):
    """x_t [Bt, H, Pd], dt_t [Bt, H], A [H] or [Bt, H], B_t/C_t [Bt, G, N], D [H], [Bt, H] or None,
    state [Bt, H, Pd, N]
    -> (y_t [Bt, H, Pd] in x_t.dtype, new_state [Bt, H, Pd, N] in float32/64).

    A segment reset is the caller zeroing `state` before the step.
    """
    bt, h, pd = x_t.shape
    if state.shape != (bt, h, pd, B_t.shape[-1]):
        raise ValueError(f"state must be [Bt, H, Pd, N] = {(bt, h, pd, B_t.shape[-1])}, got {tuple(state.shape)}")
    if h % B_t.shape[1] != 0:
        raise ValueError(f"groups G must divide heads H={h}, got G={B_t.shape[1]}")
    cdt = compute_dtype(x_t)
    g, n = B_t.shape[1:]
    r = h // g
    rows = r * pd  # the R heads of one group share B and C: view the state as [Bt, G, R*Pd, N]
    xs, dts = x_t.to(cdt), dt_t.to(cdt)
    decay = torch.exp(dts * A.to(cdt)).view(bt, g, r, 1, 1)
    scaled = (state.to(cdt).view(bt, g, r, pd, n) * decay).view(bt, g, rows, n)
    dx = (dts.unsqueeze(-1) * xs).view(bt, g, rows, 1)
    new_state = torch.addcmul(scaled, dx, B_t.to(cdt).view(bt, g, 1, n))
    y = torch.matmul(new_state, C_t.to(cdt).view(bt, g, n, 1)).view(bt, h, pd)
    if D is not None:
        y = torch.addcmul(y, D.to(cdt).unsqueeze(-1), xs)
    return y.to(x_t.dtype), new_state.view(bt, h, pd, n)
