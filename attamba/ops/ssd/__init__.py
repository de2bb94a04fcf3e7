"""SSD (Mamba2) scan used by Attamba's K-SSM and V-SSM, with selectable backends.

Backends: "chunked" (pure PyTorch), "naive" (references: the sequential loop for monotone seq_idx, the
quadratic kernel-rule reference otherwise), "triton" (mamba-ssm, CUDA only) and "auto" (the default):
"chunked" on CPU and GPU alike. Pick one with `backend=` or the ATTAMBA_SSD_BACKEND environment variable
(read once, at first use); `resolve_backend` turns the choice into the kernel a call runs.
An explicitly requested backend that cannot run raises; nothing falls back silently.
"""

import functools
import os

from attamba.ops.ssd._checks import check_scan_inputs
from attamba.ops.ssd.align import aligned_layout, from_aligned, to_aligned
from attamba.ops.ssd.chunked import ssd_chunked
from attamba.ops.ssd.naive import ssd_naive, ssd_naive_kernel_semantics
from attamba.ops.ssd.step import ssd_step
from attamba.ops.ssd.triton import ssd_triton, triton_available, unavailable_reason

BACKENDS = ("auto", "chunked", "naive", "triton")
KERNELS = ("chunked", "triton", "naive", "naive_kernel_semantics")
BACKEND_ENV = "ATTAMBA_SSD_BACKEND"

__all__ = ["BACKENDS", "BACKEND_ENV", "KERNELS", "ssd_scan", "ssd_scan_aligned", "ssd_step", "resolve_backend",
           "ssd_chunked", "ssd_naive", "ssd_naive_kernel_semantics", "triton_available"]


def _check_backend(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    if name == "triton" and not triton_available():
        raise RuntimeError(f"SSD backend 'triton' was requested ({source}) but mamba_ssm's Triton kernel "
                           f"cannot be imported: {unavailable_reason()}. Install mamba-ssm on a CUDA machine "
                           "or request backend 'chunked'.")
    return name


@functools.lru_cache(maxsize=1)
def default_backend() -> str:
    """The backend used when none is passed: $ATTAMBA_SSD_BACKEND or "auto" (cached; cache_clear() to re-read)."""
    name = os.environ.get(BACKEND_ENV, "").strip()
    return _check_backend(name, BACKEND_ENV) if name else "auto"


def resolve_backend(backend: str | None = None, monotone: bool = True) -> str:
    """The kernel a call will use, one of KERNELS: `backend` (None: the default), "auto" being "chunked";
    "naive" on non-monotone seq_idx (`monotone` False) is the kernel-rule reference."""
    name = default_backend() if backend is None else _check_backend(backend, "backend")
    if name == "auto":
        return "chunked"
    if name == "naive" and not monotone:
        return "naive_kernel_semantics"
    return name


def _is_monotone(seq_idx) -> bool:
    return seq_idx is None or not bool((seq_idx[:, 1:] < seq_idx[:, :-1]).any())


def ssd_scan(x, dt, A, B, C, *, D=None, seq_idx=None, initial_state=None, scan_chunk=64,
             return_final_state=False, backend=None):
    """Mamba2 scan with mamba_chunk_scan_combined's seq_idx semantics.

    x [Bt, T, H, Pd]; dt [Bt, T, H] positive; A [H] negative; B, C [Bt, T, G, N] (head h uses group
    h // (H // G)); D [H] or None; seq_idx [Bt, T] non-negative ints or None; initial_state [Bt, H, Pd, N]
    (used by tokens of segment id 0, as the kernels do). Returns y [Bt, T, H, Pd] and, if asked,
    final_state [Bt, H, Pd, N].
    Monotone seq_idx: the state resets wherever the id changes, whatever scan_chunk is. Other seq_idx:
    the kernels' rules (tokens mix by id equality inside a scan chunk and across chunk ends).
    """
    check_scan_inputs(x, dt, A, B, C, D, seq_idx, initial_state, scan_chunk)
    kernel = resolve_backend(backend)
    if kernel == "naive":   # only the reference reads seq_idx's order (a device sync): not on the fast paths
        kernel = resolve_backend(backend, _is_monotone(seq_idx))
    kwargs = dict(D=D, seq_idx=seq_idx, initial_state=initial_state, return_final_state=return_final_state)
    if kernel == "chunked":
        return ssd_chunked(x, dt, A, B, C, scan_chunk=scan_chunk, **kwargs)
    elif kernel == "triton":
        return ssd_triton(x, dt, A, B, C, scan_chunk=scan_chunk, **kwargs)
    elif kernel == "naive":
        return ssd_naive(x, dt, A, B, C, **kwargs)
    elif kernel == "naive_kernel_semantics":
        return ssd_naive_kernel_semantics(x, dt, A, B, C, scan_chunk=scan_chunk, **kwargs)
    else:
        raise ValueError(f"SSD scan kernel must be one of {KERNELS}, got {kernel!r}")


def ssd_scan_aligned(x, dt, A, B, C, *, seq_idx, block, D=None, initial_state=None,
                     return_final_state=False, backend=None):
    """ssd_scan for monotone seq_idx, run on a layout where every segment starts on a multiple of `block`.

    Same shapes and results as ssd_scan (any scan_chunk gives the same result for monotone seq_idx).
    Choose block >= the longest segment (e.g. the Attamba chunk size P): the scan then runs with
    scan_chunk = block and no state passing. Longer segments are still handled, more slowly.
    """
    new_pos, src, aligned_idx = aligned_layout(seq_idx, block)
    out = ssd_scan(to_aligned(x, src), to_aligned(dt, src), A, to_aligned(B, src), to_aligned(C, src),
                   D=D, seq_idx=aligned_idx, initial_state=initial_state, scan_chunk=block,
                   return_final_state=return_final_state, backend=backend)
    if return_final_state:
        return from_aligned(out[0], new_pos), out[1]
    return from_aligned(out, new_pos)
