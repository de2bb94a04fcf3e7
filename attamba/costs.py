"""Analytic costs (docs/method.md section 5): parameters, KV-cache bytes, attention and training FLOPs.

Conventions, shared with the decoding cache so that measurement and formula agree exactly:
- After processing T tokens a layer caches exactly the keys visible to the last query (position T-1):
  the last min(L+1, T) positions, plus the visible boundaries (chunk ends and the sink) before them.
  full / iso_kv cache all T positions; swa (and iso_kv with sliding_window) the last min(W, T).
- K/V entries have the model's dtype; the K- and V-SSM states (conv window and scan state of the current
  chunk) are kept in float32.
- Attention FLOPs per query = 4 * attn_dim * visible keys (QK^T and PV, 2 FLOPs per multiply-add).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from . import boundaries as bnd
from .config import ModelConfig
from .ops.attention.mask import visible_keys as mask_visible_keys

STATE_BYTES = 4  # SSM states are float32


def _dtype_bytes(dtype: torch.dtype | int) -> int:
    return dtype if isinstance(dtype, int) else torch.empty((), dtype=dtype).element_size()


# ---- visible keys -------------------------------------------------------------------------------------

def layer_boundaries(cfg: ModelConfig, layer: int, context: int) -> torch.Tensor | None:
    """Visible boundaries bool [context] of one layer (None for kinds without boundaries)."""
    if cfg.attention != "attamba" or cfg.pseudo_chunk:
        return None
    pos = torch.arange(context)
    ends = bnd.chunk_ends(cfg.boundaries, cfg.chunk_size, layer, cfg.n_layers, pos, cfg.boundary_seed)
    return bnd.visible_boundaries(ends, pos)


def visible_keys(cfg: ModelConfig, layer: int, context: int) -> torch.Tensor:
    """int64 [context]: number of keys query t attends to, for t = 0..context-1."""
    return mask_visible_keys(context, layer_boundaries(cfg, layer, context), cfg.leading_window)


def cached_positions(cfg: ModelConfig, layer: int, context: int) -> int:
    """Positions one layer caches after `context` tokens: the keys visible to query context-1."""
    if context <= 0:
        return 0
    return int(visible_keys(cfg, layer, context)[-1])


# ---- bytes --------------------------------------------------------------------------------------------

def ssm_state_elements(cfg: ModelConfig) -> int:
    """float32 elements of one SSM's decoding state: conv window (W-1) x conv_dim, plus heads x head_dim x N."""
    s = cfg.ssm
    return s.conv_dim * (s.conv_width - 1) + s.heads * s.head_dim * s.state_dim


def layer_cache_bytes(cfg: ModelConfig, layer: int, context: int, dtype=torch.float32) -> int:
    kv = 2 * cached_positions(cfg, layer, context) * cfg.attn_dim * _dtype_bytes(dtype)
    if cfg.attention == "attamba":
        kv += 2 * ssm_state_elements(cfg) * STATE_BYTES
    return kv


def kv_cache_bytes(cfg: ModelConfig, context: int, dtype=torch.float32) -> int:
    """Total decoding-cache bytes of all layers after `context` tokens (per sequence)."""
    return sum(layer_cache_bytes(cfg, layer, context, dtype) for layer in range(cfg.n_layers))


def kv_bytes_per_token(cfg: ModelConfig, dtype=torch.float32) -> float:
    """Asymptotic cache bytes per context token, all layers: 2*attn_dim*bytes*n_layers / P for Attamba."""
    per = 2 * cfg.attn_dim * _dtype_bytes(dtype) * cfg.n_layers
    if cfg.attention == "attamba" and not cfg.pseudo_chunk:
        return per / cfg.chunk_size
    if cfg.leading_window is not None:   # swa, or iso_kv with a sliding window: a bounded cache
        return 0.0
    return float(per)


# ---- FLOPs --------------------------------------------------------------------------------------------

def attention_flops(cfg: ModelConfig, context: int) -> dict[str, float]:
    """Attention-score FLOPs (QK^T + PV), all layers: prefill total, per token, and decode at `context`."""
    total, last = 0, 0
    for layer in range(cfg.n_layers):
        vis = visible_keys(cfg, layer, context)
        total += int(vis.sum())
        last += int(vis[-1])
    per_key = 4 * cfg.attn_dim
    return {"prefill": per_key * total, "per_token": per_key * total / context, "decode": per_key * last}


def param_count(cfg: ModelConfig, non_embedding: bool = True) -> int:
    """Exact parameter count of AttambaLM(cfg) (tested against the module)."""
    d, a = cfg.dim, cfg.attn_dim
    layer = 2 * d + 3 * d * cfg.ffn_dim + 2 * d * a  # norms, SwiGLU, wq, wo
    if cfg.attention == "attamba":
        s = cfg.ssm
        in_out = d * (2 * s.inner_dim + 2 * s.groups * s.state_dim + s.heads) + s.inner_dim * d
        ssm = in_out + s.conv_dim * (s.conv_width + 1) + 3 * s.heads + s.inner_dim
        layer += 2 * ssm + (2 * d * d if cfg.kv_proj else 0)
    else:
        layer += 2 * d * a
    n = cfg.n_layers * layer + d
    if not non_embedding:
        n += cfg.vocab_size * d * (1 if cfg.tied_embeddings else 2)
    return n


def matmul_params(cfg: ModelConfig) -> int:
    """Parameters that take part in a matmul per token (non-embedding weights plus the output head)."""
    return param_count(cfg, non_embedding=True) + cfg.vocab_size * cfg.dim


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6 * matmul params + 3x the forward attention FLOPs averaged over the visible keys at seq_len."""
    return 6 * matmul_params(cfg) + 3 * attention_flops(cfg, seq_len)["per_token"]


def attention_sublayer_flops_per_token(cfg: ModelConfig, context: int) -> float:
    """Forward FLOPs per token of the attention sub-layers: projections, SSMs and attention scores."""
    d, a = cfg.dim, cfg.attn_dim
    proj = 2 * d * a * 2  # wq and wo
    if cfg.attention == "attamba":
        s = cfg.ssm
        in_out = d * (2 * s.inner_dim + 2 * s.groups * s.state_dim + s.heads) + s.inner_dim * d
        scan = 6 * s.heads * s.head_dim * s.state_dim  # state update and readout per token
        proj += 2 * (2 * in_out + 2 * s.conv_dim * s.conv_width + scan)
        proj += 2 * 2 * d * d if cfg.kv_proj else 0
    else:
        proj += 2 * 2 * d * a
    return cfg.n_layers * proj + attention_flops(cfg, context)["per_token"]


# ---- iso baselines ------------------------------------------------------------------------------------

def _round_kv_dim(value: float, n_heads: int) -> int:
    step = 2 * n_heads
    return max(step, int(round(value / step)) * step)


def iso_kv_config(cfg: ModelConfig, context: int, dtype=torch.float32) -> ModelConfig:
    """The iso-KV transformer: full attention at width F chosen so its cache at `context` matches Attamba's.

    Solves 2*T*F*bytes*layers = Attamba's cache bytes (boundaries, window and SSM states included): the
    paper's condition 2TF = 2Td/P + 2D_S, with the window and the exact boundary count made explicit.
    """
    if cfg.attention != "attamba":
        raise ValueError(f"attention must be attamba to size an iso-KV baseline, got {cfg.attention!r}")
    target = kv_cache_bytes(cfg, context, dtype)
    f = target / (2 * context * _dtype_bytes(dtype) * cfg.n_layers)
    return replace(cfg, attention="iso_kv", kv_dim=_round_kv_dim(f, cfg.n_heads), iso="kv")


def iso_flop_config(cfg: ModelConfig, context: int) -> ModelConfig:
    """The iso-FLOP transformer: width F whose attention sub-layers cost what Attamba's do at `context`.

    Per token and layer the transformer pays 8*d*F for its q, k, v, o projections and 4*F*(mean visible
    keys) for attention, against Attamba's projections, two SSMs and sparse attention (the paper's
    3F^2 + 2TF = d^2 + 6dD_S + 21D_S + 2Td/P, with every term counted from this cost model).
    """
    if cfg.attention != "attamba":
        raise ValueError(f"attention must be attamba to size an iso-FLOP baseline, got {cfg.attention!r}")
    target = attention_sublayer_flops_per_token(cfg, context) / cfg.n_layers
    mean_visible = (context + 1) / 2
    f = target / (8 * cfg.dim + 4 * mean_visible)
    return replace(cfg, attention="iso_kv", kv_dim=_round_kv_dim(f, cfg.n_heads), iso="flop")


def summary(cfg: ModelConfig, context: int, train_tokens: int = 0, dtype=torch.float32) -> dict[str, float]:
    """The cost metrics a run logs (names in pipeline.schema)."""
    att = attention_flops(cfg, context)
    return {
        "params": param_count(cfg, non_embedding=False),
        "params_non_embedding": param_count(cfg),
        "kv_cache_bytes": kv_cache_bytes(cfg, context, dtype),
        "kv_cache_bytes_per_token": kv_bytes_per_token(cfg, dtype),
        "attn_flops_per_token": att["per_token"],
        "train_flops": training_flops_per_token(cfg, context) * train_tokens,
        "train_tokens": train_tokens,
        "eval_context": context,
    }

