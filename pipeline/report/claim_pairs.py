"""Which runs each of the paper's claims compares (claims.py holds the claims, the rule and the verdicts).

Every comparison is an `Estimate`: runs A against runs B of the same model size and training-token budget,
the seed-paired percent difference in validation perplexity 100 * (ppl_A / ppl_B - 1) and its 95%
Student-t interval (`compare.paired_pct`, `compare._t_interval`). Each finder below takes the prepared run
table and returns its estimates, or none and the reason (what is missing).

`kind` (schema.TAG_KIND; load.py gives runs without it their `attention`) picks baselines, so an iso-KV comparison never
reads an iso_flop run. The Attamba side of a comparison with a baseline is the plain Attamba: cyclic
boundaries, chunk segmentation and no other field changed (its variant is exactly "attamba-P<P>-L<L>-cyclic").
Ablations (boundaries, L, segmentation) pair variants that differ in that one field only. Evaluation
variants are read from the metrics evalvar/<label>/ppl, their overrides from the tags eval_variant.<label>.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report.compare import _t_interval, paired_pct, reference_variant
from pipeline.report.pareto import eval_variant_labels

TRAINED = "trained"


@dataclass
class Estimate:
    """One comparison: runs of variant `a` against runs of `b` (as `source`: trained, or evaluated as a label)."""

    size: str
    train_tokens: float | None
    a: str
    b: str
    source: str
    pct: float
    lo: float
    hi: float
    n_pairs: int
    paired: bool
    ppl_a: float
    ppl_b: float
    params_a: float
    params_b: float
    kv_a: float
    kv_b: float
    note: str = ""
    verdict: str = ""
    reason: str = ""
    decides: bool = False           # one of the estimates the claim's overall verdict comes from
    context_use: str = ""           # the context-use figure a context-dependent claim gated it on (context.py)


# ---------------------------------------------------------------- the run table, prepared once

def _column(df: pd.DataFrame, name: str, default) -> pd.Series:
    return df[name] if name in df else pd.Series(default, index=df.index, dtype=object if default == "" else float)


def _strings(s: pd.Series) -> pd.Series:
    return s.fillna("").astype(str)


def _rest(variant: str, kind: str, P: float, L: float, boundaries: str) -> str:
    """The variant label without its kind, P, L, boundaries and segmentation parts: whatever else differs
    from the defaults ("" for a plain Attamba). Read part by part, so the parts' order does not matter."""
    if kind != "attamba" or not (math.isfinite(P) and math.isfinite(L)):
        return variant
    known = {"attamba", f"P{P:g}", f"L{L:g}", boundaries}
    return "-".join(part for part in variant.split("-") if part not in known and not part.startswith("seg_"))


def prepare(ok: pd.DataFrame) -> pd.DataFrame:
    """The finished runs with the columns the finders read: _kind, _variant, _P, _L, _b (boundaries), _seg,
    _size, _tokens (-1 where unknown), _ppl, _rest (see _rest)."""
    df = ok.copy()
    df["_kind"] = _strings(_column(df, schema.TAG_KIND, ""))
    df["_variant"] = _strings(_column(df, "variant", ""))
    df["_P"] = pd.to_numeric(_column(df, schema.TAG_CHUNK, np.nan), errors="coerce")
    df["_L"] = pd.to_numeric(_column(df, schema.TAG_LEADING, np.nan), errors="coerce")
    df["_b"] = _strings(_column(df, schema.TAG_BOUNDARIES, ""))
    seg = _strings(_column(df, schema.TAG_SEGMENTATION, ""))
    # Runs from before the segmentation tag: the label names a non-default segmentation.
    guessed = np.where(df["_variant"].str.contains("-seg_offset", regex=False), "offset", "chunk")
    df["_seg"] = seg.where((seg != "") | (df["_kind"] != "attamba"), pd.Series(guessed, index=df.index))
    df["_size"] = _strings(_column(df, schema.TAG_SIZE, ""))
    df["_tokens"] = pd.to_numeric(_column(df, schema.M_TRAIN_TOKENS, np.nan), errors="coerce").fillna(-1.0)
    df["_ppl"] = pd.to_numeric(_column(df, schema.M_VAL_PPL, np.nan), errors="coerce")
    df["_rest"] = [_rest(v, k, P, L, b) for v, k, P, L, b in
                   zip(df["_variant"], df["_kind"], df["_P"], df["_L"], df["_b"])]
    if schema.TAG_SEED not in df:
        df[schema.TAG_SEED] = np.nan
    return df


def _mean(df: pd.DataFrame, col: str) -> float:
    return float(pd.to_numeric(df[col], errors="coerce").mean()) if col in df and len(df) else math.nan


def _estimate(a: pd.DataFrame, b: pd.DataFrame, *, b_label: str = "", b_ppl: str = "_ppl",
              b_kv: str = schema.M_KV_BYTES, source: str = TRAINED, note: str = "") -> Estimate | None:
    """A's runs against B's (B's perplexity read from column b_ppl: val/ppl, or an evaluation variant's)."""
    ra = pd.DataFrame({schema.TAG_SEED: a[schema.TAG_SEED], schema.M_VAL_PPL: a["_ppl"]}).dropna()
    rb = pd.DataFrame({schema.TAG_SEED: b[schema.TAG_SEED],
                       schema.M_VAL_PPL: pd.to_numeric(b[b_ppl], errors="coerce")}).dropna()
    if ra.empty or rb.empty:
        return None
    pct, paired = paired_pct(ra, rb)
    mean, lo, hi = _t_interval(pct) if paired else (float(np.mean(pct)), math.nan, math.nan)
    tokens = float(a["_tokens"].iloc[0])
    return Estimate(size=str(a["_size"].iloc[0]), train_tokens=tokens if tokens >= 0 else None,
                    a=str(a["_variant"].iloc[0]), b=b_label or str(b["_variant"].iloc[0]), source=source,
                    pct=mean, lo=lo, hi=hi, n_pairs=len(pct) if paired else 0, paired=paired,
                    ppl_a=float(ra[schema.M_VAL_PPL].mean()), ppl_b=float(rb[schema.M_VAL_PPL].mean()),
                    params_a=_mean(a, schema.M_PARAMS_NON_EMB), params_b=_mean(b, schema.M_PARAMS_NON_EMB),
                    kv_a=_mean(a, schema.M_KV_BYTES), kv_b=_mean(b, b_kv), note=note)


def _cells(df: pd.DataFrame):
    """(size, tokens) -> runs: comparisons stay inside one size and one token budget."""
    return df.groupby(["_size", "_tokens"], sort=True)


def _same_cell(pool: pd.DataFrame, a: pd.DataFrame) -> pd.DataFrame:
    return pool[(pool["_size"] == a["_size"].iloc[0]) & (pool["_tokens"] == a["_tokens"].iloc[0])]


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    return df[(df["_kind"] == "attamba") & (df["_b"] == "cyclic") & (df["_seg"] == "chunk") & (df["_rest"] == "")]


def _log_distance(x: float, y: float) -> float:
    """|log x - log y|: a 2x larger and a 2x smaller cost are equally far; inf where either is unknown."""
    return abs(math.log(x / y)) if x > 0 and y > 0 and math.isfinite(x / y) else math.inf


def _by_variant(df: pd.DataFrame):
    return df.groupby("_variant", sort=True)


# ---------------------------------------------------------------- what each claim compares

def _vs_baseline(df, attamba, kind, match_col, note_fn=None) -> tuple[list[Estimate], str]:
    """Each Attamba variant of `attamba` against the `kind` baseline of its cell that compare.reference_variant
    chooses: the one sized from it, else the closest in match_col."""
    base = df[df["_kind"] == kind]
    if attamba.empty:
        return [], "no plain Attamba run (cyclic boundaries, chunk segmentation)"
    if base.empty:
        return [], f"no run of kind {kind}"
    out = []
    for _, a in _by_variant(attamba):
        for _, a_cell in _cells(a):
            cands = _same_cell(base, a_cell)
            if cands.empty:
                continue
            ref, _ = reference_variant(a_cell, cands, kind, match_col)
            e = _estimate(a_cell, cands[cands["variant"] == ref], note=note_fn(a_cell) if note_fn else "")
            if e:
                out.append(e)
    return out, "" if out else f"no size holds both the Attamba runs and a {kind} run"


def _closest_L(attamba: pd.DataFrame, P: float, L: float) -> pd.DataFrame:
    """Per cell, the plain Attamba variant at chunk size P whose L is closest to the paper's (ties: larger L)."""
    at_p = attamba[attamba["_P"] == P]
    keep = []
    for _, cell in _cells(at_p):
        best = min(cell["_L"].unique(), key=lambda x: (abs(x - L), -x))
        keep.append(cell[cell["_L"] == best])
    return pd.concat(keep) if keep else at_p


def _l_note(L: float):
    return lambda a: "" if a["_L"].iloc[0] == L else f"L={a['_L'].iloc[0]:g} (paper: L={L:g})"


def full_gap_5pct(df):
    att = _closest_L(_plain(df), 4, 32)
    if att.empty:
        return [], "no plain Attamba run with P=4 (cyclic boundaries, chunk segmentation)"
    out, why = _vs_baseline(df, att, "full", None, _l_note(32))
    for e in out:
        e.note = "; ".join(x for x in (e.note, f"KV-cache {e.kv_b / e.kv_a:.3g}x smaller" if e.kv_a > 0 else "") if x)
    return out, why


def full_gap(df):
    return _vs_baseline(df, _plain(df), "full", None)


def iso_kv_trained(df):
    return _vs_baseline(df, _plain(df), "iso_kv", schema.M_KV_BYTES)


def iso_flop(df):
    return _vs_baseline(df, _plain(df), "iso_flop", schema.M_ATTN_FLOPS_PER_TOKEN)


def _overrides(text: str) -> dict[str, str]:
    """"window=33,attention=swa" -> {"window": "33", "attention": "swa"} ("model." prefixes dropped)."""
    pairs = [p.split("=", 1) for p in str(text).split(",") if "=" in p]
    return {k.strip().removeprefix("model."): v.strip() for k, v in pairs}


def eval_variant_overrides(df: pd.DataFrame) -> dict[str, dict[str, str]]:
    """label -> overrides, for every evaluation variant with a perplexity metric in the table."""
    out = {}
    for label in eval_variant_labels(df.columns):
        tags = _strings(_column(df, schema.TAG_EVAL_VARIANT_PREFIX + label, ""))
        text = next((t for t in tags if t), "")
        if text:
            out[label] = _overrides(text)
        else:  # no overrides tag: read the label (swa-W33, ...-W33, ...-random)
            m = re.search(r"(?:^|-)W(\d+)(?:-|$)", label)
            out[label] = {"window": m.group(1)} if m else ({"boundaries": "random"} if "-random" in label else {})
    return out


def iso_kv_window(df):
    att = _closest_L(_plain(df), 4, 32)
    if att.empty:
        return [], "no plain Attamba run with P=4 (cyclic boundaries, chunk segmentation)"
    windows = [label for label, o in eval_variant_overrides(df).items() if "window" in o]
    if not windows:
        return [], "no transformer evaluated with a sliding window (eval.variants: window=W)"
    out = []
    for _, a_cell in _cells(att):
        for kind in ("iso_kv", "full"):  # the paper's is the iso-KV transformer; the full one if none
            base = _same_cell(df[df["_kind"] == kind], a_cell)
            best = None
            # The windowed evaluation whose KV-cache is closest to the Attamba's (log scale).
            for label in windows:
                ppl, kv = schema.eval_variant_metric(label, "ppl"), schema.eval_variant_metric(label, "kv_cache_bytes")
                for variant, runs in _by_variant(base):
                    if runs[ppl].notna().any():
                        dist = _log_distance(_mean(runs, kv), _mean(a_cell, schema.M_KV_BYTES))
                        if best is None or dist < best[0]:
                            best = (dist, label, variant, runs)
            if best:
                _, label, variant, runs = best
                e = _estimate(a_cell, runs, b_label=f"{variant} evaluated as {label}",
                              b_ppl=schema.eval_variant_metric(label, "ppl"),
                              b_kv=schema.eval_variant_metric(label, "kv_cache_bytes"),
                              source=f"evaluated as {label}", note=_l_note(32)(a_cell))
                if e:
                    e.note = "; ".join(x for x in (e.note, "" if kind == "iso_kv" else
                                                   "no windowed iso-KV run: the full transformer's") if x)
                    out.append(e)
                break
    return out, "" if out else "no size holds both the Attamba runs and a windowed transformer evaluation"


def _ablation(df, attamba, field_col, a_value, b_value, what) -> tuple[list[Estimate], str]:
    """Attamba runs with field_col == a_value against the runs equal in everything else but b_value."""
    keys = ["_size", "_tokens", "_P", "_L", "_b", "_seg", "_rest"]
    other = [k for k in keys if k != field_col]
    a_runs, b_runs = attamba[attamba[field_col] == a_value], attamba[attamba[field_col] == b_value]
    out = []
    for key, a in a_runs.groupby(other, sort=True, dropna=False):
        b = b_runs
        for k, v in zip(other, key):
            b = b[b[k] == v]
        e = _estimate(a, b) if len(b) else None
        if e:
            out.append(e)
    return out, "" if out else f"no {what} pair of otherwise equal Attamba runs"


def boundaries_uniform(df):
    return _ablation(df, df[df["_kind"] == "attamba"], "_b", "cyclic", "uniform", "cyclic / uniform")


def boundaries_random(df):
    att = df[df["_kind"] == "attamba"]
    out, _ = _ablation(df, att, "_b", "cyclic", "random", "cyclic / random")
    cyclic = att[att["_b"] == "cyclic"]
    for label, o in eval_variant_overrides(df).items():
        if o.get("boundaries") != "random" or set(o) - {"boundaries", "boundary_seed"}:
            continue
        col = schema.eval_variant_metric(label, "ppl")
        for _, runs in _by_variant(cyclic[cyclic[col].notna()]):
            for _, cell in _cells(runs):
                e = _estimate(cell, cell, b_label=f"{cell['_variant'].iloc[0]} evaluated as {label}", b_ppl=col,
                              b_kv=schema.eval_variant_metric(label, "kv_cache_bytes"), source=f"evaluated as {label}",
                              note="the same weights, evaluated with random boundaries")
                if e:
                    out.append(e)
    return out, "" if out else "no cyclic / random pair (trained, or a cyclic run evaluated with boundaries=random)"


def leading_tokens(df):
    att = df[df["_kind"] == "attamba"]
    out = []
    keys = ["_size", "_tokens", "_P", "_b", "_seg", "_rest"]
    for _, group in att.groupby(keys, sort=True, dropna=False):
        Ls = sorted(group["_L"].dropna().unique())
        for small, large in zip(Ls, Ls[1:]):
            e = _estimate(group[group["_L"] == large], group[group["_L"] == small])
            if e:
                out.append(e)
    return out, "" if out else "no two Attamba variants that differ only in L"


def collapse(df):
    att = df[(df["_kind"] == "attamba") & (df["_P"] >= 64) & (df["_L"] == 1) & (df["_rest"] == "")]
    if att.empty:
        return [], "no Attamba run with P >= 64 and L = 1"
    out, why = _vs_baseline(df, att, "full", None)
    return out, why.replace("the Attamba runs", "the P >= 64, L = 1 Attamba runs")


def segmentation(df):
    return _ablation(df, df[df["_kind"] == "attamba"], "_seg", "chunk", "offset", "chunk / offset segmentation")
