"""Reference product of decoding's activations with a weight matrix: PyTorch's linear."""

import torch
import torch.nn.functional as F


def matvec_naive(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., in], weight [out, in] -> x @ weight.T [..., out]."""
    return F.linear(x, weight)
