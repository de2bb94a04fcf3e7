"""The run configuration: one frozen dataclass per section under one root, from YAML plus overrides.

Defaults live in code; a YAML file in configs/ overrides them; `key.path=value` arguments override the
YAML. Unknown keys and values of the wrong type are errors that name the field and the fix, raised
before any compute. The resolved config is written into every run's directory and tracked.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attamba.checks import (at_least, boolean, fail, in_range, integer, number, one_of, positive, safe_name, seed,
                            text)
from attamba.config import ModelConfig
from attamba.presets import PRESETS, model_config
from attamba.variants import check_variant

from pipeline import yamlio
from pipeline.data.prepare import MQAR_SOURCE, DataConfig
from pipeline.tracking.config import TrackingConfig

PRECISIONS = ("fp32", "bf16")
ZERO_STAGES = (0, 1, 2, 3)
DEVICES = ("auto", "cpu", "cuda")


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
        positive("optim.lr", self.lr, finite=True)
        in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        at_least("optim.warmup_steps", self.warmup_steps, 0, integer=True)
        at_least("optim.weight_decay", self.weight_decay, 0.0, finite=True)
        for name in ("beta1", "beta2"):   # Adam's moment decays: 1 would never forget, torch refuses it
            in_range(f"optim.{name}", getattr(self, name), 0.0, 1.0, high_open=True, fix="e.g. 0.9 or 0.95")
        positive("optim.eps", self.eps, finite=True)
        at_least("optim.grad_clip", self.grad_clip, 0.0, finite=True, fix="0 turns clipping off")


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
    keep_last: int = 2             # newest checkpoints kept; older ones go once a newer one is sealed (0: all)
    keep_steps: tuple[int, ...] = ()  # milestone steps whose checkpoints are never deleted
    allow_steps_change: bool = False  # resume a checkpoint made with another train.steps (reshapes the LR schedule)
    log_every: int = 10
    out_dir: str = "runs/default"
    device: str = "auto"           # auto | cpu | cuda
    progress: bool = True
    max_consecutive_skips: int = 8  # non-finite loss/grad-norm steps skipped in a row before training stops
    study: str | None = None       # tracked as tags when the run belongs to a study
    trial: str | None = None

    def __post_init__(self):
        for name, low in (("steps", 1), ("batch_size", 1), ("grad_accum", 1), ("eval_every", 0),
                          ("ckpt_every", 0), ("keep_last", 0), ("log_every", 1), ("max_consecutive_skips", 1)):
            at_least(f"train.{name}", getattr(self, name), low, integer=True)
        for i, step in enumerate(self.keep_steps):
            integer(f"train.keep_steps[{i}]", step, 1, fix="a step whose checkpoint is kept forever")
            if step != self.steps and not (self.ckpt_every and step % self.ckpt_every == 0):
                fail(f"train.keep_steps[{i}]", step, f"a step where a checkpoint is saved (a multiple of "
                     f"train.ckpt_every={self.ckpt_every}, or train.steps={self.steps})",
                     "pick such a step or change train.ckpt_every")
        boolean("train.allow_steps_change", self.allow_steps_change)
        seed("train.seed", self.seed)
        text("train.out_dir", self.out_dir, fix="the run's folder, e.g. runs/my-run")
        one_of("train.precision", self.precision, PRECISIONS)
        one_of("train.zero_stage", self.zero_stage, ZERO_STAGES)
        one_of("train.device", self.device, DEVICES)
        boolean("train.progress", self.progress)
        safe_name("train.study", self.study, or_none=True)
        safe_name("train.trial", self.trial, or_none=True)


@dataclass(frozen=True)
class EvalConfig:
    batches: int = 20              # validation batches per periodic evaluation (0 = the whole split)
    paper_metric: bool = False     # also report the paper's per-token perplexity on each document's tail
    paper_tail: int = 1023
    mqar_lengths: tuple[int, ...] = ()
    mqar_examples: int = 64
    mqar_pairs: int = 8
    seed: int = 0                  # MQAR sequences are drawn from this seed
    # Evaluation variants, scored at the final evaluation: each a mapping of attention fields, e.g.
    # {chunk_size: 16} or {window: 33} (attamba.variants); a variant that does not fit a run's kind is skipped.
    variants: tuple[dict, ...] = ()

    def __post_init__(self):
        at_least("eval.batches", self.batches, 0, integer=True)
        at_least("eval.paper_tail", self.paper_tail, 2, integer=True)
        at_least("eval.mqar_pairs", self.mqar_pairs, 1, integer=True)
        for i, n in enumerate(self.mqar_lengths):   # 2 tokens per pair, then each key queried at its own position
            at_least(f"eval.mqar_lengths[{i}]", n, max(8, 4 * self.mqar_pairs), integer=True,
                     fix=f"4 x eval.mqar_pairs={self.mqar_pairs} at least; raise it or lower eval.mqar_pairs")
        at_least("eval.mqar_examples", self.mqar_examples, 1, integer=True)
        seed("eval.seed", self.seed)
        checked = tuple(check_variant(v, f"eval.variants[{i}]") for i, v in enumerate(self.variants))
        object.__setattr__(self, "variants", checked)


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
        safe_name("name", self.name)
        if self.model.max_seq_len < self.data.seq_len:
            fail("data.seq_len", self.data.seq_len, f"<= model.max_seq_len ({self.model.max_seq_len})",
                 "lower data.seq_len or raise model.max_seq_len")
        if self.model.attention == "attamba":
            # Beyond the training length neither changes anything: P = T is already one chunk per sequence and
            # L >= T - 1 already full causal attention (docs/method.md); a larger value is a slip (a swapped P/L).
            T = self.data.seq_len
            if self.model.chunk_size > T:
                fail("model.chunk_size", self.model.chunk_size, f"<= data.seq_len ({T})",
                     "a chunk longer than the training sequence never ends inside it; lower model.chunk_size")
            if self.model.leading_tokens > T:
                fail("model.leading_tokens", self.model.leading_tokens, f"<= data.seq_len ({T})",
                     f"L = {T - 1} already means full causal attention over the sequence (model.pseudo_chunk=true is "
                     f"the paper's L = T ablation)")
        if self.eval.paper_metric and self.data.source == MQAR_SOURCE:
            fail("eval.paper_metric", True, f"false with data.source={MQAR_SOURCE}",
                 "the paper's metric scores text documents; an MQAR run logs val/recall")

    def to_dict(self) -> dict:
        return to_dict(self)

    def sequences_per_step(self, world_size: int) -> int:
        """Sequences in one optimizer step over all ranks (DeepSpeed's train_batch_size)."""
        return self.train.batch_size * self.train.grad_accum * world_size

    def tokens_per_step(self, world_size: int) -> int:
        """Tokens in one optimizer step over all ranks."""
        return self.sequences_per_step(world_size) * self.data.seq_len


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
            fail(name, value, "a list")
        inner = typing.get_args(hint)[0] if typing.get_args(hint) else typing.Any
        items = [_check_type(name, v, inner) for v in value]
        return tuple(items) if origin is tuple else items
    if hint is typing.Any:
        return value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            fail(name, value, f"a mapping of {hint.__name__} fields", f"indent its keys under {name}")
        return build(hint, value, f"{name}.")
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            fail(name, value, "a mapping of keys", f"indent its keys under {name}")
        return value
    if hint is bool:
        return boolean(name, value)
    if hint is int:
        return integer(name, value)
    if hint is float:
        if isinstance(value, str) and NUMBER_TEXT.fullmatch(value.strip()):
            value = float(value)   # "1e-3" (YAML 1.1 reads an exponent without a dot as text), quoted numbers
        return float(number(name, value))   # each section's checks refuse infinities where they do not belong
    if hint is str and not isinstance(value, str):
        fail(name, value, "a string")
    return value


def build(cls, data: dict | None, prefix: str = ""):
    """Instantiate dataclass `cls` from a dict, recursively; unknown keys are errors."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        where = prefix.rstrip(".") or "the top level"
        raise ValueError(f"unknown config key(s) {', '.join(prefix + str(k) for k in unknown)} in {where}; "
                         f"valid keys: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                fail(prefix + key, value, f"a mapping of {hint.__name__} fields")
            kwargs[key] = build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_type(prefix + key, value, hint)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        message = str(exc)
        # Field checks inside attamba.config name fields from their own section ("ssm.state_dim"); give them
        # their place in the file without repeating the part of the place they already name.
        if prefix and not message.startswith(prefix):
            parts = prefix.rstrip(".").split(".")
            named = next((i for i in range(len(parts)) if message.startswith(".".join(parts[i:]) + ".")), len(parts))
            message = "".join(f"{p}." for p in parts[:named]) + message
        raise ValueError(message) from None


def run_config_from_dict(data: dict) -> RunConfig:
    if not isinstance(data, dict):
        fail("run config", data, "a mapping of RunConfig fields")
    data = dict(data)
    size = one_of("size", data.get("size", RunConfig.size), PRESETS)
    model = data.get("model") or {}
    if not isinstance(model, dict):
        fail("model", model, "a mapping of ModelConfig fields")
    model = dict(model)
    preset = dataclasses.asdict(model_config(size))
    # The preset sets width and depth; explicit model keys win; derived sizes follow the preset's width.
    for key in ("dim", "n_layers", "n_heads"):
        model.setdefault(key, preset[key])
    data["model"] = model
    config = build(RunConfig, data)
    check_fits_in_memory(config)
    return config


def memory_bytes() -> int:
    """Physical memory of this machine, in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(config: RunConfig, available: int | None = None) -> None:
    """Refuse, before anything is allocated, a model whose float32 weights alone exceed this machine's memory.

    Every rank builds the whole model on its CPU before DeepSpeed shards or moves it, so the weights (4
    bytes a parameter, counted by attamba.costs) must fit in RAM; gradients and optimizer state need more.
    """
    from attamba import costs

    model = config.model
    # a BPE tokenizer trained here sets the model's vocabulary to data.vocab_size
    vocab, vocab_field = model.vocab_size, "model.vocab_size"
    if config.data.source == MQAR_SOURCE:   # so does data.mqar.vocab_size for the MQAR task
        vocab, vocab_field = config.data.mqar.vocab_size, "data.mqar.vocab_size"
    elif config.data.tokenizer == "bpe" and config.data.vocab_size > vocab:
        vocab, vocab_field = config.data.vocab_size, "data.vocab_size"
    params = costs.param_count(dataclasses.replace(model, vocab_size=vocab), non_embedding=False)
    available = memory_bytes() if available is None else available
    if 4 * params > available:
        raise ValueError(
            f"model.dim={model.dim}, model.n_layers={model.n_layers}, model.ffn_dim={model.ffn_dim}, "
            f"{vocab_field}={vocab} make a model of {params:.3g} parameters, {4 * params / 2**30:.3g} GiB of "
            f"float32 weights alone, more than this machine's {available / 2**30:.3g} GiB of memory; lower "
            f"model.dim or model.n_layers, or choose a smaller size")


RUN_HINT = "pass a YAML file from configs/"


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """A RunConfig from a YAML file (None: the defaults) plus `key.path=value` overrides."""
    return run_config_from_dict(load_yaml(path, overrides, kind="config", hint=RUN_HINT))


# ---- YAML files and overrides: the one loader of run, study and search files ---------------------------

def load_yaml(path: str | Path | None, overrides: list[str] | None = None, *, kind: str = "config",
              hint: str = "", includes: tuple[str, ...] = ()) -> dict:
    """The mapping in YAML file `path` (None: an empty one) with `key.path=value` overrides applied.

    Errors name the file as "{kind} file 'path'" and end with `hint` (where to find examples).
    `includes` are top-level keys whose value may be the path of another YAML file, relative to this one,
    read in its place (a study's base `run`): before the overrides, so `run.train.steps=8` reaches into
    it, and after them, so `run=other.yaml` works too.
    """
    data = {} if path is None else _read_mapping(Path(path), kind, hint)
    data = _read_includes(data, path, kind, includes)
    data = apply_overrides(data, overrides or [])
    return _read_includes(data, path, kind, includes)   # an override may name another file


def _read_includes(data: dict, path: str | Path | None, kind: str, includes: tuple[str, ...]) -> dict:
    for key in includes:
        name = data.get(key)
        if isinstance(name, str):
            where = Path(path).parent if path is not None else Path(".")
            hint = f"give a path relative to the {kind} file's folder {str(where)!r}"
            data = {**data, key: _read_mapping(where / name, key, hint)}   # an absolute name stays absolute
    return data


# YAML 1.2 decimal numbers as text (a quoted "1e-3" in a float field is read as the number)
NUMBER_TEXT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")   # decimal, no nan/inf
MAX_MESSAGE = 300   # characters of a YAML problem quoted in an error


def _parse(text: str):
    return yamlio.parse(text)


def _yaml_error(exc: yaml.YAMLError) -> str:
    """'line L, column C: problem' from a PyYAML error (1-based, the place the parser stopped)."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or _one_line(exc)
    context = getattr(exc, "context", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return _one_line(where + (f"{context}, {problem}" if context else problem))[:MAX_MESSAGE]


def _read_mapping(path: Path, kind: str, hint: str) -> dict:
    tail = f"; {hint}" if hint else ""
    try:
        text = yamlio.read_file(path)
    except ValueError as exc:
        raise ValueError(f"{kind} file {str(path)!r} {exc}{tail}") from None
    try:
        data = _parse(text)
    except yamlio.StrictYAMLError as exc:
        raise ValueError(f"{kind} file {str(path)!r} is refused at {_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{kind} file {str(path)!r} is not valid YAML at {_yaml_error(exc)}") from None
    if data is None:
        raise ValueError(f"{kind} file {str(path)!r} is empty (no keys, only comments or blank lines); write the "
                         f"settings that differ from the defaults{tail}")
    if not isinstance(data, dict):
        raise ValueError(f"{kind} file {str(path)!r} must hold a mapping of keys at the top level, got a "
                         f"{type(data).__name__}")
    return data


def _one_line(exc: Exception) -> str:
    return " ".join(str(exc).split())


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`a.b.c=value` strings; the value is parsed as YAML (so 8 is an int, 1e-3 a float, true a bool, [1,2] a
    list).
    Returns a new dict; the mappings on each override's path are copied, never changed in place."""
    data = dict(data)
    for item in overrides:
        path, eq, raw = item.partition("=")
        keys = path.strip().split(".")
        if not eq or not all(keys):
            raise ValueError(f"override {item!r} must look like key.path=value")
        try:
            value = _parse(raw) if raw != "" else ""
        except yamlio.StrictYAMLError as exc:
            raise ValueError(f"override {item!r}: the value is refused: {_yaml_error(exc)}") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: the value is not valid YAML: {_yaml_error(exc)}") from None
        node = data
        for depth, k in enumerate(keys[:-1]):
            child = node.get(k)
            if child is not None and not isinstance(child, dict):
                where = ".".join(keys[:depth + 1])
                raise ValueError(f"override {item!r}: {where} is {child!r}, not a mapping; override {where} "
                                 f"itself or fix the path")
            node[k] = dict(child or {})
            node = node[k]
        node[keys[-1]] = value
    return data


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
