"""The run configuration: one frozen dataclass per section under one root, from YAML plus overrides.

Defaults live in code; a YAML file in configs/ overrides them; `key.path=value` arguments override the
YAML. Unknown keys and values of the wrong type are errors that name the field and the fix, raised
before any compute. The resolved config is written into every run's directory and tracked.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attamba.config import ModelConfig
from attamba.presets import PRESETS, model_config

from pipeline.data.prepare import DataConfig
from pipeline.tracking.config import TrackingConfig

PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        _positive("optim.lr", self.lr)
        _in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        _at_least("optim.warmup_steps", self.warmup_steps, 0)
        _at_least("optim.weight_decay", self.weight_decay, 0.0)
        _in_range("optim.beta1", self.beta1, 0.0, 1.0)
        _in_range("optim.beta2", self.beta2, 0.0, 1.0)
        _positive("optim.eps", self.eps)
        _at_least("optim.grad_clip", self.grad_clip, 0.0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 8            # sequences per rank per micro-step
    grad_accum: int = 1
    seed: int = 0
    precision: str = "fp32"
    zero_stage: int = 0
    eval_every: int = 50
    ckpt_every: int = 100
    log_every: int = 10
    out_dir: str = "runs/default"
    device: str = "auto"           # auto | cpu | cuda
    progress: bool = True
    max_consecutive_skips: int = 8  # non-finite loss/grad-norm steps skipped in a row before training stops
    study: str | None = None       # tracked as tags when the run belongs to a study
    trial: str | None = None

    def __post_init__(self):
        _at_least("train.steps", self.steps, 1)
        _at_least("train.batch_size", self.batch_size, 1)
        _at_least("train.grad_accum", self.grad_accum, 1)
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        _at_least("train.eval_every", self.eval_every, 0)
        _at_least("train.ckpt_every", self.ckpt_every, 0)
        _at_least("train.log_every", self.log_every, 1)
        _at_least("train.max_consecutive_skips", self.max_consecutive_skips, 1)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"train.device must be auto, cpu or cuda, got {self.device!r}")


@dataclass(frozen=True)
class EvalConfig:
    batches: int = 20              # validation batches per periodic evaluation (0 = the whole split)
    paper_metric: bool = False     # also report the paper's per-token perplexity on each document's tail
    paper_tail: int = 1023
    mqar_lengths: tuple[int, ...] = ()
    mqar_examples: int = 64
    mqar_pairs: int = 8
    seed: int = 0                  # MQAR sequences are drawn from this seed

    def __post_init__(self):
        _at_least("eval.batches", self.batches, 0)
        _at_least("eval.paper_tail", self.paper_tail, 2)
        for n in self.mqar_lengths:
            _at_least("eval.mqar_lengths", n, 8)
        _at_least("eval.mqar_examples", self.mqar_examples, 1)
        _at_least("eval.mqar_pairs", self.mqar_pairs, 1)


@dataclass(frozen=True)
class RunConfig:
    name: str = "run"
    size: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self):
        if self.model.max_seq_len < self.data.seq_len:
            raise ValueError(f"data.seq_len must be <= model.max_seq_len ({self.model.max_seq_len}), got "
                             f"{self.data.seq_len}; lower data.seq_len or raise model.max_seq_len")

    def to_dict(self) -> dict:
        return to_dict(self)

    def sequences_per_step(self, world_size: int) -> int:
        """Sequences in one optimizer step over all ranks (DeepSpeed's train_batch_size)."""
        return self.train.batch_size * self.train.grad_accum * world_size

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens in one optimizer step over all ranks."""
        return self.sequences_per_step(world_size) * self.data.seq_len


# ---- checks --------------------------------------------------------------------------------------------

def _number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")


def _positive(name, value):
    _number(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _at_least(name, value, low):
    _number(name, value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")


def _in_range(name, value, low, high):
    _number(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value!r}")


# ---- building from dicts -------------------------------------------------------------------------------

def _check_type(name: str, value, hint):
    """Coerce/check a YAML value against a field's type hint; ValueError naming the field otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else typing.Any
        items = [_check_type(name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is typing.Any:
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return value
    return value


def build(cls, data: dict | None, prefix: str = ""):
    """Instantiate dataclass `cls` from a dict, recursively; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(prefix + k for k in unknown)} in {where}; "
                         f"valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ValueError(f"{prefix}{key} must be a mapping of {hint.__name__} fields, got {value!r}")
            kwargs[key] = build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = str(exc)
        # Field checks inside attamba.config name bare fields; give them their place in the file.
        if prefix and not message.startswith(prefix):
            message = prefix + message
        raise ValueError(message) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` strings; the value is parsed as YAML (so 8 is an int, true a bool, [1,2] a list)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        node = data
        for k in keys[:-1]:
            node[k] = dict(node.get(k) or {})
            node = node[k]
        node[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
    return data


def run_config_from_dict(data: dict) -> RunConfig:
    data = dict(data)
    size = data.get("size", RunConfig.size)
    if size not in PRESETS:
        raise ValueError(f"size must be one of {', '.join(PRESETS)}, got {size!r}")
    model = dict(data.get("model") or {})
    preset = dataclasses.asdict(model_config(size))
    # The preset sets width and depth; explicit model keys win; derived sizes follow the preset's width.
    for key in ("dim", "n_layers", "n_heads"):
        model.setdefault(key, preset[key])
    data["model"] = model
    return build(RunConfig, data)


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    data = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist; pass a YAML file from configs/")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {str(path)!r} must hold a mapping at the top level")
    return run_config_from_dict(apply_overrides(data, overrides or []))


def to_dict(obj) -> dict:
    def convert(value):
        if dataclasses.is_dataclass(value):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (tuple, list)):
            return [convert(v) for v in value]
        return value
    return convert(obj)


def dump_yaml(config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)
