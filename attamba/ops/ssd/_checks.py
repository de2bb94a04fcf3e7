"""Shape checks shared by every SSD backend, so all of them reject the same bad inputs."""

import torch


def check_scan_inputs(x, dt, A, B, C, D, seq_idx, initial_state, scan_chunk):
    if x.dim() != 4:
        raise ValueError(f"x must be [Bt, T, H, Pd], got shape {tuple(x.shape)}")
    bt, t, h, pd = x.shape
    if dt.shape != (bt, t, h):
        raise ValueError(f"dt must be [Bt, T, H] = {(bt, t, h)}, got {tuple(dt.shape)}")
    if A.shape != (h,):
        raise ValueError(f"A must be [H] = {(h,)}, got {tuple(A.shape)}")
    if B.dim() != 4 or B.shape[:2] != (bt, t):
        raise ValueError(f"B must be [Bt, T, G, N] with Bt, T = {(bt, t)}, got {tuple(B.shape)}")
    if C.shape != B.shape:
        raise ValueError(f"C must have B's shape {tuple(B.shape)}, got {tuple(C.shape)}")
    g, n = B.shape[2:]
    if g < 1 or h % g != 0:
        raise ValueError(f"groups G must divide heads H={h}, got G={g}")
    if D is not None and D.shape != (h,):
        raise ValueError(f"D must be [H] = {(h,)} or None, got {tuple(D.shape)}")
    if seq_idx is not None:
        if seq_idx.shape != (bt, t):
            raise ValueError(f"seq_idx must be [Bt, T] = {(bt, t)}, got {tuple(seq_idx.shape)}")
        if seq_idx.dtype.is_floating_point or seq_idx.dtype == torch.bool:
            raise ValueError(f"seq_idx must be an integer tensor, got {seq_idx.dtype}")
        if t > 0 and bool((seq_idx < 0).any()):
            raise ValueError("seq_idx must be >= 0 (negative ids mean padding to the kernels); "
                             f"got min {int(seq_idx.min())}")
    if initial_state is not None and initial_state.shape != (bt, h, pd, n):
        raise ValueError(f"initial_state must be [Bt, H, Pd, N] = {(bt, h, pd, n)}, "
                         f"got {tuple(initial_state.shape)}")
    if not isinstance(scan_chunk, int) or scan_chunk < 1:
        raise ValueError(f"scan_chunk must be an int >= 1, got {scan_chunk!r}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 inputs accumulate in float32; float64 stays float64 for tight reference checks.
    return torch.promote_types(x.dtype, torch.float32)
