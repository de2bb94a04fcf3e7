"""The weight products of a decoding step at batch 1, as a multiply and a row sum.

At batch 1 a decoding step reads every weight once per token, so its speed is the memory bandwidth those
reads get. PyTorch's CPU BLAS computes a single-row product (sgemv) on one thread: ~10 GB/s on the 2-core
machines this project is checked on, whatever the shape. The same product written as `weight * x` summed
over `in` is an elementwise op and a reduction, which ATen splits over the intra-op threads and vectorizes
(faster, though it writes the products out), and which torch.compile (Inductor) fuses into one parallel
dot-product loop that reads each weight once. `attamba bench matvec` measures all three with the weights
cold, as in decoding. More than one row keeps F.linear: a GEMM reads each weight once for all rows,
where this form would read it once per row.

The product's temporary is written into a scratch buffer kept per thread (the size of the largest weight
multiplied so far, up to SCRATCH_LIMIT elements; larger weights go to F.linear): a fresh temporary of
megabytes is, depending on glibc's heap state, returned to the OS at each free and page-faulted back at
each allocation, which costs more than the product (2.6x on the paired K/V SSM step, measured ad hoc).
"""

import threading

import torch
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.float64)  # half types would round each product before the sum; GEMM does not
SCRATCH_LIMIT = 1 << 25  # elements (128 MiB in float32)
_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    buf = getattr(_local, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = _local.buf = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in], weight [out, in] -> x @ weight.T [..., out]; one row on the CPU: (weight * x).sum(-1)."""
    if x.numel() != x.shape[-1] or x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype:
        return F.linear(x, weight)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return (x.unsqueeze(-2) * weight).sum(-1)  # Inductor fuses it, autograd differentiates it
    if weight.numel() > SCRATCH_LIMIT:
        return F.linear(x, weight)
    product = torch.mul(x.reshape(1, -1), weight, out=_scratch(weight.numel(), x.dtype).view(weight.shape))
    return product.sum(-1).view(*x.shape[:-1], weight.shape[0])
