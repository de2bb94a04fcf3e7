"""Trade-off tables from finished runs: per-configuration means, Pareto fronts, gap to the transformer,
iso-KV comparisons and recall against P. Percent differences are 100 * (ppl_variant / ppl_reference - 1):
negative means the variant is better. Intervals are 95% Student-t intervals across seeds."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from pipeline import schema
from pipeline.report.pareto import pareto_mask

CONFIG_KEYS = ["variant", schema.TAG_SIZE, schema.M_TRAIN_TOKENS]
FULL = "full"
ISO_KV = "iso_kv"
ATTAMBA = "attamba"


def _with_keys(ok: pd.DataFrame) -> pd.DataFrame:
    df = ok.copy()
    if schema.M_TRAIN_TOKENS not in df:
        df[schema.M_TRAIN_TOKENS] = np.nan
    # groupby drops NaN keys; a sentinel keeps runs that never logged their token count.
    df[schema.M_TRAIN_TOKENS] = df[schema.M_TRAIN_TOKENS].fillna(-1.0)
    return df


def config_table(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, size, tokens): mean val loss/ppl over seeds, their std, seed count and mean costs."""
    df = _with_keys(ok)
    cost_cols = [c for c in (schema.M_PARAMS_NON_EMB, schema.M_KV_BYTES, schema.M_ATTN_FLOPS_PER_TOKEN,
                             schema.M_TRAIN_FLOPS) if c in df]
    val_cols = [c for c in (schema.M_VAL_LOSS, schema.M_VAL_PPL) if c in df]
    g = df.groupby(CONFIG_KEYS, sort=True)
    out = g[val_cols + cost_cols].mean()
    for c in val_cols:
        out[c + " std"] = g[c].std()
    out["n_seeds"] = g.size()
    first = g[[schema.TAG_ATTENTION, schema.TAG_CHUNK, schema.TAG_LEADING]].first()
    return pd.concat([first, out], axis=1).reset_index()


def pareto_table(configs: pd.DataFrame, cost: str) -> pd.DataFrame:
    """Configurations on the front of (cost, val/ppl), both minimised, sorted by cost."""
    df = configs.dropna(subset=[cost, schema.M_VAL_PPL])
    front = df[pareto_mask(df[cost].to_numpy(), df[schema.M_VAL_PPL].to_numpy())]
    return front.sort_values(cost).reset_index(drop=True)


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else np.nan
    if len(values) < 2:
        return mean, np.nan, np.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def paired_pct(runs: pd.DataFrame, ref: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """% ppl differences, paired by seed where seeds match; otherwise every (run, reference) pair."""
    a = runs.set_index(schema.TAG_SEED)[schema.M_VAL_PPL]
    b = ref.set_index(schema.TAG_SEED)[schema.M_VAL_PPL]
    common = a.index.intersection(b.index).dropna()
    if len(common) and a.index.is_unique and b.index.is_unique:
        return (100.0 * (a[common].to_numpy() / b[common].to_numpy() - 1.0)), True
    return (100.0 * (a.to_numpy()[:, None] / b.to_numpy()[None, :] - 1.0)).ravel(), False


def _comparison_row(runs: pd.DataFrame, ref: pd.DataFrame) -> dict:
    pct, paired = paired_pct(runs, ref)
    mean, lo, hi = _t_interval(pct)
    return {"pct_mean": mean, "pct_lo": lo, "pct_hi": hi, "n_pairs": len(pct), "paired_by_seed": paired,
            "ppl": float(runs[schema.M_VAL_PPL].mean()), "ref_ppl": float(ref[schema.M_VAL_PPL].mean()),
            "kv_bytes": float(runs[schema.M_KV_BYTES].mean()) if schema.M_KV_BYTES in runs else np.nan,
            "ref_kv_bytes": float(ref[schema.M_KV_BYTES].mean()) if schema.M_KV_BYTES in ref else np.nan}


def gap_to_transformer(ok: pd.DataFrame) -> pd.DataFrame:
    """Every non-transformer variant against the `full` attention runs of the same size and token budget."""
    df = _with_keys(ok)
    rows = []
    full = df[df[schema.TAG_ATTENTION] == FULL]
    for (variant, size, tokens), runs in df[df[schema.TAG_ATTENTION] != FULL].groupby(CONFIG_KEYS, sort=True):
        ref = full[(full[schema.TAG_SIZE] == size) & (full[schema.M_TRAIN_TOKENS] == tokens)]
        if ref.empty or schema.M_VAL_PPL not in df:
            continue
        row = {"variant": variant, schema.TAG_SIZE: size, schema.M_TRAIN_TOKENS: tokens,
               "reference": ref["variant"].iloc[0]}
        row.update(_comparison_row(runs, ref))
        row["kv_ratio_ref_over_variant"] = row["ref_kv_bytes"] / row["kv_bytes"] if row["kv_bytes"] else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def iso_kv_comparison(ok: pd.DataFrame) -> pd.DataFrame:
    """Each Attamba configuration against the `iso_kv` baseline of the same size with the closest KV bytes."""
    df = _with_keys(ok)
    if schema.M_KV_BYTES not in df or schema.M_VAL_PPL not in df:
        return pd.DataFrame()
    rows = []
    iso = df[df[schema.TAG_ATTENTION] == ISO_KV]
    for (variant, size, tokens), runs in df[df[schema.TAG_ATTENTION] == ATTAMBA].groupby(CONFIG_KEYS, sort=True):
        cands = iso[(iso[schema.TAG_SIZE] == size) & (iso[schema.M_TRAIN_TOKENS] == tokens)]
        if cands.empty:
            continue
        kv = runs[schema.M_KV_BYTES].mean()
        cand_kv = cands.groupby("variant")[schema.M_KV_BYTES].mean()
        # Closest on a log scale: a 2x larger and a 2x smaller cache are equally far.
        best = (np.log(cand_kv) - np.log(kv)).abs().idxmin()
        ref = cands[cands["variant"] == best]
        row = {"variant": variant, schema.TAG_SIZE: size, schema.M_TRAIN_TOKENS: tokens, "reference": best}
        row.update(_comparison_row(runs, ref))
        rows.append(row)
    return pd.DataFrame(rows)


def recall_table(ok: pd.DataFrame) -> pd.DataFrame:
    """Long table of MQAR recall accuracy: one row per (variant, size, P, L, context T) with mean/std/n."""
    cols = [c for c in ok.columns if c.startswith(schema.M_MQAR_PREFIX)]
    if not cols:
        return pd.DataFrame()
    long = ok.melt(id_vars=["variant", schema.TAG_SIZE, schema.TAG_ATTENTION, schema.TAG_CHUNK, schema.TAG_LEADING],
                   value_vars=cols, var_name="metric", value_name="acc").dropna(subset=["acc"])
    long["context"] = pd.to_numeric(long["metric"].str.slice(len(schema.M_MQAR_PREFIX)), errors="coerce")
    g = long.groupby(["variant", schema.TAG_SIZE, schema.TAG_ATTENTION, schema.TAG_CHUNK, schema.TAG_LEADING,
                      "context"], dropna=False)["acc"]
    return g.agg(acc_mean="mean", acc_std="std", n="size").reset_index()
