"""Llama building blocks: RMSNorm, rotary embeddings, SwiGLU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ops.matvec import matvec


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class _GatedRMSNorm(torch.autograd.Function):
    """RMSNorm(y * silu(z)) * weight with its backward written out: half the passes of autograd's graph."""

    @staticmethod
    def forward(ctx, y, z, weight, eps: float):
        gate = F.silu(z)
        g = y * gate
        rstd = torch.rsqrt(torch.linalg.vecdot(g, g).div_(g.shape[-1]).add_(eps)).unsqueeze(-1)
        ctx.save_for_backward(y, z, weight, gate, g, rstd)
        return (g * rstd).mul_(weight)

    @staticmethod
    def backward(ctx, grad):
        y, z, weight, gate, g, rstd = ctx.saved_tensors
        gn = grad * weight
        # d/dg of g * rstd: rstd * (gn - g * rstd^2 * mean(gn * g))
        coef = (torch.linalg.vecdot(gn, g).unsqueeze(-1) * rstd.pow(3)).div_(-g.shape[-1])
        dg = torch.mul(gn, rstd).addcmul_(g, coef)
        dy = dz = dw = None
        if ctx.needs_input_grad[0]:
            dy = dg * gate
        if ctx.needs_input_grad[1]:
            dz = torch.ops.aten.silu_backward(dg * y, z)
        if ctx.needs_input_grad[2]:
            dw = (grad * g).mul_(rstd).reshape(-1, g.shape[-1]).sum(0)
        return dy, dz, dw, None


def gated_rms_norm_reference(y, z, weight, eps: float) -> torch.Tensor:
    """The same map through autograd's ops (the reference the fused form is tested against)."""
    return F.rms_norm(y * F.silu(z), (y.shape[-1],), weight, eps)


class GatedRMSNorm(nn.Module):
    """Mamba2's output norm: RMSNorm(y * silu(z))."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (y.requires_grad or z.requires_grad or self.weight.requires_grad):
            return _GatedRMSNorm.apply(y, z, self.weight, self.eps)
        return gated_rms_norm_reference(y, z, self.weight, self.eps)  # no backward: PyTorch's fused rms_norm


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)  # gate and up projections fused in one matmul
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(gate) * up)

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """forward for decoding, x [B, dim] (products through ops.matvec)."""
        gate, up = matvec(x, self.w13.weight).chunk(2, dim=-1)
        return matvec(F.silu(gate) * up, self.w2.weight)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [T, head_dim // 2] for int64 positions [T]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim))
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the last dim. x: [B, H, T, D]; cos, sin: [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)
