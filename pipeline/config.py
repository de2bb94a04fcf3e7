"""The run configuration: one frozen dataclass per section under one root, from YAML plus overrides.

Defaults live in code; a YAML file in configs/ overrides them; `key.path=value` arguments override the
YAML (both read by `pipeline/loader.py`). Unknown keys and values of the wrong type are errors that name the
field and the fix, raised before any compute. The resolved config is written into every run's directory and
tracked.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from attamba.checks import at_least, boolean, fail, in_range, integer, one_of, positive, safe_name, seed, text
from attamba.config import ModelConfig
from attamba.presets import PRESETS, model_config
from attamba.variants import check_variant

from pipeline.data.prepare import MQAR_SOURCE, DataConfig
from pipeline.loader import build, load_yaml, to_dict
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


def run_config_from_dict(data: dict) -> RunConfig:
    if not isinstance(data, dict):
        fail("run config", data, "a mapping of RunConfig fields")
    data = dict(data)
    size = data.get("size", RunConfig.size)
    if not (isinstance(size, str) and size in PRESETS):
        one_of("size", size, PRESETS)
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


def run_config_with_model(data: dict, model: dict) -> RunConfig:
    """`data` (a run config's mapping, as `to_dict` gives it) with `model` as its model section, built."""
    return run_config_from_dict({**data, "model": model})


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
