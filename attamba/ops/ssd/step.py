"""One decoding step of the SSD recurrence."""

import torch

from attamba.ops.ssd._checks import compute_dtype


def ssd_step(x_t, dt_t, A, B_t, C_t, D, state):
    """x_t [..., H, Pd], dt_t [..., H], A and D (D may be None) [H] or broadcasting to [..., H],
    B_t/C_t [..., G, N], state [..., H, Pd, N]
    -> (y_t [..., H, Pd] in x_t.dtype, new_state [..., H, Pd, N] in float32/64).

    The leading dims are a batch (decoding steps the K- and V-SSM as [2, B, ...] with their A and D [2, 1, H]).
    A segment reset is the caller zeroing `state` before the step.
    """
    *lead, h, pd = x_t.shape
    g, n = B_t.shape[-2:]
    if state.shape != (*lead, h, pd, n):
        raise ValueError(f"state must be [..., H, Pd, N] = {(*lead, h, pd, n)}, got {tuple(state.shape)}")
    if h % g != 0:
        raise ValueError(f"groups G must divide heads H={h}, got G={g}")
    cdt = compute_dtype(x_t)
    rows = h // g * pd  # the H/G heads of one group share B and C: view the state as [..., G, H/G*Pd, N]
    xs, dts = x_t.to(cdt), dt_t.to(cdt)
    decay = torch.exp(dts * A.to(cdt))[..., None, None]
    scaled = (state.to(cdt) * decay).view(*lead, g, rows, n)
    dx = (dts.unsqueeze(-1) * xs).view(*lead, g, rows, 1)
    new_state = torch.addcmul(scaled, dx, B_t.to(cdt).unsqueeze(-2))
    y = torch.matmul(new_state, C_t.to(cdt).unsqueeze(-1)).view(*lead, h, pd)
    if D is not None:
        y = torch.addcmul(y, D.to(cdt).unsqueeze(-1), xs)
    return y.to(x_t.dtype), new_state.view(*lead, h, pd, n)
