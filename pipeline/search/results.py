"""What a search measures and what it hands back: objective and constraint values, the Pareto front of
the completed trials, and its export (pareto.csv, pareto.json, pareto.png).

Each distinct configuration is one point: a revisited one (an Optuna trial told as a `copy_of` an earlier
one, or any trial with equal params) is merged with its original, its values the mean over the merged
trials and `count` how many they are, so it is neither listed twice nor counted twice on the front.

pareto.json format (read by pipeline.report):
  {"study", "storage" (password redacted), "objectives": [metric names, all minimised],
   "context", "constraints": {name: bound}, "reference": {metric: value} | null, "n_complete",
   "n_distinct" (distinct configurations among the completed trials),
   "front": [{"number" (the original trial), "numbers" (every merged trial), "count",
              "params": {chunk_size, leading_tokens, boundaries[, state_dim]},
              "values": {metric: mean value}, "constraints": [mean values], "run_name", "mlflow_run_id"}, ...]}
pareto.csv has one row per front point: number, the params, one column per objective metric, count, run_name.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from attamba import costs
from attamba.config import ModelConfig

from pipeline import schema
from pipeline.search.space import SearchConfig
from pipeline.search.store import CONSTRAINTS_ATTR, COPY_OF_ATTR, REFERENCE_ATTR, RUN_NAME_ATTR, redact

MLFLOW_RUN_ATTR = "mlflow_run_id"


def cost_values(model: ModelConfig, context: int, precision: str = "fp32") -> dict[str, float]:
    """Analytic costs of one model at `context` tokens: KV-cache bytes and attention FLOPs per token."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    return {schema.M_KV_BYTES: float(costs.kv_cache_bytes(model, context, dtype)),
            schema.M_ATTN_FLOPS_PER_TOKEN: float(costs.attention_flops(model, context)["per_token"])}


def objective_values(search: SearchConfig, metrics: dict) -> list[float]:
    """The trial's objectives in the study's order; ValueError when training did not report one."""
    values = []
    for name in search.objectives.metrics:
        value = metrics.get(name)
        if value is None or not math.isfinite(float(value)):
            raise ValueError(f"trial result has no finite {name!r} (got {value!r}); training must report it")
        values.append(float(value))
    return values


def constraint_values(search: SearchConfig, metrics: dict, reference: dict | None) -> list[float]:
    """Optuna constraint values (<= 0 satisfied), in Constraints.names order, each relative to its bound."""
    c = search.constraints
    out = []
    if c.max_kv_cache_bytes is not None:
        out.append(metrics[schema.M_KV_BYTES] / c.max_kv_cache_bytes - 1.0)
    if c.max_ppl_gap is not None:
        if not reference or schema.M_VAL_PPL not in reference:
            raise ValueError("constraints.max_ppl_gap needs the reference transformer's val/ppl")
        out.append(metrics[schema.M_VAL_PPL] / reference[schema.M_VAL_PPL] - (1.0 + c.max_ppl_gap))
    return out


def non_dominated(values: np.ndarray) -> np.ndarray:
    """Rows not dominated by any other row when minimising every column. values: [n, k] -> bool [n].

    Written for clarity (O(n^2 k)): a search holds at most a few hundred trials."""
    values = np.asarray(values, dtype=float)
    keep = np.ones(len(values), dtype=bool)
    for i in range(len(values)):
        others = values
        dominated = np.all(others <= values[i], axis=1) & np.any(others < values[i], axis=1)
        keep[i] = not dominated.any()
    return keep


def feasible(trial) -> bool:
    return all(v <= 0 for v in trial.user_attrs.get(CONSTRAINTS_ATTR, []))


def _front(items: list, values, is_feasible) -> list:
    """The feasible items (constraints first, as Optuna's constrained samplers do) not dominated on
    values(item), sorted by the costs, then the quality."""
    ok = [i for i in items if is_feasible(i)]
    if not ok:
        return []
    mask = non_dominated(np.array([values(i) for i in ok]))
    return sorted((i for i, m in zip(ok, mask) if m), key=lambda i: list(values(i)[1:]) + list(values(i)[:1]))


def pareto_trials(trials: list) -> list:
    """Feasible completed trials on the front, trial by trial as Optuna's `study.best_trials` sees it; the
    export merges revisits first (pareto_points)."""
    return _front(trials, lambda t: t.values, feasible)


@dataclass
class Point:
    """One distinct configuration: its original trial and every completed trial merged into it."""

    trials: list   # the original (first trained, else lowest number) first

    @property
    def original(self):
        return self.trials[0]

    @property
    def params(self) -> dict:
        return dict(self.original.params)

    @property
    def values(self) -> list[float]:
        return np.mean([t.values for t in self.trials], axis=0).tolist()

    @property
    def constraints(self) -> list[float]:
        rows = [t.user_attrs.get(CONSTRAINTS_ATTR, []) for t in self.trials]
        return np.mean(rows, axis=0).tolist() if rows and all(len(r) == len(rows[0]) and r for r in rows) else []

    @property
    def feasible(self) -> bool:
        return all(v <= 0 for v in self.constraints)


def _key(params: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def distinct_points(trials: list) -> list[Point]:
    """Completed trials merged per configuration: a `copy_of` trial joins the trial it copies, and trials
    with equal params join each other. Ordered by the original's trial number."""
    by_number = {t.number: t for t in trials}
    groups: dict[tuple, list] = {}
    for t in sorted(trials, key=lambda t: t.number):
        source = by_number.get(t.user_attrs.get(COPY_OF_ATTR), t)
        groups.setdefault(_key(source.params), []).append(t)
    points = []
    for members in groups.values():
        # A copy never is the original: the trial that was trained is.
        members.sort(key=lambda t: (COPY_OF_ATTR in t.user_attrs, t.number))
        points.append(Point(members))
    return sorted(points, key=lambda p: p.original.number)


def pareto_points(points: list[Point]) -> list[Point]:
    """Feasible distinct configurations (distinct_points) on the front of their mean values, each once."""
    return _front(points, lambda p: p.values, lambda p: p.feasible)


def front_record(search: SearchConfig, study, trials: list, storage_url: str,
                 points: list[Point] | None = None) -> dict:
    """The pareto.json record; `points` are distinct_points(trials), when already merged."""
    metrics = search.objectives.metrics
    points = distinct_points(trials) if points is None else points
    front = pareto_points(points)
    return {
        "study": search.name,
        "storage": redact(storage_url),
        "objectives": metrics,
        "context": search.objectives.context,
        "constraints": {name: getattr(search.constraints, f"max_{name}") for name in search.constraints.names},
        "reference": study.user_attrs.get(REFERENCE_ATTR),
        "n_complete": len(trials),
        "n_distinct": len(points),
        "front": [{"number": p.original.number, "numbers": sorted(t.number for t in p.trials),
                   "count": len(p.trials), "params": p.params, "values": dict(zip(metrics, p.values)),
                   "constraints": p.constraints, "run_name": p.original.user_attrs.get(RUN_NAME_ATTR),
                   "mlflow_run_id": p.original.user_attrs.get(MLFLOW_RUN_ATTR)}
                  for p in front],
    }


def export_front(search: SearchConfig, study, trials: list, storage_url: str, folder: Path) -> dict:
    """Write pareto.json, pareto.csv and pareto.png into `folder`; returns the JSON record."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    points = distinct_points(trials)
    record = front_record(search, study, trials, storage_url, points)
    (folder / "pareto.json").write_text(json.dumps(record, indent=1))
    params = ["chunk_size", "leading_tokens", "boundaries"] + (["state_dim"] if search.space.state_dim else [])
    with open(folder / "pareto.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["number", *params, *record["objectives"], "count", "run_name"])
        for p in record["front"]:
            writer.writerow([p["number"], *(p["params"].get(k) for k in params),
                             *(p["values"][m] for m in record["objectives"]), p["count"], p["run_name"]])
    if trials:
        plot_front(search, trials, points, record, folder / "pareto.png")
    return record


def plot_front(search: SearchConfig, trials: list, points: list[Point], record: dict, path: Path) -> None:
    """Quality against each cost: every distinct configuration once (xN: merged from N trials), infeasible
    ones hollow, the front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = record["objectives"]
    front = {p["number"] for p in record["front"]}
    fig, axes = plt.subplots(1, len(metrics) - 1, figsize=(5.5 * (len(metrics) - 1), 4.2), squeeze=False)
    for ax, j in zip(axes[0], range(1, len(metrics))):
        for p in points:
            on, values = p.original.number in front, p.values
            ax.scatter(values[j], values[0], s=40 if on else 18,
                       c="C3" if on else ("C0" if p.feasible else "none"),
                       edgecolors="C3" if on else "C0", zorder=3 if on else 2)
            times = f" x{len(p.trials)}" if len(p.trials) > 1 else ""
            ax.annotate(f"P{p.params['chunk_size']} L{p.params['leading_tokens']}{times}", (values[j], values[0]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")
        pts = sorted((p["values"][metrics[j]], p["values"][metrics[0]]) for p in record["front"])
        if len(metrics) == 2 and pts:
            ax.step(*zip(*pts), where="post", color="C3", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"{metrics[j]} (context {search.objectives.context})")
        ax.set_ylabel(metrics[0])
        ax.grid(alpha=0.3)
    fig.suptitle(f"search {search.name}: {len(trials)} trials, {len(points)} distinct configurations, "
                 "Pareto front in red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
