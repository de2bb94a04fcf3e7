"""A P/L search, declared: the space, the objectives, the constraints and the base run, from one YAML.

`load_search(path, overrides)` validates everything before any trial: an empty range, a negative L, an
unknown objective or an unknown key is a ValueError naming the field and the fix. `suggest(trial, space)`
draws one point; `trial_run_config(search, params, number)` turns it into the RunConfig a trial trains.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

from attamba.checks import at_least, boolean, fail, one_of, safe_name, seed, text
from attamba.config import BOUNDARY_STRATEGIES

from pipeline import schema
from pipeline.config import RunConfig, run_config_from_dict
from pipeline.loader import build, load_yaml, to_dict
from pipeline.data.prepare import MQAR_SOURCE
from pipeline.runs.resources import Resources
from pipeline.runs.outputs import durable_path, durable_uri

SAMPLERS = ("nsga2", "tpe")
STORAGE_ENV = "ATTAMBA_OPTUNA_STORAGE"
DEFAULT_STORAGE = "sqlite:///optuna.db"

# objective name in the YAML -> tracked metric name (the column name in pareto.csv as well)
QUALITY_OBJECTIVES = {"val_ppl": schema.M_VAL_PPL, "val_bpb": schema.M_VAL_BPB, "val_loss": schema.M_VAL_LOSS}
COST_OBJECTIVES = {"kv_cache_bytes": schema.M_KV_BYTES, "attn_flops_per_token": schema.M_ATTN_FLOPS_PER_TOKEN}


@dataclass(frozen=True)
class IntParam:
    """An integer axis: a range `low..high` (optionally log-spaced, with a step) or a list of `choices`."""

    low: int | None = None
    high: int | None = None
    log: bool = False
    step: int = 1
    choices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Space:
    chunk_size: IntParam = field(default_factory=lambda: IntParam(low=2, high=32, log=True))
    leading_tokens: IntParam = field(default_factory=lambda: IntParam(choices=(0, 8, 32)))
    boundaries: tuple[str, ...] = ("cyclic",)
    state_dim: IntParam | None = None    # ssm.state_dim; None keeps the base run's

    def __post_init__(self):
        # `build` recurses into plain dataclass fields only; an optional one arrives as a mapping
        if isinstance(self.state_dim, dict):
            object.__setattr__(self, "state_dim", build(IntParam, self.state_dim, "space.state_dim."))


@dataclass(frozen=True)
class Objectives:
    quality: str = "val_ppl"                                  # val_ppl | val_bpb | val_loss (MQAR runs: val_loss)
    costs: tuple[str, ...] = ("kv_cache_bytes",)              # kv_cache_bytes and/or attn_flops_per_token
    context: int = 4096                                       # tokens at which the costs are computed

    def __post_init__(self):
        one_of("objectives.quality", self.quality, QUALITY_OBJECTIVES, what="objective")
        if not self.costs:
            fail("objectives.costs", [], "a list of at least one cost", f"choose from {', '.join(COST_OBJECTIVES)}")
        for cost in self.costs:
            one_of("objectives.costs", cost, COST_OBJECTIVES, what="objective")
        if len(set(self.costs)) != len(self.costs):
            fail("objectives.costs", list(self.costs), "distinct costs", "list each cost once")
        at_least("objectives.context", self.context, 1, integer=True, fix="the context is a number of tokens")

    @property
    def metrics(self) -> list[str]:
        """Tracked metric names of the objectives, quality first; all minimised."""
        return [QUALITY_OBJECTIVES[self.quality]] + [COST_OBJECTIVES[c] for c in self.costs]


@dataclass(frozen=True)
class Constraints:
    max_kv_cache_bytes: int | None = None     # KV-cache at objectives.context at most this
    max_ppl_gap: float | None = None          # ppl at most (1 + gap) x the same-size transformer's

    def __post_init__(self):
        at_least("constraints.max_kv_cache_bytes", self.max_kv_cache_bytes, 1, integer=True, or_none=True,
                 fix="a number of bytes, or null for no limit")
        at_least("constraints.max_ppl_gap", self.max_ppl_gap, 0, finite=True, or_none=True,
                 fix="0.1 = 10% above the transformer's perplexity, or null for no limit")

    @property
    def names(self) -> list[str]:
        out = ["kv_cache_bytes"] if self.max_kv_cache_bytes is not None else []
        return out + (["ppl_gap"] if self.max_ppl_gap is not None else [])


@dataclass(frozen=True)
class SearchConfig:
    name: str = "pl_search"                 # the Optuna study name and the MLflow experiment
    n_trials: int = 12                      # completed trials the study should hold
    sampler: str = "nsga2"                  # nsga2 | tpe
    population_size: int = 8                # NSGA-II generation size
    seed: int = 0
    storage: str | None = None              # None: $ATTAMBA_OPTUNA_STORAGE, else sqlite:///optuna.db
    out_dir: str = "searches"               # pareto.csv/json/png and trial runs under out_dir/name
    # A relative out_dir or SQLite path resolves under $ATTAMBA_HOME, else the working directory
    # (pipeline/runs/outputs.py); inside a Ray job it needs $ATTAMBA_HOME.
    max_failed_trials: int = 4              # stop after this many failed trainings in one invocation
    progress: bool = True
    address: str | None = None              # Ray cluster; None: --address, else $RAY_ADDRESS, else local
    space: Space = field(default_factory=Space)
    objectives: Objectives = field(default_factory=Objectives)
    constraints: Constraints = field(default_factory=Constraints)
    resources: Resources = field(default_factory=Resources)
    run: dict = field(default_factory=dict)   # the base RunConfig (fixed model size and token budget)

    def __post_init__(self):
        safe_name("name", self.name, fix="it names the search's folder under out_dir, its Optuna study and MLflow "
                  "experiment")
        text("out_dir", self.out_dir)
        boolean("progress", self.progress)
        at_least("n_trials", self.n_trials, 1, integer=True)
        one_of("sampler", self.sampler, SAMPLERS)
        at_least("population_size", self.population_size, 2, integer=True)
        at_least("max_failed_trials", self.max_failed_trials, 0, integer=True)
        seed("seed", self.seed)
        text("storage", self.storage, or_none=True, fix="a database URL such as sqlite:///optuna.db or "
             "postgresql+psycopg2://user:pw@host/optuna; remove it for $ATTAMBA_OPTUNA_STORAGE, else "
             "sqlite:///optuna.db")
        _check_int_param("space.chunk_size", self.space.chunk_size, minimum=1)
        _check_int_param("space.leading_tokens", self.space.leading_tokens, minimum=0)
        if self.space.state_dim is not None:
            _check_int_param("space.state_dim", self.space.state_dim, minimum=1)
        if not self.space.boundaries:
            fail("space.boundaries", [], f"a list of at least one of {', '.join(BOUNDARY_STRATEGIES)}")
        for b in self.space.boundaries:
            one_of("space.boundaries", b, BOUNDARY_STRATEGIES, what="strategy")

    def storage_url(self) -> str:
        field = "storage" if self.storage or not os.environ.get(STORAGE_ENV) else STORAGE_ENV
        return durable_uri(self.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE, field)

    @property
    def folder(self) -> Path:
        return durable_path(self.out_dir, "out_dir") / self.name


def _check_int_param(name: str, p: IntParam, minimum: int) -> None:
    if p.choices is not None:
        if p.low is not None or p.high is not None:
            raise ValueError(f"{name}: give either choices or low/high, not both")
        if not p.choices:
            fail(f"{name}.choices", [], "a list of at least one value")
        for v in p.choices:
            at_least(f"{name}.choices values", v, minimum, integer=True)
        return
    if p.low is None or p.high is None:
        raise ValueError(f"{name}: set both low and high (an integer range) or choices (a list)")
    at_least(f"{name}.low", p.low, minimum, integer=True)
    if p.low > p.high:
        raise ValueError(f"{name}: empty range, low ({p.low}) > high ({p.high}); swap them or widen the range")
    at_least(f"{name}.step", p.step, 1, integer=True)
    if p.log and p.step != 1:
        raise ValueError(f"{name}: log=true needs step=1 (Optuna's rule), got step={p.step}")
    if p.log and p.low < 1:
        raise ValueError(f"{name}: log=true needs low >= 1, got {p.low}; use choices to include 0")


def load_search(path: str | Path, overrides: list[str] | None = None) -> SearchConfig:
    """SearchConfig from a YAML file plus `key.path=value` overrides; the base run is validated too."""
    return search_from_dict(load_yaml(path, overrides, kind="search", hint="see configs/search/ for examples"))


def search_from_dict(data: dict) -> SearchConfig:
    search = build(SearchConfig, data)
    base = base_run_config(search)   # a bad base run fails here, before any trial
    if base.model.attention != "attamba":
        raise ValueError(f"run.model.attention must be attamba for a P/L search, got {base.model.attention!r}")
    if base.data.source == MQAR_SOURCE:   # a recall task logs no perplexity: its quality is the answers' loss
        if search.objectives.quality != "val_loss":
            fail("objectives.quality", search.objectives.quality, f"val_loss with run.data.source={MQAR_SOURCE}",
                 "an MQAR run logs the loss on its answers and val/recall, no perplexity or bits per byte")
        if search.constraints.max_ppl_gap is not None:
            fail("constraints.max_ppl_gap", search.constraints.max_ppl_gap,
                 f"null with run.data.source={MQAR_SOURCE}", "an MQAR run has no perplexity to compare")
    extreme_configs(search)   # every value of every axis, and the corners of the space, build a valid run
    return search


def base_run_config(search: SearchConfig) -> RunConfig:
    try:
        return run_config_from_dict(dict(search.run))
    except ValueError as exc:
        raise ValueError(f"run.{exc}") from None


def axis_values(p: IntParam) -> tuple[int, ...]:
    """The values of an integer axis a check builds: every choice, or a range's ends (the top one on the
    step grid: the largest value Optuna can draw)."""
    if p.choices is not None:
        return tuple(dict.fromkeys(p.choices))
    top = p.low + (p.high - p.low) // p.step * p.step
    return (p.low, top) if top != p.low else (p.low,)


def _axes(space: Space) -> dict[str, tuple[tuple[str, object], ...]]:
    """Per parameter, (its place in the file with its value, value) of every value a check builds."""
    def places(name: str, p: IntParam | None) -> tuple[tuple[str, object], ...]:
        if p is None:
            return ()
        if p.choices is not None:
            return tuple((f"space.{name}.choices[{list(p.choices).index(v)}]={v!r}", v) for v in axis_values(p))
        low, *top = axis_values(p)
        drawn = f" (drawn as {top[0]})" if top and top[0] != p.high else ""
        return ((f"space.{name}.low={low}", low),) + tuple((f"space.{name}.high={p.high}{drawn}", v) for v in top)

    axes = {"chunk_size": places("chunk_size", space.chunk_size),
            "leading_tokens": places("leading_tokens", space.leading_tokens),
            "boundaries": tuple((f"space.boundaries[{i}]={b!r}", b)
                                for i, b in enumerate(dict.fromkeys(space.boundaries)))}
    if space.state_dim is not None:
        axes["state_dim"] = places("state_dim", space.state_dim)
    return axes


def extreme_configs(search: SearchConfig) -> list[RunConfig]:
    """The trial run configs of every value of every axis (the other axes at their first value) and of every
    corner of the space (each integer axis at its smallest or largest value, each boundary strategy): a
    value that cannot be trained fails here, naming its place in the file, before any trial.
    Between the corners no other check can fail (the model checks are monotone in P, L and state_dim)."""
    axes = _axes(search.space)
    first = {name: values[0][1] for name, values in axes.items()}
    out = []
    for name, values in axes.items():
        for place, value in values:
            params = {**first, name: value}
            try:
                out.append(trial_run_config(search, params, 0))
            except ValueError as exc:
                raise ValueError(f"{place}: {exc}") from None
    ends = {name: sorted({v for _, v in values}, key=str) if name == "boundaries"
            else sorted({min(v for _, v in values), max(v for _, v in values)}) for name, values in axes.items()}
    names = list(ends)
    for combination in itertools.product(*(ends[n] for n in names)):
        params = dict(zip(names, combination))
        try:
            out.append(trial_run_config(search, params, 0))
        except ValueError as exc:
            raise ValueError(f"space: the corner {params} (smallest and largest values together) cannot be "
                             f"trained: {exc}") from None
    return out


def _suggest_int(trial, name: str, p: IntParam) -> int:
    if p.choices is not None:
        return trial.suggest_categorical(name, list(p.choices))
    return trial.suggest_int(name, p.low, p.high, step=p.step, log=p.log)


def param_names(space: Space) -> set[str]:
    """The parameters of one point of the space: what `suggest` draws."""
    return {"chunk_size", "leading_tokens", "boundaries"} | ({"state_dim"} if space.state_dim is not None else set())


def suggest(trial, space: Space) -> dict:
    """Draw one point of the space on an Optuna trial (ask/tell: the driver calls this right after ask)."""
    params = {"chunk_size": _suggest_int(trial, "chunk_size", space.chunk_size),
              "leading_tokens": _suggest_int(trial, "leading_tokens", space.leading_tokens),
              "boundaries": trial.suggest_categorical("boundaries", list(space.boundaries))}
    if space.state_dim is not None:
        params["state_dim"] = _suggest_int(trial, "state_dim", space.state_dim)
    return params


def trial_name(search: SearchConfig, number: int) -> str:
    return f"{search.name}-t{number:04d}"


def trial_run_config(search: SearchConfig, params: dict, number: int, run_name: str | None = None,
                     **tracking) -> RunConfig:
    """The RunConfig of trial `number`: the base run with P, L, boundaries (and state_dim) set, its own
    output folder and run name (`run_name`, e.g. a retry's original); `tracking` fields (e.g.
    parent_run_id) are set on its tracking section."""
    data = to_dict(base_run_config(search))
    data["model"].update(attention="attamba", chunk_size=params["chunk_size"],
                         leading_tokens=params["leading_tokens"], boundaries=params["boundaries"])
    if "state_dim" in params:
        data["model"]["ssm"]["state_dim"] = params["state_dim"]
    return _named(search, data, run_name or trial_name(search, number), tracking)


def reference_run_config(search: SearchConfig, **tracking) -> RunConfig:
    """The same-size transformer (full attention) that the ppl-gap constraint compares against."""
    data = to_dict(base_run_config(search))
    data["model"]["attention"] = "full"
    return _named(search, data, f"{search.name}-reference-full", tracking)


def _named(search: SearchConfig, data: dict, name: str, tracking: dict) -> RunConfig:
    data["name"] = name
    # absolute: Ray workers do not share the driver's working directory
    data["train"]["out_dir"] = str((search.folder / "trials" / name).resolve())
    data["train"].update(study=search.name, trial=name)   # tracked as the run's study and trial tags
    data["tracking"].update(experiment=search.name, run_name=name, **tracking)
    return run_config_from_dict(data)


def describe(search: SearchConfig) -> dict:
    return dataclasses.asdict(search)
