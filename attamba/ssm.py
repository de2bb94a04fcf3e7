"""The K/V SSM: a Mamba2 (SSD) block whose scan and conv restart at every chunk start (docs/method.md section 2)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import SSMConfig
from .layers import GatedRMSNorm
from .ops.conv import causal_conv1d, conv_step
from .ops.conv.block import block_causal_conv1d
from .ops.matvec import matvec
from .ops.ssd import resolve_backend, ssd_scan, ssd_scan_aligned, ssd_step
from .ops.ssd.align import ScanBlocks, scan_blocks


class ChunkSSM(nn.Module):
    """in_proj -> [z, x, B, C, dt]; causal conv + SiLU on [x, B, C]; SSD scan; RMSNorm(y * silu(z)); out_proj.

    `seq_idx` carries the segmentation: with chunk ids (monotone) no information crosses a chunk start,
    through the scan state or the conv window; with in-chunk offsets it reproduces the released code.
    """

    def __init__(self, dim: int, cfg: SSMConfig, norm_eps: float = 1e-5, chunk_size: int | None = None):
        super().__init__()
        self.cfg = cfg
        # With chunk segmentation every segment is moved onto a grid of this many tokens, so the scan
        # needs no state passing between its own chunks (see ssd_scan_aligned). None: plain scan.
        # A PyTorch-path speed-up only: the Triton kernels reset on seq_idx at no cost and want long scan chunks.
        self.align_block = min(chunk_size, cfg.scan_chunk) if chunk_size else None
        inner, heads, groups, n = cfg.inner_dim, cfg.heads, cfg.groups, cfg.state_dim
        self.in_proj = nn.Linear(dim, 2 * inner + 2 * groups * n + heads, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(cfg.conv_dim, cfg.conv_width))
        self.conv_bias = nn.Parameter(torch.zeros(cfg.conv_dim))
        self.A_log = nn.Parameter(torch.empty(heads))
        self.dt_bias = nn.Parameter(torch.empty(heads))
        self.D = nn.Parameter(torch.ones(heads))
        self.norm = GatedRMSNorm(inner, norm_eps)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    @torch.no_grad()
    def reset_parameters(self, init_std: float):
        cfg = self.cfg
        nn.init.normal_(self.in_proj.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=init_std)
        bound = 1.0 / math.sqrt(cfg.conv_width)
        nn.init.uniform_(self.conv_weight, -bound, bound)
        self.conv_bias.zero_()
        self.A_log.copy_(torch.empty(cfg.heads).uniform_(cfg.a_init_min, cfg.a_init_max).log())
        dt = torch.exp(torch.empty(cfg.heads).uniform_(math.log(cfg.dt_min), math.log(cfg.dt_max)))
        dt = dt.clamp(min=cfg.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.D.fill_(1.0)
        self.norm.weight.fill_(1.0)

    def _split(self, proj: torch.Tensor):
        cfg = self.cfg
        inner, gn = cfg.inner_dim, cfg.groups * cfg.state_dim
        z, xbc, dt = torch.split(proj, [inner, inner + 2 * gn, cfg.heads], dim=-1)
        return z, xbc, dt

    def _dt(self, dt: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        dt = F.softplus(dt + (self.dt_bias if bias is None else bias))
        if self.cfg.dt_limit_min > 0.0 or math.isfinite(self.cfg.dt_limit_max):
            dt = dt.clamp(self.cfg.dt_limit_min, self.cfg.dt_limit_max)
        return dt

    def _unpack_xbc(self, xbc: torch.Tensor):
        cfg = self.cfg
        gn = cfg.groups * cfg.state_dim
        x, b, c = torch.split(xbc, [cfg.inner_dim, gn, gn], dim=-1)
        shape = xbc.shape[:-1]
        return (x.reshape(*shape, cfg.heads, cfg.head_dim),
                b.reshape(*shape, cfg.groups, cfg.state_dim),
                c.reshape(*shape, cfg.groups, cfg.state_dim))

    def blocks(self, seq_idx: torch.Tensor, batch: int) -> ScanBlocks | None:
        """The scan blocks `forward` can use for this seq_idx ([T] or [B, T]), or None where it cannot:
        not chunk segmentation, not the PyTorch scan, or a segment longer than the aligned block."""
        if not self.align_block or resolve_backend() != "chunked":
            return None
        if seq_idx.dim() == 1:
            seq_idx = seq_idx.unsqueeze(0).expand(batch, seq_idx.shape[0])
        return scan_blocks(seq_idx, self.align_block)

    def forward(self, u: torch.Tensor, seq_idx: torch.Tensor, return_states: bool = False,
                blocks: ScanBlocks | None | str = "auto"):
        """u: [B, T, dim]; seq_idx: int32 [T] or [B, T]. Returns [B, T, dim] (and (conv_state, ssm_state)).

        Without return_states the scan blocks are used where they apply; the results are the same.
        `blocks` is self.blocks(seq_idx, B) computed by the caller (shared by the K and V SSMs; None: the
        plain path), or "auto" to compute it here.
        """
        bsz, seqlen, _ = u.shape
        if not return_states:
            if isinstance(blocks, str):
                blocks = self.blocks(seq_idx, bsz)
            if blocks is not None:
                return self._forward_blocks(u, blocks)
        if seq_idx.dim() == 1:
            seq_idx = seq_idx.unsqueeze(0).expand(bsz, seqlen)
        z, xbc_raw, dt = self._split(self.in_proj(u))
        xbc = causal_conv1d(xbc_raw, self.conv_weight, self.conv_bias, seq_idx=seq_idx, activation="silu")
        x, b, c = self._unpack_xbc(xbc)
        A = -torch.exp(self.A_log.float())
        if self.align_block and resolve_backend() == "chunked":
            out = ssd_scan_aligned(x, self._dt(dt), A, b, c, D=self.D, seq_idx=seq_idx, block=self.align_block,
                                   return_final_state=return_states)
        else:
            out = ssd_scan(x, self._dt(dt), A, b, c, D=self.D, seq_idx=seq_idx, scan_chunk=self.cfg.scan_chunk,
                           return_final_state=return_states)
        y, ssm_state = out if return_states else (out, None)
        y = self.out_proj(self.norm(y.reshape(bsz, seqlen, -1), z))
        if not return_states:
            return y
        width = self.cfg.conv_width - 1
        conv_state = xbc_raw[:, -width:, :].transpose(1, 2) if width else xbc_raw.new_zeros(bsz, xbc_raw.shape[-1], 0)
        if seqlen < width:
            conv_state = F.pad(conv_state, (width - seqlen, 0))
        return y, (conv_state.contiguous(), ssm_state)

    def _forward_blocks(self, u: torch.Tensor, blocks: ScanBlocks) -> torch.Tensor:
        """forward on the scan blocks: the projections moved once into blocks that each hold one segment,
        conv and scan with no segment masks or state passing, the normed output moved back once.
        Padding tokens sit after their segment's tokens in its block, so causality keeps them out of every
        real token's output; their own outputs are dropped."""
        cfg = self.cfg
        bsz = u.shape[0]
        q, nb = blocks.block, blocks.num_blocks
        z, xbc, dt = self._split(blocks.to_blocks(self.in_proj(u)))
        xbc = block_causal_conv1d(xbc.view(bsz, nb, q, -1), self.conv_weight, self.conv_bias, activation="silu")
        x, b, c = self._unpack_xbc(xbc.view(bsz, nb * q, -1))
        A = -torch.exp(self.A_log.float())
        y = ssd_scan(x, self._dt(dt), A, b, c, D=self.D, seq_idx=blocks.seq_idx, scan_chunk=q, backend="chunked")
        y = self.norm(y.reshape(bsz, nb * q, -1), z)
        return self.out_proj(blocks.from_blocks(y))

    def step(self, u: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor):
        """One token. u: [B, dim]; conv_state: [B, conv_dim, W-1]; ssm_state: [B, H, head_dim, N].

        The caller zeroes both states at a chunk start. Returns (y [B, dim], conv_state, ssm_state).
        """
        z, xbc_raw, dt = self._split(self.in_proj(u))
        xbc, conv_state = conv_step(xbc_raw, conv_state, self.conv_weight, self.conv_bias, activation="silu")
        x, b, c = self._unpack_xbc(xbc)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ssd_step(x, self._dt(dt), A, b, c, self.D, ssm_state)
        y = self.out_proj(self.norm(y.reshape(u.shape[0], -1), z))
        return y, conv_state, ssm_state

    def state_shapes(self, batch: int):
        cfg = self.cfg
        return (batch, cfg.conv_dim, cfg.conv_width - 1), (batch, cfg.heads, cfg.head_dim, cfg.state_dim)


def _per_channel(m: ChunkSSM) -> tuple[torch.Tensor, ...]:
    return m.conv_weight, m.conv_bias, m.A_log, m.dt_bias, m.D, m.norm.weight


def _stacked_parameters(ssm_k: ChunkSSM, ssm_v: ChunkSSM) -> tuple[torch.Tensor, ...]:
    """The two SSMs' per-channel parameters stacked [2, 1, ...] (A as -exp(A_log), float32).

    Without autograd (decoding) the stack is kept on ssm_k until a parameter changes, in place (which
    bumps its version) or by moving (which changes its storage), so no token restacks them."""
    params = _per_channel(ssm_k) + _per_channel(ssm_v)

    def stack():
        out = [torch.stack((a, b)).unsqueeze(1) for a, b in zip(params[:6], params[6:])]
        out[2] = -torch.exp(out[2].float())
        return tuple(out)

    if torch.is_grad_enabled() or torch.compiler.is_compiling():  # compiled code fuses the stacking anyway
        return stack()
    # In-place updates bump versions; moving a module (to(), half()) gives every parameter new storage.
    key = [p._version for p in params] + [params[0].data_ptr(), params[6].data_ptr()]
    cached = getattr(ssm_k, "_pair_cache", None)
    if cached is None or cached[0] != key:
        cached = ssm_k._pair_cache = (key, stack())
    return cached[1]


def paired_step(ssm_k: ChunkSSM, ssm_v: ChunkSSM, uk: torch.Tensor, uv: torch.Tensor, conv_state: torch.Tensor,
                ssm_state: torch.Tensor):
    """One decoding step of the K- and V-SSM together: their small elementwise work runs as one batch of
    2B rows (per-token overhead, not arithmetic, is what a step costs). Same result as two ChunkSSM.step.

    uk, uv: [B, dim]; conv_state: [2, B, conv_dim, W-1] and ssm_state: [2, B, H, head_dim, N], K first.
    Returns (yk, yv [B, dim], conv_state, ssm_state); the caller zeroes the states at a chunk start.
    """
    bsz = uk.shape[0]
    conv_weight, conv_bias, A, dt_bias, D, norm_weight = _stacked_parameters(ssm_k, ssm_v)
    z, xbc, dt = ssm_k._split(torch.stack([matvec(uk, ssm_k.in_proj.weight), matvec(uv, ssm_v.in_proj.weight)]))
    xbc, conv_state = conv_step(xbc, conv_state, conv_weight, conv_bias, activation="silu")
    x, b, c = ssm_k._unpack_xbc(xbc)  # [2, B, ...]
    y, state = ssd_step(x, ssm_k._dt(dt, bias=dt_bias), A, b, c, D, ssm_state)  # A, D: [2, 1, H]
    y = y.view(2, bsz, -1)
    y = F.rms_norm(y * F.silu(z), (y.shape[-1],), None, ssm_k.norm.eps) * norm_weight
    return matvec(y[0], ssm_k.out_proj.weight), matvec(y[1], ssm_v.out_proj.weight), conv_state.contiguous(), state
