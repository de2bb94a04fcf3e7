"""A study, declared: a ladder of sizes x attention variants x seeds x token budgets, expanded into runs.

`expand(study)` is a pure function from the study config to a list of RunSpecs. Each run's name and
output folder derive from its parameters, so running a study again finds what already finished.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path

from attamba import costs
from attamba.checks import at_least, boolean, fail, integer, one_of, positive, safe_name, text
from attamba.presets import PRESETS

from pipeline.config import RunConfig, build, load_yaml, run_config_from_dict, to_dict
from pipeline.ray.cluster import Resources

BASELINES = ("full", "swa", "iso_kv", "iso_flop")
TOKEN_RULES = ("fixed", "per_param")


@dataclass(frozen=True)
class AttambaGrid:
    """Attamba variants: the product of these lists."""

    chunk_size: tuple[int, ...] = (8,)
    leading_tokens: tuple[int, ...] = (8,)
    boundaries: tuple[str, ...] = ("cyclic",)

    def __post_init__(self):
        for i, p in enumerate(self.chunk_size):
            integer(f"attamba.chunk_size[{i}]", p, 1)
        for i, n in enumerate(self.leading_tokens):
            integer(f"attamba.leading_tokens[{i}]", n, 0)


@dataclass(frozen=True)
class TokenBudget:
    rule: str = "fixed"            # fixed: `tokens` per run; per_param: `tokens_per_param` x parameters
    tokens: int = 1_000_000
    tokens_per_param: float = 20.0
    budgets: tuple[float, ...] = (1.0,)   # multipliers: several token budgets per size for L(N, D) fits

    def __post_init__(self):
        one_of("tokens.rule", self.rule, TOKEN_RULES)
        at_least("tokens.tokens", self.tokens, 1, integer=True)
        positive("tokens.tokens_per_param", self.tokens_per_param, finite=True)
        if not self.budgets:
            fail("tokens.budgets", [], "a list of positive multipliers", "e.g. [1.0]")
        for i, b in enumerate(self.budgets):
            positive(f"tokens.budgets[{i}]", b, finite=True)


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    sizes: tuple[str, ...] = ("tiny",)
    attamba: AttambaGrid = field(default_factory=AttambaGrid)
    baselines: tuple[str, ...] = ("full",)
    seeds: tuple[int, ...] = (0,)
    tokens: TokenBudget = field(default_factory=TokenBudget)
    resources: Resources = field(default_factory=Resources)
    out_dir: str = "studies"
    report: bool = True
    address: str | None = None     # Ray cluster; None: --address, else $RAY_ADDRESS, else a local Ray
    run: dict = field(default_factory=dict)   # the base RunConfig, as in a `attamba train` YAML

    def __post_init__(self):
        safe_name("name", self.name, fix="it names the study's folder under out_dir and its MLflow experiment")
        text("out_dir", self.out_dir)
        boolean("report", self.report)
        if not self.sizes:
            fail("sizes", [], "a list of at least one size preset", f"choose from {', '.join(PRESETS)}")
        for size in self.sizes:
            one_of("sizes", size, PRESETS, what="size preset")
        for b in self.baselines:
            one_of("baselines", b, BASELINES, what="baseline")
        if not self.seeds:
            fail("seeds", [], "a list of at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            fail("seeds", list(self.seeds), "distinct")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            fail("address", self.address, "a Ray address such as 'auto' or 'ray://host:10001', or null")


@dataclass(frozen=True)
class RunSpec:
    name: str                      # unique in the study, derived from the parameters
    size: str
    variant: str
    seed: int
    tokens: int
    config: RunConfig              # fully resolved: model, steps, output folder, tracking names

    @property
    def out_dir(self) -> Path:
        return Path(self.config.train.out_dir)


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """StudyConfig from a YAML file plus `key.path=value` overrides; `run` may be the path of a run YAML,
    relative to the study file."""
    return build(StudyConfig, load_yaml(path, overrides, kind="study", hint="see configs/studies/ for examples",
                                        includes=("run",)))


def _variants(study: StudyConfig) -> list[dict]:
    """Model overrides for each attention variant; iso baselines are sized per (size, Attamba variant)."""
    attamba = [{"attention": "attamba", "chunk_size": p, "leading_tokens": n, "boundaries": b}
               for p, n, b in itertools.product(study.attamba.chunk_size, study.attamba.leading_tokens,
                                                study.attamba.boundaries)]
    out = [{"attention": "full"}] if "full" in study.baselines else []
    if "swa" in study.baselines:
        # the window that keeps as many keys as Attamba's largest window, for a like-for-like local baseline
        out.append({"attention": "swa", "window": max(study.attamba.leading_tokens) + 1})
    out += attamba
    for kind in ("iso_kv", "iso_flop"):
        if kind in study.baselines:
            out += [{"attention": kind, "of": v} for v in attamba]
    return out


def _resolve_model(run: RunConfig, variant: dict) -> RunConfig:
    model = run.model
    if variant["attention"] in ("iso_kv", "iso_flop"):
        of = dataclasses.replace(model, **variant["of"])
        solver = costs.iso_kv_config if variant["attention"] == "iso_kv" else costs.iso_flop_config
        model = solver(of, run.data.seq_len)
    else:
        model = dataclasses.replace(model, **variant)
    return dataclasses.replace(run, model=model)


def _run_name(size: str, variant: dict, model_variant: str, seed: int, tokens: int) -> str:
    label = model_variant if variant["attention"] not in ("iso_kv", "iso_flop") else (
        f"{variant['attention']}-P{variant['of']['chunk_size']}-L{variant['of']['leading_tokens']}"
        f"-{variant['of']['boundaries']}")
    return f"{size}__{label}__s{seed}__D{tokens}"


BOUNDARY_ABBREVIATIONS = {"uniform": "uni", "cyclic": "cyc", "cyclic_released": "cycr", "random": "rnd"}
ISO_ABBREVIATIONS = {"iso_kv": "isokv", "iso_flop": "isoflop"}
DISPLAY_NAME_MAX = 32   # what the MLflow UI's run-name column shows in full


def _tokens_label(tokens: int) -> str:
    """3 significant digits with a unit: 1310720 -> '1.31M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return str(tokens)


def _display_name(study: StudyConfig, size: str, variant: dict, seed: int, tokens: int) -> str:
    """The run's MLflow run name: size, variant, P and L within a column's width, e.g. 'tiny-P8-L32-s0',
    'tiny-isokv-P8-L32-s0', 'tiny-full-s1'; the boundaries ('-cyc') only when the study has several, the
    token count ('-D2.1M') only when it has several budgets. The run's name (`_run_name`, also its tag
    schema.TAG_TRIAL) stays the key of its folder and of resume."""
    attention = variant["attention"]
    attamba = variant.get("of", variant)
    if attention in ("attamba", *ISO_ABBREVIATIONS):
        label = f"P{attamba['chunk_size']}-L{attamba['leading_tokens']}"
        if len(study.attamba.boundaries) > 1:
            label += f"-{BOUNDARY_ABBREVIATIONS.get(attamba['boundaries'], attamba['boundaries'])}"
        if attention in ISO_ABBREVIATIONS:
            label = f"{ISO_ABBREVIATIONS[attention]}-{label}"
    elif attention == "swa":
        label = f"swa-W{variant['window']}"
    else:
        label = attention
    return f"{size}-{label}-s{seed}" + (f"-D{_tokens_label(tokens)}" if len(study.tokens.budgets) > 1 else "")


def expand(study: StudyConfig) -> list[RunSpec]:
    """All runs of the study, in a stable order (sizes, then variants, then budgets, then seeds)."""
    specs = []
    for size in study.sizes:
        base = run_config_from_dict({**study.run, "size": size})
        for variant in _variants(study):
            run = _resolve_model(base, variant)
            tokens_per_step = run.tokens_per_step(study.resources.workers)
            for budget in study.tokens.budgets:
                if study.tokens.rule == "fixed":
                    tokens = study.tokens.tokens * budget
                else:
                    tokens = study.tokens.tokens_per_param * budget * costs.param_count(run.model)
                steps = max(1, math.ceil(tokens / tokens_per_step))
                for seed in study.seeds:
                    name = _run_name(size, variant, run.model.variant(), seed, steps * tokens_per_step)
                    data = to_dict(run)
                    data["name"] = name
                    data["model"]["seed"] = seed
                    data["train"].update(steps=steps, seed=seed,
                                         out_dir=str(Path(study.out_dir) / study.name / name),
                                         study=study.name, trial=name)  # the run's study and trial tags
                    data["tracking"]["experiment"] = study.name
                    data["tracking"]["run_name"] = _display_name(study, size, variant, seed, steps * tokens_per_step)
                    specs.append(RunSpec(name, size, run.model.variant() if "of" not in variant else
                                         name.split("__")[1], seed, steps * tokens_per_step,
                                         run_config_from_dict(data)))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"the study lists the same run more than once ({', '.join(repeated)}); remove the "
                         f"repeated entries from sizes, attamba or tokens.budgets")
    shown = [s.config.tracking.run_name for s in specs]
    alike = sorted({n for n in shown if shown.count(n) > 1})
    if alike:  # the names differ only past 3 significant digits of the token count
        raise ValueError(f"tokens.budgets={list(study.tokens.budgets)} gives runs whose token counts agree to 3 "
                         f"digits ({', '.join(alike)}); make the budgets differ by at least 1%")
    return specs
