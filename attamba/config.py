"""Model configuration: frozen dataclasses, validated at construction.

Every invalid value raises a ValueError naming the field, the value and the fix, so a bad config fails
before any compute. Defaults follow docs/method.md (the paper's 60M setting); size presets are in presets.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from .checks import at_least, boolean, fail, number, one_of, positive, seed

ATTENTION_KINDS = ("attamba", "full", "swa", "iso_kv")
BOUNDARY_STRATEGIES = ("uniform", "cyclic", "cyclic_released", "random")
SSM_SEGMENTATIONS = ("chunk", "offset")
ISO_SIZINGS = ("kv", "flop", "param")   # what an iso_kv baseline's width F was matched to
MODEL_KINDS = ("attamba", "full", "swa", "iso_kv", "iso_flop", "iso_param")

# Fields that set the model's size, not its variant (the size is its own tag).
SIZE_FIELDS = ("vocab_size", "dim", "n_layers", "n_heads", "head_dim", "ffn_dim", "max_seq_len", "seed")
# Fields read only by Attamba's attention; baselines ignore them.
ATTAMBA_FIELDS = ("chunk_size", "leading_tokens", "boundaries", "boundary_seed", "kv_proj", "ssm_residual",
                  "pseudo_chunk", "ssm_segmentation", "ssm")
# Each kind's core label fields, in label order; `attention` and `iso` are spelled by the kind itself.
CORE_FIELDS = {"attamba": ("chunk_size", "leading_tokens", "boundaries"), "full": (), "swa": ("window",),
               "iso_kv": ("kv_dim",)}
SUFFIX_ABBREVIATIONS = {"ssm_segmentation": "seg"}   # -seg_offset


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
        at_least("ssm.state_dim", self.state_dim, 1, integer=True)
        at_least("ssm.inner_dim", self.inner_dim, 1, integer=True, or_none=True)
        at_least("ssm.heads", self.heads, 1, integer=True, or_none=True)
        for name in ("groups", "conv_width", "scan_chunk"):
            at_least(f"ssm.{name}", getattr(self, name), 1, integer=True)
        for name in ("a_init_min", "a_init_max", "dt_min", "dt_max", "dt_init_floor"):
            positive(f"ssm.{name}", getattr(self, name), finite=True)
        if self.a_init_max < self.a_init_min:
            fail("ssm.a_init_max", self.a_init_max, f">= ssm.a_init_min ({self.a_init_min})",
                 "raise ssm.a_init_max or lower ssm.a_init_min")
        if self.dt_max < self.dt_min:
            fail("ssm.dt_max", self.dt_max, f">= ssm.dt_min ({self.dt_min})", "raise ssm.dt_max or lower ssm.dt_min")
        at_least("ssm.dt_limit_min", self.dt_limit_min, 0, finite=True)
        number("ssm.dt_limit_max", self.dt_limit_max)   # inf: no upper limit
        if not self.dt_limit_max > self.dt_limit_min:
            fail("ssm.dt_limit_max", self.dt_limit_max, f"> ssm.dt_limit_min ({self.dt_limit_min})")

    @staticmethod
    def default_inner_dim(dim: int) -> int:
        return max(dim // 2, 8)

    @staticmethod
    def default_heads(inner_dim: int) -> int:
        return max(inner_dim // 32, 1)

    def resolved(self, dim: int) -> "SSMConfig":
        """The same config with inner_dim and heads filled in for a model of width `dim`."""
        inner = self.inner_dim if self.inner_dim is not None else self.default_inner_dim(dim)
        heads = self.heads if self.heads is not None else self.default_heads(inner)
        if inner % heads:
            fail("ssm.inner_dim", inner, f"divisible by ssm.heads ({heads})", "set ssm.inner_dim or ssm.heads")
        if heads % self.groups:
            fail("ssm.heads", heads, f"divisible by ssm.groups ({self.groups})", "set ssm.heads or ssm.groups")
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
    iso-KV baseline's attention width F. `sliding_window` (iso_kv only) limits the iso-KV transformer to the
    last `window` keys, query included, like swa: the paper's iso-KV transformer evaluated with a sliding
    window. It changes no parameter.
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
    iso: str | None = None   # iso_kv only: the cost F was matched to, "kv" | "flop" | "param" (attamba.costs)
    sliding_window: bool = False

    def __post_init__(self):
        if isinstance(self.ssm, dict):
            object.__setattr__(self, "ssm", SSMConfig(**self.ssm))
        if not isinstance(self.ssm, SSMConfig):
            fail("ssm", self.ssm, "an SSMConfig or a mapping of its fields")
        at_least("vocab_size", self.vocab_size, 2, integer=True)
        for name in ("dim", "n_layers", "n_heads"):
            at_least(name, getattr(self, name), 1, integer=True)
        if self.head_dim is None:
            if self.dim % self.n_heads:
                fail("dim", self.dim, f"divisible by n_heads ({self.n_heads})",
                     "change dim or n_heads, or set head_dim")
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        at_least("head_dim", self.head_dim, 2, integer=True)
        if self.head_dim % 2:
            fail("head_dim", self.head_dim, "even (RoPE rotates pairs of channels)")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 64 * math.ceil(8 * self.dim / 3 / 64))
        at_least("ffn_dim", self.ffn_dim, 1, integer=True)
        for name in ("norm_eps", "rope_theta", "init_std"):
            positive(name, getattr(self, name), finite=True)
        at_least("max_seq_len", self.max_seq_len, 1, integer=True)
        seed("seed", self.seed)

        one_of("attention", self.attention, ATTENTION_KINDS)
        at_least("chunk_size", self.chunk_size, 1, integer=True)
        at_least("leading_tokens", self.leading_tokens, 0, integer=True)
        one_of("boundaries", self.boundaries, BOUNDARY_STRATEGIES)
        seed("boundary_seed", self.boundary_seed)
        for name in ("tied_embeddings", "kv_proj", "ssm_residual", "pseudo_chunk", "sliding_window"):
            boolean(name, getattr(self, name))
        one_of("ssm_segmentation", self.ssm_segmentation, SSM_SEGMENTATIONS)
        at_least("window", self.window, 1, integer=True)

        if self.attention == "attamba":
            if self.n_heads * self.head_dim != self.dim:
                fail("head_dim", self.head_dim, f"dim / n_heads ({self.dim} / {self.n_heads}) for attention=attamba",
                     "the SSM keys and values have the model's width; leave head_dim unset")
            object.__setattr__(self, "ssm", self.ssm.resolved(self.dim))
        if self.attention == "iso_kv":
            if self.kv_dim is None:
                fail("kv_dim", self.kv_dim, "set for attention=iso_kv", "see attamba.costs.iso_kv_config")
            at_least("kv_dim", self.kv_dim, 1, integer=True)
            if self.kv_dim % (2 * self.n_heads):
                fail("kv_dim", self.kv_dim, f"a multiple of 2 * n_heads ({2 * self.n_heads})")
            if self.iso is not None:
                one_of("iso", self.iso, ISO_SIZINGS)
        else:
            at_least("kv_dim", self.kv_dim, 1, integer=True, or_none=True)
            if self.sliding_window:
                fail("sliding_window", self.sliding_window, f"false for attention={self.attention!r}",
                     "it applies to attention=iso_kv; a full transformer with a window is attention=swa")
            if self.iso is not None:
                fail("iso", self.iso, f"null for attention={self.attention}",
                     "iso names how an attention=iso_kv baseline was sized; drop it for other attention kinds")

    @property
    def kind(self) -> str:
        """What the run is, for comparisons: the attention, but iso_flop / iso_param for an iso_kv module
        sized to match Attamba's FLOPs / parameters."""
        if self.attention == "iso_kv" and self.iso in ("flop", "param"):
            return f"iso_{self.iso}"
        return self.attention

    @property
    def attn_dim(self) -> int:
        """Width of q, k and v: F for iso_kv, n_heads * head_dim otherwise."""
        return self.kv_dim if self.attention == "iso_kv" else self.n_heads * self.head_dim

    @property
    def leading_window(self) -> int | None:
        """Recent keys each query sees besides itself: L (attamba), W-1 (swa); None: every earlier key."""
        if self.attention == "attamba" and not self.pseudo_chunk:
            return self.leading_tokens
        windowed = self.attention == "swa" or (self.attention == "iso_kv" and self.sliding_window)
        return self.window - 1 if windowed else None

    @property
    def attn_head_dim(self) -> int:
        return self.attn_dim // self.n_heads

    def variant(self) -> str:
        """THE variant identity: run names, the MLflow `variant` tag and report grouping all use it.

        The kind's core (attamba-P8-L8-cyclic, full, swa-W33, iso_kv-F32, iso_flop-F48) plus one suffix for
        every other field that differs from its default and matters for the kind (-seg_offset, -kv_proj,
        -no_ssm_residual, -ssm.state_dim16, -rope_theta500000, ...). Size fields are not part of it; fields
        the kind ignores (chunk_size for a transformer, SSM widths left at their default rule) are skipped.
        The label is file-name safe (letters, digits, '.', '_', '-').
        """
        kind = self.kind
        core = CORE_FIELDS[self.attention]
        label = "-".join([kind] + [_core_part(name, getattr(self, name)) for name in core])
        if self.attention == "iso_kv" and self.sliding_window:
            label += f"-W{self.window}"   # the window is what its sliding_window adds
        for name, value in _differences(self):
            if name not in core:
                label += _suffix(name, value)
        return label


def variant_fields(cfg: ModelConfig) -> list[tuple[str, object, object]]:
    """(name, value, reference) of every field that is part of `cfg`'s identity for its kind, in field order,
    SSM fields as "ssm.<name>"; the reference is the default (for SSM widths: their default rule at this
    width). Generic over dataclasses.fields, so a new field is part of the identity unless it is a size field.
    `attention` and `iso` are not listed: the kind spells them."""
    default = ModelConfig()
    skip = set(SIZE_FIELDS) | {"attention", "iso", "sliding_window"}   # variant() spells these out
    if cfg.attention != "attamba":
        skip |= set(ATTAMBA_FIELDS)
    elif cfg.boundaries != "random":
        skip.add("boundary_seed")   # the seed draws random boundaries only
    if cfg.attention != "swa":
        skip.add("window")
    if cfg.attention != "iso_kv":
        skip.add("kv_dim")
    out = []
    for f in fields(ModelConfig):
        if f.name == "ssm" and f.name not in skip:
            out += _ssm_fields(cfg.ssm, cfg.dim)
        elif f.name not in skip:
            out.append((f.name, getattr(cfg, f.name), getattr(default, f.name)))
    return out


def _differences(cfg: ModelConfig) -> list[tuple[str, object]]:
    return [(name, value) for name, value, reference in variant_fields(cfg) if value != reference]


def _ssm_fields(ssm: SSMConfig, dim: int) -> list[tuple[str, object, object]]:
    # inner_dim and heads count only where they differ from their default rule for this width
    rule = {"inner_dim": SSMConfig.default_inner_dim(dim), "heads": SSMConfig.default_heads(ssm.inner_dim)}
    return [(f"ssm.{f.name}", getattr(ssm, f.name), rule.get(f.name, f.default)) for f in fields(SSMConfig)]


def _format(value) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _core_part(name: str, value) -> str:
    prefix = {"chunk_size": "P", "leading_tokens": "L", "window": "W", "kv_dim": "F"}.get(name, "")
    return f"{prefix}{_format(value)}"


def _suffix(name: str, value) -> str:
    if isinstance(value, bool):
        return f"-{name}" if value else f"-no_{name}"
    if isinstance(value, str):
        return f"-{SUFFIX_ABBREVIATIONS.get(name, name)}_{value}"
    return f"-{name}{_format(value)}"
