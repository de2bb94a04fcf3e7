"""Pareto fronts for two costs to minimise (e.g. perplexity against KV-cache bytes), and the report's
points: each trained configuration, and each evaluation variant of it ("evaluated at" another attention
setting with the same weights), averaged over seeds."""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import schema


def pareto_mask_naive(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reference: point i is on the front unless some j is <= in both and < in one. x, y: [n] -> bool [n]."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-dominated points when minimising both x and y, O(n log n). x, y: [n] -> bool [n].

    Points equal in both coordinates are all kept (none strictly dominates the others).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    keep = np.zeros(len(x), dtype=bool)
    order = np.lexsort((y, x))            # by x, then y
    best_y = np.inf                       # smallest y among points with strictly smaller x
    i = 0
    while i < len(order):
        # Points sharing one x value: only those with the group's smallest y can survive, and only if
        # nothing with a smaller x reached that y or lower.
        j = i
        while j < len(order) and x[order[j]] == x[order[i]]:
            j += 1
        group = order[i:j]
        group_min = y[group].min()
        if group_min < best_y:
            keep[group[y[group] == group_min]] = True
        best_y = min(best_y, group_min)
        i = j
    return keep


# ---- the report's points: trained configurations and evaluation variants, averaged over seeds --------

TRAINED, EVALUATED = "trained", "evaluated"
POINT_KEYS = ["variant", "point", "trained_as", schema.TAG_SIZE, schema.M_TRAIN_TOKENS]
# A point's values: (run metric for a trained point, evaluation-variant metric name for an evaluated one).
POINT_VALUES = {schema.M_VAL_LOSS: "loss", schema.M_VAL_PPL: "ppl", schema.M_KV_BYTES: "kv_cache_bytes",
                schema.M_ATTN_FLOPS_PER_TOKEN: "attn_flops_per_token"}


def eval_variant_labels(columns) -> list[str]:
    """Labels of the evaluation variants that logged a perplexity: 'evalvar/<label>/ppl' -> label."""
    prefix, suffix = schema.M_EVAL_VARIANT_PREFIX, "/" + "ppl"
    return sorted({c[len(prefix):-len(suffix)] for c in columns if c.startswith(prefix) and c.endswith(suffix)})


def point_rows(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per run and point: the run as trained (point=trained), and once per evaluation variant it
    logged (point=evaluated, variant=the label it was evaluated as, trained_as=the run's variant). An
    evaluated point has the run's weights, so its parameter count and training tokens are the run's."""
    def col(name):
        return ok[name] if name in ok else pd.Series(np.nan, index=ok.index)

    base = {"trained_as": ok["variant"], schema.TAG_SIZE: ok[schema.TAG_SIZE],
            # groupby drops NaN keys; -1 keeps runs that never logged their token count.
            schema.M_TRAIN_TOKENS: col(schema.M_TRAIN_TOKENS).fillna(-1.0),
            schema.TAG_SEED: col(schema.TAG_SEED), "run_id": ok["run_id"],
            schema.M_PARAMS_NON_EMB: col(schema.M_PARAMS_NON_EMB)}
    frames = [pd.DataFrame({"variant": ok["variant"], "point": TRAINED, **base,
                            **{m: col(m) for m in POINT_VALUES}})]
    for label in eval_variant_labels(ok.columns):
        values = {m: col(schema.eval_variant_metric(label, name)) for m, name in POINT_VALUES.items()}
        frame = pd.DataFrame({"variant": label, "point": EVALUATED, **base, **values})
        frames.append(frame[frame[schema.M_VAL_PPL].notna()])
    return pd.concat(frames, ignore_index=True)


def pareto_points(ok: pd.DataFrame) -> pd.DataFrame:
    """Trained and evaluated points averaged over seeds: one row per (variant, point, trained_as, size,
    tokens) with the mean of each value, the std of val/ppl and the number of seeds (runs)."""
    rows = point_rows(ok)
    g = rows.groupby(POINT_KEYS, sort=True)
    out = g[[schema.M_PARAMS_NON_EMB, *POINT_VALUES]].mean()
    out[schema.M_VAL_PPL + " std"] = g[schema.M_VAL_PPL].std()
    out["n_seeds"] = g.size()
    return out.reset_index()


def pareto_front(points: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Points (trained and evaluated together) on the front of (cost, val/ppl), both minimised, by cost."""
    df = points.dropna(subset=[cost, schema.M_VAL_PPL])
    return df[pareto_mask(df[cost].to_numpy(), df[schema.M_VAL_PPL].to_numpy())].sort_values(
        [cost, schema.M_VAL_PPL], kind="stable").reset_index(drop=True)
