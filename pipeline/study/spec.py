"""A study, declared: a ladder of sizes x attention variants x seeds x token budgets, expanded into runs.

`expand(study)` is a function of the study config alone (and of $ATTAMBA_HOME, under which a relative
out_dir lies) to a list of RunSpecs. Each run's name and output folder derive from its parameters, so
running a study again finds what already finished.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

from attamba import costs
from attamba.checks import at_least, boolean, fail, one_of, positive, safe_name, seed, text
from attamba.config import ATTAMBA_FIELDS, ModelConfig, variant_fields
from attamba.presets import PRESETS

from pipeline import schema
from pipeline.config import RunConfig, run_config_from_dict, run_config_with_model
from pipeline.loader import build, load_yaml, to_dict
from pipeline.runs.outputs import durable_path
from pipeline.runs.resources import Resources
from pipeline.study.grid import Grid, attamba_grids, baseline_grids, with_point

TOKEN_RULES = ("fixed", "per_param", "steps")


@dataclass(frozen=True)
class TokenBudget:
    rule: str = "fixed"            # fixed: `tokens` per run; per_param: `tokens_per_param` x parameters;
    tokens: int = 1_000_000        # steps: `steps` optimizer steps per run, whatever its tokens per step (a
    tokens_per_param: float = 20.0  # synthetic task such as MQAR, where steps and not text are the budget)
    steps: int | None = None
    budgets: tuple[float, ...] = (1.0,)   # multipliers: several token budgets per size for L(N, D) fits

    def __post_init__(self):
        one_of("tokens.rule", self.rule, TOKEN_RULES)
        at_least("tokens.tokens", self.tokens, 1, integer=True)
        positive("tokens.tokens_per_param", self.tokens_per_param, finite=True)
        if not self.budgets:
            fail("tokens.budgets", [], "a list of positive multipliers", "e.g. [1.0]")
        for i, b in enumerate(self.budgets):
            positive(f"tokens.budgets[{i}]", b, finite=True)
        if self.rule == "steps":
            if self.steps is None:
                fail("tokens.steps", None, "an integer >= 1 with tokens.rule=steps", "e.g. tokens: {rule: steps, "
                     "steps: 1500}")
            at_least("tokens.steps", self.steps, 1, integer=True)
        elif self.steps is not None:
            fail("tokens.steps", self.steps, f"left out with tokens.rule={self.rule}",
                 "set tokens.rule=steps, or remove tokens.steps")


@dataclass(frozen=True)
class StudyConfig:
    name: str = "study"
    sizes: tuple[str, ...] = ("tiny",)
    # training (and evaluation) sequence lengths T: each size runs at each T, as its own setting (the run's
    # data.seq_len, and model.max_seq_len where it is shorter); a mapping size -> lengths gives each size its own
    # (`{micro: [64], tiny: [64, 128]}`); empty: the run's data.seq_len only
    seq_lens: typing.Any = ()
    # model fields -> lists of values (pipeline/study/grid.py); unlisted fields come from the run's model
    attamba: typing.Any = field(default_factory=lambda: {"chunk_size": [8], "leading_tokens": [8],
                                                         "boundaries": ["cyclic"]})
    baselines: tuple[typing.Any, ...] = ("full",)
    seeds: tuple[int, ...] = (0,)
    tokens: TokenBudget = field(default_factory=TokenBudget)
    resources: Resources = field(default_factory=Resources)
    out_dir: str = "studies"
    report: bool = True
    address: str | None = None     # Ray cluster; None: --address, else $RAY_ADDRESS, else a local Ray
    run: dict = field(default_factory=dict)   # the base RunConfig, as in a `attamba train` YAML
    # the study's evaluation settings, over run.eval: e.g. `variants`, the attention settings every run's final
    # weights are also evaluated at (EvalConfig.variants; each applies to the kinds it fits). Full transformers
    # are also scored through windows of L + 1 keys (each Attamba L) and of schema.CONTEXT_WINDOW keys
    # (_with_context_windows)
    eval: dict = field(default_factory=dict)

    def __post_init__(self):
        safe_name("name", self.name, fix="it names the study's folder under out_dir and its MLflow experiment")
        text("out_dir", self.out_dir)
        boolean("report", self.report)
        if not self.sizes:
            fail("sizes", [], "a list of at least one size preset", f"choose from {', '.join(PRESETS)}")
        for size in self.sizes:
            one_of("sizes", size, PRESETS, what="size preset")
        self._check_seq_lens()
        if not isinstance(self.eval, dict):
            fail("eval", self.eval, "a mapping of evaluation settings (as a run's `eval:`)",
                 "e.g. eval: {variants: [{chunk_size: 16}, {window: 33}]}")
        lengths = {T for size in self.sizes for T in self.lengths(size) if T is not None}
        for grid in (g for grids in self.grids for g in grids):   # every grid entry checked before any model is built
            for j, T in enumerate(grid.seq_lens or ()):
                if T not in lengths:
                    fail(f"{grid.where}.seq_lens[{j}]", T, f"one of the study's seq_lens ({sorted(lengths) or 'none'})",
                         "add it to the study's `seq_lens` or remove it here")
        if not self.seeds:
            fail("seeds", [], "a list of at least one seed")
        for i, value in enumerate(self.seeds):
            seed(f"seeds[{i}]", value)
        if len(set(self.seeds)) != len(self.seeds):
            fail("seeds", list(self.seeds), "distinct")
        if self.address is not None and (not isinstance(self.address, str) or not self.address.strip()):
            fail("address", self.address, "a Ray address such as 'auto' or 'ray://host:10001', or null")

    @property
    def folder(self) -> Path:
        """The study's folder, out_dir/name: a relative out_dir under $ATTAMBA_HOME, else the working directory
        (runs/outputs.py)."""
        return durable_path(self.out_dir, "out_dir") / self.name

    def base_run(self, size: str, seq_len: int | None = None) -> dict:
        """The run config of every run at `size` (and sequence length `seq_len`, one of `seq_lens`) before its
        grid point: `run`, with the study's `eval` on top, checked and resolved (the size's preset applied:
        a bad field of `run` is named as such, not as a grid point's), as a mapping."""
        run = dict(self.run) if isinstance(self.run, dict) else {}
        out = {**run, "size": size, "eval": {**(run.get("eval") or {}), **self.eval}}
        if seq_len is not None:
            model = dict(run.get("model") or {})
            if model.get("max_seq_len") is not None and model["max_seq_len"] < seq_len:
                model["max_seq_len"] = seq_len
            elif model.get("max_seq_len") is None and seq_len > ModelConfig.max_seq_len:
                model["max_seq_len"] = seq_len
            out.update(data={**(run.get("data") or {}), "seq_len": seq_len}, model=model)
        resolved = run_config_from_dict(out)
        return to_dict(resolved)

    def _check_seq_lens(self) -> None:
        if isinstance(self.seq_lens, dict):
            for size, lengths in self.seq_lens.items():
                if size not in self.sizes:
                    fail(f"seq_lens.{size}", lengths, f"under one of the study's sizes ({', '.join(self.sizes)})",
                         "add the size to `sizes` or remove it here")
            missing = [size for size in self.sizes if size not in self.seq_lens]
            if missing:
                fail("seq_lens", dict(self.seq_lens), f"lengths for every size (missing: {', '.join(missing)})",
                     "give each size its lengths, or one list for all sizes")
            groups = {f"seq_lens.{size}": lengths for size, lengths in self.seq_lens.items()}
        elif isinstance(self.seq_lens, (list, tuple)):
            groups = {"seq_lens": self.seq_lens}
        else:
            fail("seq_lens", self.seq_lens, "a list of sequence lengths, or a mapping size -> list",
                 "e.g. seq_lens: [64, 128] or seq_lens: {micro: [64], tiny: [64, 128]}")
        for where, lengths in groups.items():
            if not isinstance(lengths, (list, tuple)) or (where != "seq_lens" and not lengths):
                fail(where, lengths, "a non-empty list of sequence lengths", "e.g. [64, 128]")
            for i, T in enumerate(lengths):
                at_least(f"{where}[{i}]", T, 2, integer=True)
            if len(set(lengths)) != len(lengths):
                fail(where, list(lengths), "distinct")
        object.__setattr__(self, "seq_lens", dict(self.seq_lens) if isinstance(self.seq_lens, dict)
                           else tuple(self.seq_lens))

    def lengths(self, size: str) -> tuple:
        """The sequence lengths `size` runs at: (None,) without seq_lens (the run's data.seq_len)."""
        lengths = self.seq_lens.get(size, ()) if isinstance(self.seq_lens, dict) else self.seq_lens
        return tuple(lengths) or (None,)

    def several_lengths(self) -> bool:
        return len({T for size in self.sizes for T in self.lengths(size)}) > 1

    def settings(self) -> list[tuple[str, int | None]]:
        """(size, sequence length) of each setting, sizes first: the sequence length is None without seq_lens."""
        return [(size, T) for size in self.sizes for T in self.lengths(size)]

    @functools.cached_property
    def grids(self) -> tuple[list[Grid], list[Grid]]:
        """(Attamba grids, baseline grids), read from `attamba` and `baselines` once (when the study is built)."""
        return attamba_grids(self.attamba, self.sizes), baseline_grids(self.baselines, self.sizes)


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

    @property
    def flops(self) -> float:
        """The run's training FLOPs: its tokens x the model's training FLOPs per token (attamba.costs)."""
        return float(self.tokens) * costs.training_flops_per_token(self.config.model, self.config.data.seq_len)


def load_study(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """StudyConfig from a YAML file plus `key.path=value` overrides; `run` may be the path of a run YAML,
    relative to the study file."""
    data = load_yaml(path, overrides, kind="study", hint="see configs/studies/ for examples", includes=("run",))
    return build(StudyConfig, data)


def _grid_runs(data: dict, grid: Grid, fixed: dict) -> list[RunConfig]:
    """One RunConfig per point of `grid` over the resolved run config `data` (as `to_dict` gives it: every
    point changes only its model); a bad value raises a ValueError naming its grid path."""
    model = with_point(data["model"], fixed)
    points = [(point, with_point(model, point)) for point in grid.points()]
    runs = []
    for point, point_model in points:
        try:
            runs.append(run_config_with_model(data, point_model))
        except ValueError as exc:
            raise _bad_point(data, model, grid, point, exc) from None
    return runs


def _bad_point(data: dict, model: dict, grid: Grid, point: dict, exc: ValueError) -> ValueError:
    """The error of a grid point whose model is refused: the value that fails on its own, if one does."""
    for name, values in grid.axes:
        for j, value in enumerate(values):
            try:
                run_config_with_model(data, with_point(model, {name: value}))
            except ValueError as alone:
                return ValueError(f"{grid.where}.{name}[{j}]={value!r} (in the grid point {point}): {alone}")
    return ValueError(f"{grid.where}: the combination {point} gives a bad model: {exc}")


def _iso_baseline(attamba: RunConfig, grid: Grid) -> list[RunConfig]:
    """The iso_kv / iso_flop baseline sized from one Attamba run, with the baseline grid's fields on top; the
    Attamba fields it ignores go back to their defaults, so two Attamba variants giving the same baseline
    give the same model."""
    solver = costs.iso_kv_config if grid.kind == "iso_kv" else costs.iso_flop_config
    iso = solver(attamba.model, attamba.data.seq_len)
    defaults = ModelConfig()
    iso = dataclasses.replace(iso, **{name: getattr(defaults, name) for name in ATTAMBA_FIELDS})
    return _grid_runs(to_dict(dataclasses.replace(attamba, model=iso)), grid, {})


def _models(study: StudyConfig) -> dict[tuple[str, int | None], list[RunConfig]]:
    """Per setting (size, sequence length: StudyConfig.settings), the resolved RunConfig of each model variant,
    each variant once: non-iso baselines in the order listed, then the Attamba grids, then the iso baselines
    sized per Attamba variant of that setting."""
    attamba, baselines = study.grids
    bases = {setting: study.base_run(*setting) for setting in study.settings()}
    # the SSM widths as the run file gives them (None: the default rule), so a grid's ssm.inner_dim re-derives heads
    ssm = ((study.run.get("model") or {}).get("ssm") or {}) if isinstance(study.run, dict) else {}
    widths = {"ssm.inner_dim": ssm.get("inner_dim"), "ssm.heads": ssm.get("heads")}
    found = {(size, T): [run for g in attamba if g.runs_at(size, T)
                         for run in _grid_runs(bases[size, T], g, {"attention": "attamba", "kv_dim": None,
                                                                   "iso": None, **widths})]
             for size, T in study.settings()}
    leading = [run.model.leading_tokens for runs in found.values() for run in runs]
    windows = sorted({L + 1 for L in leading} | {schema.CONTEXT_WINDOW})
    for grid in baselines:
        sources = [run.model for size, T in study.settings() if grid.runs_at(size) for run in found[size, T]]
        if grid.of and not any(grid.sized_from(model) for model in sources):
            fail(f"{grid.where}.of", {name: list(values) for name, values in grid.of},
                 "values that match at least one Attamba variant at this baseline's sizes",
                 "list values that the `attamba` grids run")
    out = {}
    for size, T in study.settings():
        runs = []
        for grid in baselines:
            if grid.runs_at(size, T) and grid.kind in ("full", "swa"):
                fixed = {"attention": grid.kind, "kv_dim": None, "iso": None}
                if grid.kind == "swa":
                    # the window that keeps as many keys as Attamba's largest window, unless the grid sets one
                    fixed["window"] = max(leading, default=ModelConfig.leading_tokens) + 1
                runs += _grid_runs(bases[size, T], grid, fixed)
        runs += found[size, T]
        for grid in baselines:
            if grid.runs_at(size, T) and grid.kind.startswith("iso_"):
                runs += [iso for run in found[size, T] if grid.sized_from(run.model)
                         for iso in _iso_baseline(run, grid)]
        seen = {}
        for run in runs:
            seen.setdefault(run.model.variant(), run)   # identical resolved models run once
        out[size, T] = [_with_context_windows(run, windows) for run in seen.values()]
    return out


def _with_context_windows(run: RunConfig, windows: list[int]) -> RunConfig:
    """A full transformer with an evaluation variant {window: W} for each W in `windows` (its loss through the
    last W keys: what the report's "Does context matter here?" reads), unless its eval.variants already has
    that window; a window of seq_len keys or more sees the whole context and is left out. Other runs as they are."""
    if run.model.attention != "full":
        return run
    have = {v["window"] for v in run.eval.variants if set(v) == {"window"}}
    extra = tuple({"window": w} for w in windows if w not in have and w < run.data.seq_len)
    if not extra:
        return run
    return dataclasses.replace(run, eval=dataclasses.replace(run.eval, variants=run.eval.variants + extra))


def _run_name(size: str, variant: str, seed: int, tokens: int, seq_len: int | None = None) -> str:
    """size__variant__s<seed>__D<tokens>, with __T<seq_len> after the size in a study with `seq_lens`
    (`variant`: the model's ModelConfig.variant())."""
    setting = size if seq_len is None else f"{size}__T{seq_len}"
    return f"{setting}__{variant}__s{seed}__D{tokens}"


BOUNDARY_ABBREVIATIONS = {"uniform": "uni", "cyclic": "cyc", "cyclic_released": "cycr", "random": "rnd"}
ISO_ABBREVIATIONS = {"iso_kv": "isokv", "iso_flop": "isoflop"}
DISPLAY_NAME_MAX = 32   # what the MLflow UI's run-name column shows in full


def _tokens_label(tokens: int) -> str:
    """3 significant digits with a unit: 1310720 -> '1.31M'."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if tokens >= scale:
            return f"{tokens / scale:.3g}{unit}"
    return str(tokens)


# Short forms for the display name: field -> prefix, value -> short value.
DISPLAY_FIELDS = {"boundaries": "", "ssm_segmentation": "seg", "kv_proj": "kvp", "ssm_residual": "res",
                  "pseudo_chunk": "pseudo", "tied_embeddings": "tied", "rope_theta": "rope", "boundary_seed": "bs",
                  "ssm.state_dim": "N"}
DISPLAY_VALUES = {**BOUNDARY_ABBREVIATIONS, "chunk": "chk", "offset": "off"}
CORE_DISPLAY = {"chunk_size": "P", "leading_tokens": "L", "window": "W", "kv_dim": "F"}


def _display_piece(name: str, value) -> str:
    prefix = DISPLAY_FIELDS.get(name, name.removeprefix("ssm.").replace("_", ""))
    if isinstance(value, bool):
        return prefix if value else f"no{prefix}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"{prefix}{DISPLAY_VALUES.get(value, value) if isinstance(value, str) else value}"


def _varying(models: list[tuple[str, list]]) -> dict[str, set[str]]:
    """Per kind, the identity fields whose values differ between that kind's models in the study (`models`:
    each model's kind and variant_fields)."""
    values: dict[str, dict[str, set]] = {}
    for kind, fields in models:   # a value at its reference (the default; SSM widths: their rule) is "default"
        for name, value, reference in fields:
            seen = "default" if value == reference else repr(value)
            values.setdefault(kind, {}).setdefault(name, set()).add(seen)
    out = {}
    for kind, fields in models:   # a field some models of a kind lack (boundary_seed) varies too
        names = {name for name, _, _ in fields}
        out.setdefault(kind, set()).update(n for n in values[kind] if n not in names)
    for kind, fields in values.items():
        out[kind] |= {name for name, seen in fields.items() if len(seen) > 1}
    return out


def _display_name(study: StudyConfig, kind: str, fields: list, varying: set[str], size: str, seed: int,
                  tokens: int, seq_len: int | None = None) -> str:
    """The run's MLflow run name: size, kind and its core (P and L, W, F) within a column's width, e.g.
    'tiny-P8-L32-s0', 'tiny-isoflop-F48-s0', 'tiny-full-s1', plus a short piece for every other field that
    varies between the study's models of that kind ('-cyc', '-segoff', '-kvp'), and the token count
    ('-D2.1M') only when the study has several budgets, and the sequence length ('tiny-T128-full-s0') when it has
    several. The run's name (`_run_name`, also its tag
    schema.TAG_TRIAL) stays the key of its folder and of resume. `fields`: the model's variant_fields."""
    parts = [] if kind == "attamba" else [ISO_ABBREVIATIONS.get(kind, kind.replace("_", ""))]
    parts += [f"{CORE_DISPLAY[n]}{v}" for n, v, _ in fields if n in CORE_DISPLAY]
    parts += [_display_piece(n, v) for n, v, _ in fields if n in varying and n not in CORE_DISPLAY]
    label = "-".join(parts)
    setting = f"{size}-T{seq_len}" if seq_len is not None and study.several_lengths() else size
    return f"{setting}-{label}-s{seed}" + (f"-D{_tokens_label(tokens)}" if len(study.tokens.budgets) > 1 else "")


def expand(study: StudyConfig) -> list[RunSpec]:
    """All runs of the study, in a stable order (sizes, then sequence lengths, then variants, then budgets,
    then seeds)."""
    models = _models(study)
    # each model's variant label and identity fields, once
    labels = {(size, T): [(run.model.variant(), variant_fields(run.model)) for run in runs]
              for (size, T), runs in models.items()}
    varying = _varying([(run.model.kind, fields) for setting, runs in models.items()
                        for run, (_, fields) in zip(runs, labels[setting])])
    folder, specs = study.folder, []
    for size, T in study.settings():
        for run, (variant, fields) in zip(models[size, T], labels[size, T]):
            tokens_per_step = run.tokens_per_step(study.resources.workers)
            for budget in study.tokens.budgets:
                if study.tokens.rule == "steps":
                    steps = max(1, math.ceil(study.tokens.steps * budget))
                else:
                    if study.tokens.rule == "fixed":
                        tokens = study.tokens.tokens * budget
                    else:
                        tokens = study.tokens.tokens_per_param * budget * costs.param_count(run.model)
                    steps = max(1, math.ceil(tokens / tokens_per_step))
                tokens = steps * tokens_per_step
                for run_seed in study.seeds:
                    name = _run_name(size, variant, run_seed, tokens, T)
                    data = to_dict(run)
                    data["name"] = name
                    data["model"]["seed"] = run_seed
                    data["train"].update(steps=steps, seed=run_seed,
                                         out_dir=str(folder / name),
                                         study=study.name, trial=name)  # the run's study and trial tags
                    data["tracking"]["experiment"] = study.name
                    data["tracking"]["run_name"] = _display_name(study, run.model.kind, fields,
                                                                 varying[run.model.kind], size, run_seed, tokens, T)
                    specs.append(RunSpec(name, size, variant, run_seed, tokens, run_config_from_dict(data)))
    names = [s.name for s in specs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"the study lists the same run more than once ({', '.join(repeated)}); remove the "
                         f"repeated entries from sizes or tokens.budgets")
    shown = [s.config.tracking.run_name for s in specs]
    alike = sorted({n for n in shown if shown.count(n) > 1})
    if alike:  # the names differ only past 3 significant digits of the token count
        raise ValueError(f"tokens.budgets={list(study.tokens.budgets)} gives runs whose token counts agree to 3 "
                         f"digits ({', '.join(alike)}); make the budgets differ by at least 1%")
    return specs
