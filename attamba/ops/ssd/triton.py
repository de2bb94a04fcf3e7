"""mamba-ssm's Triton SSD kernel, when it can be imported (CUDA tensors only)."""

import torch

_IMPORT_ERROR = None
try:
    # Importing through mamba_ssm runs its package __init__, which can fail for reasons other than
    # ImportError (a missing CUDA extension, a Triton mismatch): any failure means "not available".
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined as _kernel
except Exception as err:  # noqa: BLE001
    _kernel = None
    _IMPORT_ERROR = f"{type(err).__name__}: {err}"


def triton_available() -> bool:
    return _kernel is not None


def unavailable_reason() -> str:
    return _IMPORT_ERROR or ""


def ssd_triton(x, dt, A, B, C, *, D=None, seq_idx=None, initial_state=None, scan_chunk=64,
               return_final_state=False):
    """Same contract as ssd_chunked; dt is passed as is (no softplus, no bias, no limit)."""
    if _kernel is None:
        raise RuntimeError(f"SSD backend 'triton' is unavailable: mamba_ssm failed to import ({_IMPORT_ERROR}); "
                           "install mamba-ssm on a CUDA machine or use backend='chunked'")
    if not x.is_cuda:
        raise ValueError(f"SSD backend 'triton' needs CUDA tensors, got device {x.device}; use backend='chunked'")
    if seq_idx is not None:
        seq_idx = seq_idx.to(torch.int32).contiguous()
    out = _kernel(x, dt, A, B, C, scan_chunk, D=D, initial_states=initial_state, seq_idx=seq_idx,
                  return_final_states=return_final_state)
    return out

