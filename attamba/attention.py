"""The attention sub-layer of every kind: Attamba (SSM keys and values) and its transformer baselines."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .layers import apply_rope
from .ops.attention import attention
from .ops.matvec import matvec
from .ssm import ChunkSSM, paired_step


@dataclass
class LayerChunks:
    """Where one layer's chunks end in one forward: the K/V SSMs' segment ids (int32 [T]), the visible
    boundaries (bool [T]) and the window L; None fields for the transformer baselines."""

    seq_idx: torch.Tensor | None
    boundaries: torch.Tensor | None
    leading_tokens: int | None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.kind = cfg.attention
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.attn_head_dim
        self.wq = nn.Linear(cfg.dim, cfg.attn_dim, bias=False)
        if self.kind == "attamba":
            if cfg.kv_proj:
                self.wk = nn.Linear(cfg.dim, cfg.dim, bias=False)
                self.wv = nn.Linear(cfg.dim, cfg.dim, bias=False)
            # The released `offset` segmentation depends on the scan's own chunking: keep the plain scan.
            block = cfg.chunk_size if cfg.ssm_segmentation == "chunk" else None
            self.ssm_k = ChunkSSM(cfg.dim, cfg.ssm, cfg.norm_eps, chunk_size=block)
            self.ssm_v = ChunkSSM(cfg.dim, cfg.ssm, cfg.norm_eps, chunk_size=block)
        else:
            self.wk = nn.Linear(cfg.dim, cfg.attn_dim, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.attn_dim, bias=False)
        self.wo = nn.Linear(cfg.attn_dim, cfg.dim, bias=False)

    def kv_inputs(self, x: torch.Tensor):
        """What the K and V SSMs read: x itself, or W_k x and W_v x with kv_proj."""
        if self.cfg.kv_proj:
            return matvec(x, self.wk.weight), matvec(x, self.wv.weight)  # F.linear but for one decoding row
        return x, x

    def keys_values(self, x: torch.Tensor, chunks: LayerChunks, return_states: bool = False):
        """x: [B, T, dim] -> k, v: [B, T, attn_dim] before RoPE (and the SSM states for decoding)."""
        if self.kind != "attamba":
            return self.wk(x), self.wv(x), None
        xk, xv = self.kv_inputs(x)
        # Computed once for both SSMs (None, the plain path, included); decoding's prefill needs the states.
        blocks = None if return_states else self.ssm_k.blocks(chunks.seq_idx, x.shape[0])
        k_out = self.ssm_k(xk, chunks.seq_idx, return_states=return_states, blocks=blocks)
        v_out = self.ssm_v(xv, chunks.seq_idx, return_states=return_states, blocks=blocks)
        (k, k_states), (v, v_states) = (k_out, v_out) if return_states else ((k_out, None), (v_out, None))
        if self.cfg.ssm_residual:
            k, v = xk + k, xv + v
        return k, v, (k_states, v_states)

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, H*D] -> [B, H, T, D]"""
        bsz, seqlen, _ = t.shape
        return t.view(bsz, seqlen, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], chunks: LayerChunks,
                return_cache: bool = False):
        """x: [B, T, dim] -> [B, T, dim].

        With return_cache, also (k, v, ssm_states) for building a decoding cache: k after RoPE and v,
        both [B, H, T, D]; ssm_states ((conv, scan) of the K-SSM, same of the V-SSM) or None.
        """
        cos, sin = rope
        k, v, states = self.keys_values(x, chunks, return_states=return_cache and self.kind == "attamba")
        q = apply_rope(self.heads(self.wq(x)), cos, sin)
        k = apply_rope(self.heads(k), cos, sin)
        v = self.heads(v)
        out = attention(q, k, v, boundaries=chunks.boundaries, leading_tokens=chunks.leading_tokens)
        out = self.wo(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))
        if return_cache:
            return out, (k, v, states if self.kind == "attamba" else None)
        return out

    def step_qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ssm_states):
        """The tensor work of a decoding step before the cache: x [B, dim], cos/sin [B, 1, 1, D/2], the SSM
        states (conv, scan) stacked K over V (attamba) or None -> q, k (after RoPE), v [B, H, 1, D] and the
        SSM states after this token (not yet zeroed at a chunk end) or None."""
        states = None
        if self.kind == "attamba":
            xk, xv = self.kv_inputs(x)
            k, v, conv, scan = paired_step(self.ssm_k, self.ssm_v, xk, xv, *ssm_states)
            if self.cfg.ssm_residual:
                k, v = xk + k, xv + v
            states = (conv, scan)
        else:
            k, v = matvec(x, self.wk.weight), matvec(x, self.wv.weight)
        q = apply_rope(self.heads(matvec(x, self.wq.weight)[:, None]), cos, sin)
        k = apply_rope(self.heads(k[:, None]), cos, sin)
        return q, k, self.heads(v[:, None]), states
