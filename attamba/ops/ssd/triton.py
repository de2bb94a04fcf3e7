"""mamba-ssm's Triton SSD kernel, when it can be imported (CUDA tensors only)."""

import importlib
import importlib.util
import sys
import types

import torch

_KERNEL_MODULE = "mamba_ssm.ops.triton.ssd_combined"


def _mamba_modules() -> list[str]:
    return [name for name in sys.modules if name == "mamba_ssm" or name.startswith("mamba_ssm.")]


def _load_kernel():
    """mamba_chunk_scan_combined, or (None, why it cannot be imported).

    `import mamba_ssm` runs a package __init__ that imports the compiled selective-scan extension
    unguarded, so a Triton-only install (MAMBA_SKIP_CUDA_BUILD=TRUE, see docs) fails there even though
    the SSD kernels need only Triton. Then load the Triton modules under an empty `mamba_ssm` package.
    """
    saved = {name: sys.modules[name] for name in _mamba_modules()}  # restored if both attempts fail
    try:
        return importlib.import_module(_KERNEL_MODULE).mamba_chunk_scan_combined, None
    except Exception as err:  # noqa: BLE001 - any failure (missing extension, Triton mismatch) means "try harder"
        first = f"{type(err).__name__}: {err}"
    spec = importlib.util.find_spec("mamba_ssm") if "mamba_ssm" not in sys.modules else None
    if spec is None or not spec.submodule_search_locations:
        return None, first
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["mamba_ssm"] = package
    try:
        return importlib.import_module(_KERNEL_MODULE).mamba_chunk_scan_combined, None
    except Exception as err:  # noqa: BLE001
        for name in _mamba_modules():
            del sys.modules[name]
        sys.modules.update(saved)
        return None, f"{first}; loading only its Triton modules failed too: {type(err).__name__}: {err}"


_kernel, _IMPORT_ERROR = _load_kernel()


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
