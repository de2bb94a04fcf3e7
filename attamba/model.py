"""AttambaLM: a pre-norm Llama decoder whose attention is Attamba or one of its baselines."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import boundaries as bnd
from .attention import Attention, LayerChunks
from .config import ModelConfig
from .layers import GatedRMSNorm, RMSNorm, SwiGLU, rope_tables
from .ops.matvec import matvec
from .ssm import ChunkSSM


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(self, x, rope, chunks, return_cache: bool = False):
        if return_cache:
            out, kv = self.attn(self.attn_norm(x), rope, chunks, return_cache=True)
            h = x + out
            return h + self.ffn(self.ffn_norm(h)), kv
        h = x + self.attn(self.attn_norm(x), rope, chunks)
        return h + self.ffn(self.ffn_norm(h))

    def step(self, x, cos, sin, cache, compiled=None):
        """x: [B, dim], one token per sequence -> [B, dim]; cos, sin: [B, 1, 1, D/2] at each sequence's
        position; `cache` is this layer's LayerCache.

        The tensor work before and after the cache (step_pre, step_post) may be given `compiled`."""
        step_pre, step_post = compiled or (self.step_pre, self.step_post)
        q, k, v, states = step_pre(x, cos, sin, cache.ssm_states() if self.attn.kind == "attamba" else None)
        if states is not None:
            cache.set_ssm_states(*states)
        return step_post(x, cache.append_and_attend(q, k, v))

    def step_pre(self, x, cos, sin, ssm_states):
        return self.attn.step_qkv(self.attn_norm(x), cos, sin, ssm_states)

    def step_post(self, x, attn_out):
        h = x + matvec(attn_out.reshape(x.shape[0], -1), self.attn.wo.weight)
        return h + self.ffn.step(self.ffn_norm(h))


def can_compile_decoding() -> bool:
    """Whether torch.compile can build CPU code here (Inductor needs a C++ compiler), for compile_decoding."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        return bool(get_cpp_compiler())
    except Exception:  # no compiler found, or an Inductor without this helper
        return False


class AttambaLM(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # Module constructors draw their default init from the global RNG: keep it untouched.
        with torch.random.fork_rng(devices=[]):
            self.embed = nn.Embedding(config.vocab_size, config.dim)
            self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
            self.norm = RMSNorm(config.dim, config.norm_eps)
            self.output = None if config.tied_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters(config.seed)
        self._compiled_steps = self._compiled_logits = None  # see compile_decoding

    @torch.no_grad()
    def reset_parameters(self, seed: int):
        """Deterministic init from `seed`, leaving the global RNG as it was."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in self.modules():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(module.weight, std=self.config.init_std)
                elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                    module.weight.fill_(1.0)
                elif isinstance(module, ChunkSSM):
                    module.reset_parameters(self.config.init_std)

    def num_params(self, non_embedding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.embed.weight.numel()
            if self.output is not None:
                n -= self.output.weight.numel()
        return n

    def layer_chunks(self, positions: torch.Tensor, training: bool | None = None) -> list[LayerChunks]:
        """Per-layer chunk structure for int64 absolute positions [T]."""
        cfg = self.config
        training = self.training if training is None else training
        if cfg.attention != "attamba":
            return [LayerChunks(None, None, cfg.leading_window) for _ in range(cfg.n_layers)]
        seed = bnd.draw_training_seed() if (training and cfg.boundaries == "random") else cfg.boundary_seed
        out = []
        for layer in range(cfg.n_layers):
            ends = bnd.chunk_ends(cfg.boundaries, cfg.chunk_size, layer, cfg.n_layers, positions, seed)
            seq_idx = bnd.segment_ids(ends) if cfg.ssm_segmentation == "chunk" else bnd.chunk_offsets(ends)
            visible = None if cfg.pseudo_chunk else bnd.visible_boundaries(ends, positions)
            out.append(LayerChunks(seq_idx, visible, cfg.leading_window))
        return out

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        return rope_tables(positions, self.config.attn_head_dim, self.config.rope_theta, dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        h = self.norm(h)
        return matvec(h, self.embed.weight if self.output is None else self.output.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, reduction: str = "mean",
                layer_chunks: list[LayerChunks] | None = None):
        """tokens: [B, T] int64 -> logits [B, T, V]; with targets [B, T], the cross-entropy loss instead
        (a scalar, or [B, T] with reduction="none"). Targets equal to -100 are ignored."""
        bsz, seqlen = tokens.shape
        if seqlen > self.config.max_seq_len:
            raise ValueError(f"sequence length {seqlen} exceeds max_seq_len ({self.config.max_seq_len}); "
                             "raise model.max_seq_len or shorten the input")
        positions = torch.arange(seqlen, device=tokens.device)
        layer_chunks = self.layer_chunks(positions) if layer_chunks is None else layer_chunks
        h = self.embed(tokens)
        rope = self.rope(positions, h.dtype)
        for block, chunks in zip(self.layers, layer_chunks):
            h = block(h, rope, chunks)
        logits = self.logits(h)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction)
        return loss.view(bsz, seqlen) if reduction == "none" else loss

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor):
        """Parallel forward of one prompt, keeping what a decoding cache needs (eval boundaries).

        tokens: [B, T] -> logits [B, T, V] and one (k, v, ssm_states) per layer, k after RoPE and v
        [B, H, T, D]; ssm_states are the K- and V-SSM (conv, scan) states after the last token, or None.
        """
        seqlen = tokens.shape[1]
        if seqlen > self.config.max_seq_len:
            raise ValueError(f"prompt length {seqlen} exceeds max_seq_len ({self.config.max_seq_len}); "
                             "raise model.max_seq_len or shorten the prompt")
        positions = torch.arange(seqlen, device=tokens.device)
        h = self.embed(tokens)
        rope = self.rope(positions, h.dtype)
        kvs = []
        for block, chunks in zip(self.layers, self.layer_chunks(positions, training=False)):
            h, kv = block(h, rope, chunks, return_cache=True)
            kvs.append(kv)
        return self.logits(h), kvs

    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, caches) -> torch.Tensor:
        """One decoding step. tokens, positions: int64 [B] (each sequence at its own position);
        caches: one attamba.cache.LayerCache per layer, updated in place -> logits [B, V]."""
        h = self.embed(tokens)
        cos, sin = (t[:, None, None, :] for t in self.rope(positions, h.dtype))  # broadcast over heads
        compiled = self._compiled_steps or [None] * len(self.layers)
        for block, cache, fns in zip(self.layers, caches, compiled):
            h = block.step(h, cos, sin, cache, fns)
        return (self._compiled_logits or self.logits)(h)

    def compile_decoding(self, enable: bool = True) -> "AttambaLM":
        """Decode with each block's tensor work before and after the cache, and the output head, compiled
        by torch.compile (Inductor: fused C++ on CPU, needs a C compiler), which removes most of eager
        PyTorch's per-op overhead at small batch (the blocks share their graphs). The cache's bookkeeping
        stays eager. Compiles on the first steps (seconds per batch size); enable=False goes back to eager."""
        self._compiled_steps = [
            (torch.compile(block.step_pre, dynamic=False), torch.compile(block.step_post, dynamic=False))
            for block in self.layers] if enable else None
        self._compiled_logits = torch.compile(self.logits, dynamic=False) if enable else None
        return self
