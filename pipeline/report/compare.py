"""Trade-off tables from finished runs: gap to the transformer, iso-KV / iso-FLOP / iso-parameter
comparisons and recall against P (the Pareto points are pareto.py's). Percent differences are
100 * (ppl_variant / ppl_reference - 1): negative means the variant is better.

Runs are grouped by their `variant` tag (ModelConfig.variant()) and matched to references by their `kind`
(attamba | full | swa | iso_kv | iso_flop | iso_param; load.py gives runs logged before that tag existed
their `attention` tag). Intervals are 95% Student-t intervals over seed-paired differences; where the
seeds do not pair, Welch's interval on the difference of mean log perplexities. Each comparison has a
verdict: "better" / "worse" when its interval excludes zero, "inconclusive" when it spans zero, and
"one seed: no interval" when there is only one pair (or one run on a side, unpaired)."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from pipeline import schema

CONFIG_KEYS = ["variant", schema.TAG_SIZE, schema.M_TRAIN_TOKENS]
FULL = "full"
ISO_KV = "iso_kv"
ISO_FLOP = "iso_flop"
ISO_PARAM = "iso_param"
ATTAMBA = "attamba"
BETTER, WORSE, INCONCLUSIVE, ONE_SEED = "better", "worse", "inconclusive", "one seed: no interval"
PAIRED, WELCH = "paired by seed", "Welch (unpaired)"


def _with_keys(ok: pd.DataFrame) -> pd.DataFrame:
    df = ok.copy()
    if schema.M_TRAIN_TOKENS not in df:
        df[schema.M_TRAIN_TOKENS] = np.nan
    # groupby drops NaN keys; a sentinel keeps runs that never logged their token count.
    df[schema.M_TRAIN_TOKENS] = df[schema.M_TRAIN_TOKENS].fillna(-1.0)
    return df


def _t_interval(values: np.ndarray) -> tuple[float, float, float]:
    values = np.asarray(values, dtype=float)
    mean = float(values.mean()) if len(values) else np.nan
    if len(values) < 2:
        return mean, np.nan, np.nan
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values))
    return mean, float(mean - half), float(mean + half)


def _welch_pct(ppl: np.ndarray, ref_ppl: np.ndarray) -> tuple[float, float, float]:
    """% difference of geometric-mean perplexities with Welch's 95% interval on the mean log-ppl difference."""
    a, b = np.log(np.asarray(ppl, dtype=float)), np.log(np.asarray(ref_ppl, dtype=float))
    d = float(a.mean() - b.mean())
    pct = 100.0 * np.expm1(d)
    if min(len(a), len(b)) < 2:
        return pct, np.nan, np.nan
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return pct, pct, pct
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.975, dof) * np.sqrt(va + vb)
    return pct, float(100.0 * np.expm1(d - half)), float(100.0 * np.expm1(d + half))


def verdict(lo: float, hi: float) -> str:
    """"better" / "worse" when the interval of % differences excludes zero, else "inconclusive";
    no interval (NaN) means a single pair: "one seed: no interval"."""
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return ONE_SEED
    if hi < 0:
        return BETTER
    if lo > 0:
        return WORSE
    return INCONCLUSIVE


def paired_pct(runs: pd.DataFrame, ref: pd.DataFrame) -> tuple[np.ndarray, bool]:
    """% ppl differences, paired by seed where seeds match (True); otherwise (False) each run against the
    reference's mean perplexity, one value per run: an interval from those would ignore the reference's spread,
    so `pct_difference` uses Welch's interval for them (never every (run, reference) pair, which counts
    n_runs * n_refs pairs from n_runs + n_refs runs and makes the interval too narrow)."""
    a = runs.set_index(schema.TAG_SEED)[schema.M_VAL_PPL]
    b = ref.set_index(schema.TAG_SEED)[schema.M_VAL_PPL]
    common = a.index.intersection(b.index).dropna()
    if len(common) and a.index.is_unique and b.index.is_unique:
        return (100.0 * (a[common].to_numpy() / b[common].to_numpy() - 1.0)), True
    return 100.0 * (a.to_numpy() / b.to_numpy().mean() - 1.0), False


def pct_difference(runs: pd.DataFrame, ref: pd.DataFrame) -> dict:
    """% ppl difference of `runs` against `ref` with its 95% interval, method and verdict.

    Paired by seed where the seeds match (Student-t on the per-seed differences, n = the common seeds);
    otherwise Welch's t on the log perplexities. Keys: pct_mean, pct_lo, pct_hi, n_pairs (0 when unpaired),
    paired_by_seed, method, verdict, n_runs, n_ref_runs.
    """
    pct, paired = paired_pct(runs, ref)
    if paired:
        mean, lo, hi = _t_interval(pct)
    else:
        mean, lo, hi = _welch_pct(runs[schema.M_VAL_PPL].to_numpy(), ref[schema.M_VAL_PPL].to_numpy())
    return {"pct_mean": mean, "pct_lo": lo, "pct_hi": hi, "n_pairs": len(pct) if paired else 0,
            "paired_by_seed": paired, "method": PAIRED if paired else WELCH, "verdict": verdict(lo, hi),
            "n_runs": len(runs), "n_ref_runs": len(ref)}


def _mean(df: pd.DataFrame, col: str) -> float:
    return float(df[col].mean()) if col in df else np.nan


def _comparison_row(runs: pd.DataFrame, ref: pd.DataFrame) -> dict:
    row = pct_difference(runs, ref)
    params, ref_params = _mean(runs, schema.M_PARAMS_NON_EMB), _mean(ref, schema.M_PARAMS_NON_EMB)
    row.update({"ppl": float(runs[schema.M_VAL_PPL].mean()), "ref_ppl": float(ref[schema.M_VAL_PPL].mean()),
                "kv_bytes": _mean(runs, schema.M_KV_BYTES), "ref_kv_bytes": _mean(ref, schema.M_KV_BYTES),
                "attn_flops": _mean(runs, schema.M_ATTN_FLOPS_PER_TOKEN),
                "ref_attn_flops": _mean(ref, schema.M_ATTN_FLOPS_PER_TOKEN),
                "params": params, "ref_params": ref_params,
                "params_ratio": params / ref_params if ref_params else np.nan})
    return row


def gap_to_transformer(ok: pd.DataFrame) -> pd.DataFrame:
    """Every non-transformer variant against the `full` runs of the same size and token budget."""
    df = _with_keys(ok)
    rows = []
    full = df[df[schema.TAG_KIND] == FULL]
    for (variant, size, tokens), runs in df[df[schema.TAG_KIND] != FULL].groupby(CONFIG_KEYS, sort=True):
        ref = full[(full[schema.TAG_SIZE] == size) & (full[schema.M_TRAIN_TOKENS] == tokens)]
        if ref.empty or schema.M_VAL_PPL not in df:
            continue
        row = {"variant": variant, schema.TAG_SIZE: size, schema.M_TRAIN_TOKENS: tokens,
               "reference": ref["variant"].iloc[0]}
        row.update(_comparison_row(runs, ref))
        row["kv_ratio_ref_over_variant"] = row["ref_kv_bytes"] / row["kv_bytes"] if row["kv_bytes"] else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def matched_comparison(ok: pd.DataFrame, ref_kind: str, match_on: str) -> pd.DataFrame:
    """Each Attamba configuration against its `ref_kind` configuration of the same size and token budget: the
    one sized from it (the Attamba runs' schema.TAG_MATCH tag names its variant), else, for runs without the
    tag or a study without that baseline, the one whose mean `match_on` (a cost metric) is closest on a log
    scale: a 2x larger and a 2x smaller cost are equally far. `matched_on` says which. Only runs of exactly
    that kind are candidates (an iso_flop run is never an iso-KV reference)."""
    df = _with_keys(ok)
    if match_on not in df or schema.M_VAL_PPL not in df:
        return pd.DataFrame()
    rows = []
    cands_all = df[(df[schema.TAG_KIND] == ref_kind) & df[match_on].notna()]
    for (variant, size, tokens), runs in df[df[schema.TAG_KIND] == ATTAMBA].groupby(CONFIG_KEYS, sort=True):
        cands = cands_all[(cands_all[schema.TAG_SIZE] == size) & (cands_all[schema.M_TRAIN_TOKENS] == tokens)]
        if cands.empty or not np.isfinite(runs[match_on].mean()):
            continue
        best, matched_on = reference_variant(runs, cands, ref_kind, match_on)
        ref = cands[cands["variant"] == best]
        row = {"variant": variant, schema.TAG_SIZE: size, schema.M_TRAIN_TOKENS: tokens, "reference": best,
               "matched_on": matched_on}
        row.update(_comparison_row(runs, ref))
        rows.append(row)
    return pd.DataFrame(rows)


def reference_variant(runs: pd.DataFrame, cands: pd.DataFrame, ref_kind: str,
                      match_on: str | None) -> tuple[str, str]:
    """(variant, how it was chosen) of the `ref_kind` runs `cands` that the Attamba `runs` are compared with:
    the one sized from them (the single variant their schema.TAG_MATCH tag names), else the one whose mean
    `match_on` is closest on a log scale (a 2x larger and a 2x smaller cost are equally far), else, with no
    cost to tell them apart, the shortest label."""
    tag = schema.TAG_MATCH.get(ref_kind)
    named = set(runs[tag].dropna().astype(str)) - {""} if tag in runs else set()
    found = [v for v in cands["variant"].unique() if v in named]
    if len(found) == 1:
        return found[0], "sized from it"
    cost = float(runs[match_on].mean()) if match_on in runs else np.nan
    if match_on in cands and np.isfinite(cost) and cost > 0:
        dist = (np.log(cands.groupby("variant")[match_on].mean()) - np.log(cost)).abs()
        if dist.notna().any():
            return dist.idxmin(), f"closest {match_on}"
    return min(cands["variant"].unique(), key=lambda v: (len(v), v)), "no cost to match on: the shortest label"


def iso_kv_comparison(ok: pd.DataFrame) -> pd.DataFrame:
    """Each Attamba configuration against the `iso_kv` baseline sized from it (else the one of the same size with
    the closest KV bytes)."""
    return matched_comparison(ok, ISO_KV, schema.M_KV_BYTES)


def iso_flop_comparison(ok: pd.DataFrame) -> pd.DataFrame:
    """Each Attamba configuration against the `iso_flop` baseline sized from it (else the one of the same size
    with the closest attention FLOPs per token)."""
    return matched_comparison(ok, ISO_FLOP, schema.M_ATTN_FLOPS_PER_TOKEN)


def iso_param_comparison(ok: pd.DataFrame) -> pd.DataFrame:
    """Each Attamba configuration against the `iso_param` baseline of the same size with the closest
    non-embedding parameter count (empty where the study has no iso_param runs)."""
    return matched_comparison(ok, ISO_PARAM, schema.M_PARAMS_NON_EMB)


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
