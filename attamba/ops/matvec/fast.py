"""The weight products of a decoding step at batch 1, as a multiply and a row sum.

At batch 1 a decoding step reads every weight once per token, so its speed is the memory bandwidth those
reads get. PyTorch's CPU BLAS computes a single-row product (sgemv) on one thread: ~10 GB/s on the 2-core
machines this project is checked on, whatever the shape. The same product written as `weight * x` summed
over `in` is an elementwise op and a reduction, which ATen splits over the intra-op threads and vectorizes
(faster despite the temporary), and which torch.compile (Inductor) fuses into one parallel dot-product
loop that reads each weight once. `attamba bench matvec` measures all three with the weights cold, as in
decoding. More than one row keeps F.linear: a GEMM reads each weight once for all rows, where this form
would read it once per row.
"""

import torch
import torch.nn.functional as F

_DTYPES = (torch.float32, torch.float64)  # half types would round each product before the sum; GEMM does not


def matvec(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in], weight [out, in] -> x @ weight.T [..., out]; one row on the CPU: (weight * x).sum(-1)."""
    if x.numel() != x.shape[-1] or x.device.type != "cpu" or x.dtype not in _DTYPES or weight.dtype != x.dtype:
        return F.linear(x, weight)
    return (x.unsqueeze(-2) * weight).sum(-1)
