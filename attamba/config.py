"""Model configuration: frozen dataclasses, validated at construction.

Every invalid value raises a ValueError naming the field, the value and the fix, so a bad config fails
before any compute. Defaults follow docs/method.md (the paper's 60M setting); size presets are in presets.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

ATTENTION_KINDS = ("attamba", "full", "swa", "iso_kv")
BOUNDARY_STRATEGIES = ("uniform", "cyclic", "cyclic_released", "random")
SSM_SEGMENTATIONS = ("chunk", "offset")


def _fail(name: str, value, fix: str):
    raise ValueError(f"{name} {fix}, got {value!r}")


def _check_int(name: str, value, minimum: int | None = None):
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, value, "must be an integer")
    if minimum is not None and value < minimum:
        _fail(name, value, f"must be >= {minimum}")


def _check_float(name: str, value, positive: bool = False, minimum: float | None = None):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(name, value, "must be a finite number")
    if positive and value <= 0:
        _fail(name, value, "must be > 0")
    if minimum is not None and value < minimum:
        _fail(name, value, f"must be >= {minimum}")


def _check_bool(name: str, value):
    if not isinstance(value, bool):
        _fail(name, value, "must be true or false")


def _check_choice(name: str, value, choices):
    if value not in choices:
        _fail(name, value, f"must be one of {', '.join(choices)}")


@dataclass(frozen=True)
class SSMConfig:
    """The Mamba2 (SSD) block used for K and V (docs/method.md section 2).

    `inner_dim=None` means dim // 2 (the paper's 256 at dim 512); `heads=None` means inner_dim // 32
    (the paper's head dim 32).
    """

    state_dim: int = 32
    inner_dim: int | None = None
    heads: int | None = None
    groups: int = 1
    conv_width: int = 4
    scan_chunk: int = 64
    a_init_min: float = 1.0
    a_init_max: float = 16.0
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit_min: float = 0.0
    dt_limit_max: float = math.inf

    def __post_init__(self):
        _check_int("ssm.state_dim", self.state_dim, 1)
        if self.inner_dim is not None:
            _check_int("ssm.inner_dim", self.inner_dim, 1)
        if self.heads is not None:
            _check_int("ssm.heads", self.heads, 1)
        _check_int("ssm.groups", self.groups, 1)
        _check_int("ssm.conv_width", self.conv_width, 1)
        _check_int("ssm.scan_chunk", self.scan_chunk, 1)
        _check_float("ssm.a_init_min", self.a_init_min, positive=True)
        _check_float("ssm.a_init_max", self.a_init_max, positive=True)
        if self.a_init_max < self.a_init_min:
            _fail("ssm.a_init_max", self.a_init_max, f"must be >= ssm.a_init_min ({self.a_init_min})")
        _check_float("ssm.dt_min", self.dt_min, positive=True)
        _check_float("ssm.dt_max", self.dt_max, positive=True)
        if self.dt_max < self.dt_min:
            _fail("ssm.dt_max", self.dt_max, f"must be >= ssm.dt_min ({self.dt_min})")
        _check_float("ssm.dt_init_floor", self.dt_init_floor, positive=True)
        if not (isinstance(self.dt_limit_min, (int, float)) and self.dt_limit_min >= 0):
            _fail("ssm.dt_limit_min", self.dt_limit_min, "must be a number >= 0")
        if not (isinstance(self.dt_limit_max, (int, float)) and self.dt_limit_max > self.dt_limit_min):
            _fail("ssm.dt_limit_max", self.dt_limit_max, "must be a number > ssm.dt_limit_min")

    def resolved(self, dim: int) -> "SSMConfig":
        """The same config with inner_dim and heads filled in for a model of width `dim`."""
        from dataclasses import replace

        inner = self.inner_dim if self.inner_dim is not None else max(dim // 2, 8)
        heads = self.heads if self.heads is not None else max(inner // 32, 1)
        if inner % heads:
            _fail("ssm.inner_dim", inner, f"must be divisible by ssm.heads ({heads})")
        if heads % self.groups:
            _fail("ssm.heads", heads, f"must be divisible by ssm.groups ({self.groups})")
        return replace(self, inner_dim=inner, heads=heads)

    @property
    def head_dim(self) -> int:
        return self.inner_dim // self.heads

    @property
    def conv_dim(self) -> int:
        return self.inner_dim + 2 * self.groups * self.state_dim


@dataclass(frozen=True)
class ModelConfig:
    """One decoder-only LM: Attamba or one of its transformer baselines.

    `head_dim=None` means dim // n_heads; `ffn_dim=None` means the Llama rule (8/3 * dim rounded up to a
    multiple of 64). Attamba fields (chunk_size = P, leading_tokens = L, ...) are ignored by baselines;
    `window` is the sliding-window baseline's number of visible keys (query included); `kv_dim` is the
    iso-KV baseline's attention width F.
    """

    vocab_size: int = 4096
    dim: int = 512
    n_layers: int = 8
    n_heads: int = 8
    head_dim: int | None = None
    ffn_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 1024
    tied_embeddings: bool = False
    init_std: float = 0.02
    seed: int = 0

    attention: str = "attamba"
    chunk_size: int = 8
    leading_tokens: int = 8
    boundaries: str = "cyclic"
    boundary_seed: int = 0
    kv_proj: bool = False
    ssm_residual: bool = True
    pseudo_chunk: bool = False
    ssm_segmentation: str = "chunk"
    ssm: SSMConfig = field(default_factory=SSMConfig)

    window: int = 256
    kv_dim: int | None = None

    def __post_init__(self):
        if isinstance(self.ssm, dict):
            object.__setattr__(self, "ssm", SSMConfig(**self.ssm))
        if not isinstance(self.ssm, SSMConfig):
            _fail("ssm", self.ssm, "must be an SSMConfig or a mapping of its fields")
        _check_int("vocab_size", self.vocab_size, 2)
        _check_int("dim", self.dim, 1)
        _check_int("n_layers", self.n_layers, 1)
        _check_int("n_heads", self.n_heads, 1)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                _fail("dim", self.dim, f"must be divisible by n_heads ({self.n_heads}), or set head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _check_int("head_dim", self.head_dim, 2)
        if self.head_dim % 2:
            _fail("head_dim", self.head_dim, "must be even (RoPE rotates pairs of channels)")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 64 * math.ceil(8 * self.dim / 3 / 64))
        _check_int("ffn_dim", self.ffn_dim, 1)
        _check_float("norm_eps", self.norm_eps, positive=True)
        _check_float("rope_theta", self.rope_theta, positive=True)
        _check_int("max_seq_len", self.max_seq_len, 1)
        _check_bool("tied_embeddings", self.tied_embeddings)
        _check_float("init_std", self.init_std, positive=True)
        _check_int("seed", self.seed)

        _check_choice("attention", self.attention, ATTENTION_KINDS)
        _check_int("chunk_size", self.chunk_size, 1)
        _check_int("leading_tokens", self.leading_tokens, 0)
        _check_choice("boundaries", self.boundaries, BOUNDARY_STRATEGIES)
        _check_int("boundary_seed", self.boundary_seed)
        _check_bool("kv_proj", self.kv_proj)
        _check_bool("ssm_residual", self.ssm_residual)
        _check_bool("pseudo_chunk", self.pseudo_chunk)
        _check_choice("ssm_segmentation", self.ssm_segmentation, SSM_SEGMENTATIONS)
        _check_int("window", self.window, 1)

        if self.attention == "attamba":
            if self.n_heads * self.head_dim != self.dim:
                _fail("head_dim", self.head_dim,
                      f"must equal dim / n_heads ({self.dim} / {self.n_heads}) for attention=attamba: "
                      "the SSM keys and values have the model's width")
            object.__setattr__(self, "ssm", self.ssm.resolved(self.dim))
        if self.attention == "iso_kv":
            if self.kv_dim is None:
                _fail("kv_dim", self.kv_dim, "must be set for attention=iso_kv (see attamba.costs.iso_kv_config)")
            _check_int("kv_dim", self.kv_dim, 1)
            if self.kv_dim % (2 * self.n_heads):
                _fail("kv_dim", self.kv_dim, f"must be a multiple of 2 * n_heads ({2 * self.n_heads})")
        elif self.kv_dim is not None:
            _check_int("kv_dim", self.kv_dim, 1)

    @property
    def attn_dim(self) -> int:
        """Width of q, k and v: F for iso_kv, n_heads * head_dim otherwise."""
        return self.kv_dim if self.attention == "iso_kv" else self.n_heads * self.head_dim

    @property
    def leading_window(self) -> int | None:
        """Recent keys each query sees besides itself: L (attamba), W-1 (swa); None: every earlier key."""
        if self.attention == "attamba" and not self.pseudo_chunk:
            return self.leading_tokens
        return self.window - 1 if self.attention == "swa" else None

    @property
    def attn_head_dim(self) -> int:
        return self.attn_dim // self.n_heads

    def variant(self) -> str:
        """A short readable label of the attention variant, used in run names and reports."""
        if self.attention == "attamba":
            label = f"attamba-P{self.chunk_size}-L{self.leading_tokens}-{self.boundaries}"
            if self.ssm_segmentation != "chunk":
                label += f"-seg{self.ssm_segmentation}"
            if self.pseudo_chunk:
                label += "-pseudo"
            if self.kv_proj:
                label += "-kvproj"
            if not self.ssm_residual:
                label += "-nores"
            return label
        if self.attention == "swa":
            return f"swa-W{self.window}"
        if self.attention == "iso_kv":
            return f"iso_kv-F{self.kv_dim}"
        return "full"


def config_fields(cls) -> list[str]:
    return [f.name for f in fields(cls)]
