"""The paper's claims (docs/method.md, section 6), recomputed from whichever runs a study holds.

Every claim compares runs A against runs B of the same model size and training-token budget by the
seed-paired percent difference in validation perplexity, 100 * (ppl_A / ppl_B - 1) (negative: A is
better), with its 95% Student-t interval across seeds (`compare.paired_pct`, `compare._t_interval`).
Each such comparison is an `Estimate`; a `Claim` holds one per size (and per Attamba variant where the
claim covers several) and an overall verdict.

Decision rule, per estimate:
- a *directional* claim ("A is worse than B", sign +1; "A is better", sign -1) is supported when the whole
  interval lies on the claimed side of 0, contradicted when it lies wholly on the other side, inconclusive
  when it spans 0;
- a *magnitude* claim ("A is about x% worse than B") has a tolerance band x +- max(MAGNITUDE_MIN_BAND_PP,
  MAGNITUDE_REL_BAND * |x|). It is supported when the interval overlaps the band and excludes 0 on x's
  side, contradicted when the interval misses the band, inconclusive otherwise (overlapping the band but
  spanning 0);
- one seed pair gives no interval: inconclusive, "one seed: no interval"; runs that share no seed (or
  repeat one) cannot be paired: inconclusive.
Overall: trained comparisons decide; comparisons through evaluation variants (trained weights evaluated
under another setting) decide only when the study has no trained one. Of those, the estimates at the
largest size (most non-embedding parameters, then most training tokens) give the verdict: supported or
contradicted when all of them say so, inconclusive otherwise; `sizes_agree` says whether the smaller
sizes gave the same verdict. A claim with no comparable runs is "not measured", with what is missing.

Which runs a claim reads: `kind` (schema.TAG_KIND; `attention` for runs without it) picks baselines, so an
iso-KV claim never reads an iso_flop run. The Attamba side of the comparisons with baselines is the
plain Attamba: cyclic boundaries, chunk segmentation and no other field changed (its `variant` is
exactly "attamba-P<P>-L<L>-cyclic"). Ablations (boundaries, L, segmentation) pair variants that differ
in that one field only. Evaluation variants are read from the metrics evalvar/<label>/ppl and their
overrides from the tags eval_variant.<label> (schema.py).
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report.compare import _t_interval, paired_pct
from pipeline.report.summary import md_table

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED = "supported", "contradicted", "inconclusive", "not measured"
DIRECTIONAL, MAGNITUDE = "directional", "magnitude"
MAGNITUDE_REL_BAND = 0.5        # a magnitude claim's band: half the paper's number either side ...
MAGNITUDE_MIN_BAND_PP = 2.0     # ... and at least 2 percentage points
TRAINED = "trained"
ONE_SEED = "one seed: no interval"
NOT_PAIRED = "runs share no seed (or repeat one): no paired interval"

RULE = {
    "difference": "100 * (ppl_A / ppl_B - 1) in validation perplexity, paired by seed, same size and "
                  "training tokens; negative: A is better",
    "interval": "95% Student-t interval over the seed pairs",
    DIRECTIONAL: "supported when the whole interval is on the claimed side of 0, contradicted when it is wholly "
                 "on the other side, inconclusive when it spans 0",
    MAGNITUDE: f"band = paper +- max({MAGNITUDE_MIN_BAND_PP:g} points, {MAGNITUDE_REL_BAND:g} x |paper|); "
               "supported when the interval overlaps the band and excludes 0 on the paper's side, contradicted "
               "when it misses the band, inconclusive otherwise",
    "one_seed": f"inconclusive ({ONE_SEED})",
    "overall": "trained comparisons decide (evaluation variants only when no trained one exists); the verdict "
               "at the largest size (non-embedding parameters, then training tokens): supported / contradicted "
               "when every estimate there agrees, else inconclusive; sizes_agree tells whether smaller sizes agree",
    NOT_MEASURED: "no pair of runs the claim needs; the reason names what is missing",
}


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


@dataclass
class Claim:
    id: str
    statement: str
    paper: str                      # the paper's number with its conditions
    paper_pct: float | None         # the paper's % difference (A vs B), None where it gives none
    rule: str                       # DIRECTIONAL | MAGNITUDE
    sign: int                       # +1: A claimed worse than B; -1: A claimed better
    estimates: list[Estimate] = field(default_factory=list)
    verdict: str = NOT_MEASURED
    reason: str = ""
    decided_by: str = ""            # the size (and token budget) the overall verdict comes from
    sizes_agree: bool | None = None

    def band(self) -> tuple[float, float] | None:
        if self.rule != MAGNITUDE or self.paper_pct is None:
            return None
        half = max(MAGNITUDE_MIN_BAND_PP, MAGNITUDE_REL_BAND * abs(self.paper_pct))
        return self.paper_pct - half, self.paper_pct + half


def _pct(a: float, b: float) -> float:
    return 100.0 * (a / b - 1.0)


def judge(lo: float, hi: float, n_pairs: int, paired: bool, rule: str, sign: int,
          band: tuple[float, float] | None = None) -> tuple[str, str]:
    """(verdict, reason) for one estimate's 95% interval [lo, hi] under the module's decision rule."""
    if rule not in (DIRECTIONAL, MAGNITUDE):
        raise ValueError(f"rule must be {DIRECTIONAL!r} or {MAGNITUDE!r}, got {rule!r}")
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 (A claimed worse) or -1 (A claimed better), got {sign!r}")
    if not paired:
        return INCONCLUSIVE, NOT_PAIRED
    if n_pairs < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return INCONCLUSIVE, ONE_SEED
    claimed = "> 0" if sign > 0 else "< 0"
    on_side = lo > 0 if sign > 0 else hi < 0
    off_side = hi < 0 if sign > 0 else lo > 0
    if rule == DIRECTIONAL:
        if on_side:
            return SUPPORTED, f"interval all {claimed}"
        if off_side:
            return CONTRADICTED, f"interval all on the other side of 0 (claimed {claimed})"
        return INCONCLUSIVE, "interval spans 0"
    if band is None:
        raise ValueError("band must be given for a magnitude claim: (low, high) around the paper's number")
    b_lo, b_hi = band
    if hi < b_lo or lo > b_hi:
        return CONTRADICTED, f"interval misses the band [{b_lo:.3g}, {b_hi:.3g}]"
    if on_side:
        return SUPPORTED, f"interval meets the band [{b_lo:.3g}, {b_hi:.3g}] and is all {claimed}"
    return INCONCLUSIVE, f"interval meets the band [{b_lo:.3g}, {b_hi:.3g}] but spans 0"


# ---------------------------------------------------------------- the run table, prepared once

def _column(df: pd.DataFrame, name: str, default) -> pd.Series:
    return df[name] if name in df else pd.Series(default, index=df.index, dtype=object if default == "" else float)


def _strings(s: pd.Series) -> pd.Series:
    return s.fillna("").astype(str)


def _core(P: float, L: float, boundaries: str) -> str:
    return f"attamba-P{P:g}-L{L:g}-{boundaries}"


def _rest(variant: str, kind: str, P: float, L: float, boundaries: str) -> str:
    """The variant label without its P, L, boundaries and segmentation: what else differs from the defaults.

    A label that does not start as expected stays whole, so it only ever pairs with itself."""
    if kind != "attamba" or not (math.isfinite(P) and math.isfinite(L)):
        return variant
    core = _core(P, L, boundaries)
    rest = variant[len(core):] if variant.startswith(core) else variant
    return re.sub(r"-seg_[a-z]+", "", rest)


def _prepare(ok: pd.DataFrame) -> pd.DataFrame:
    df = ok.copy()
    kind, attention = _strings(_column(df, schema.TAG_KIND, "")), _strings(_column(df, schema.TAG_ATTENTION, ""))
    df["_kind"] = kind.where(kind != "", attention)
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


def _closest(cands: pd.DataFrame, col: str, target: float) -> str:
    """The variant of `cands` whose mean `col` is closest to target on a log scale (else the shortest label)."""
    means = cands.groupby("_variant")[col].mean() if col in cands else pd.Series(dtype=float)
    means = means[np.isfinite(means) & (means > 0)]
    if len(means) and math.isfinite(target) and target > 0:
        return str((np.log(means) - math.log(target)).abs().idxmin())
    return min(cands["_variant"].unique(), key=lambda v: (len(v), v))


def _by_variant(df: pd.DataFrame):
    return df.groupby("_variant", sort=True)


# ---------------------------------------------------------------- what each claim compares

def _vs_baseline(df, attamba, kind, match_col, note_fn=None) -> tuple[list[Estimate], str]:
    """Each Attamba variant of `attamba` against the `kind` baseline of its cell closest in match_col."""
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
            ref = _closest(cands, match_col, _mean(a_cell, match_col)) if match_col else \
                min(cands["_variant"].unique(), key=lambda v: (len(v), v))
            e = _estimate(a_cell, cands[cands["_variant"] == ref], note=note_fn(a_cell) if note_fn else "")
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


def _eval_variants(df: pd.DataFrame) -> dict[str, dict[str, str]]:
    """label -> overrides, for every evaluation variant with a perplexity metric in the table."""
    out = {}
    for col in df.columns:
        if col.startswith(schema.M_EVAL_VARIANT_PREFIX) and col.endswith("/ppl"):
            label = col[len(schema.M_EVAL_VARIANT_PREFIX):-len("/ppl")]
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
    windows = [label for label, o in _eval_variants(df).items() if "window" in o]
    if not windows:
        return [], "no transformer evaluated with a sliding window (eval.variants: window=W)"
    out = []
    for _, a_cell in _cells(att):
        for kind in ("iso_kv", "full"):  # the paper's is the iso-KV transformer; the full one if none
            base = _same_cell(df[df["_kind"] == kind], a_cell)
            best = None
            for label in windows:
                ppl, kv = schema.eval_variant_metric(label, "ppl"), schema.eval_variant_metric(label, "kv_cache_bytes")
                for variant, runs in _by_variant(base):
                    if runs[ppl].notna().any():
                        dist = abs(math.log(_mean(runs, kv) / _mean(a_cell, schema.M_KV_BYTES))) \
                            if kv in runs and _mean(runs, kv) > 0 and _mean(a_cell, schema.M_KV_BYTES) > 0 else math.inf
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
    for label, o in _eval_variants(df).items():
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


def _p(a: float, b: float) -> float:
    return round(_pct(a, b), 2)


# id, statement (A vs B), paper, paper %, rule, sign, finder
CLAIMS = [
    ("attamba_vs_full_5pct", "Attamba (P=4) is about 5% worse than the transformer of the same size, for a ~4x smaller "
     "KV-cache", "21.74 vs 20.72: +4.9% (60M, 8B tokens, P=4, L=32)", _p(21.74, 20.72), MAGNITUDE, 1, full_gap_5pct),
    ("attamba_vs_full", "Attamba is worse than the transformer of the same size",
     "33.54 / 34.30 / 38.20 vs 29.40: +14.1% (P=4, L=8), +16.7% (P=8, L=8), +29.9% (P=16, L=16) (60M, 1B tokens)",
     None, DIRECTIONAL, 1, full_gap),
    ("attamba_vs_iso_kv", "Attamba beats the iso-KV transformer (trained at the KV-cache of the Attamba)",
     "33.54 vs 33.49 (+0.1%, P=4, L=8), 34.30 vs 36.74 (-6.6%, P=8, L=8), 38.20 vs 38.62 (-1.1%, P=16, L=16) "
     "(60M, 1B tokens)", None, DIRECTIONAL, -1, iso_kv_trained),
    ("attamba_vs_iso_kv_window", "Attamba (P=4) is about 24% better than the iso-KV transformer evaluated with a "
     "sliding window", "21.74 vs 28.66: -24.1% (60M, 8B tokens, P=4, L=32)", _p(21.74, 28.66), MAGNITUDE, -1,
     iso_kv_window),
    ("attamba_vs_iso_flop", "The iso-FLOP transformer beats Attamba at every P",
     "33.54 vs 32.67 (+2.7%, P=4), 34.30 vs 33.43 (+2.6%, P=8), 38.20 vs 35.06 (+9.0%, P=16) (60M, 1B tokens)",
     None, DIRECTIONAL, 1, iso_flop),
    ("cyclic_vs_uniform", "Cyclic boundaries beat uniform ones",
     "34.05 vs 36.52: -6.8% (60M, 1B tokens, P=8, L=8)", _p(34.05, 36.52), DIRECTIONAL, -1, boundaries_uniform),
    ("cyclic_vs_random", "Cyclic boundaries beat random ones",
     "34.05 vs 36.97: -7.9% (60M, 1B tokens, P=8, L=8)", _p(34.05, 36.97), DIRECTIONAL, -1, boundaries_random),
    ("larger_L_better", "A larger L (more leading tokens) gives a lower perplexity",
     "L=1 / 8 / 64 / 128: 37.25 / 34.05 / 32.31 / 31.38, each step -8.6% / -5.1% / -2.9% (60M, 1B tokens, P=8)",
     None, DIRECTIONAL, -1, leading_tokens),
    ("collapse_P64_L1", "Attamba with P >= 64 and L = 1 collapses to about twice the transformer's perplexity",
     "59-64 vs 29.40: +101% to +118% (60M, 1B tokens)", _p(61.5, 29.40), MAGNITUDE, 1, collapse),
    ("faithful_vs_released_segmentation", "The faithful chunk segmentation beats the released code's offset one",
     "paper: no number (the released code used offset)", None, DIRECTIONAL, -1, segmentation),
]


def _rank(df: pd.DataFrame):
    params = df.groupby("_size")[schema.M_PARAMS_NON_EMB].mean() if schema.M_PARAMS_NON_EMB in df else {}
    return lambda e: (float(params.get(e.size, -math.inf)) if len(params) else -math.inf,
                      e.train_tokens if e.train_tokens is not None else -1.0, e.size)


def _cell_name(e: Estimate) -> str:
    return e.size + (f" ({e.train_tokens:.3g} tokens)" if e.train_tokens is not None else "")


def _decide(claim: Claim, rank) -> None:
    for e in claim.estimates:
        e.verdict, e.reason = judge(e.lo, e.hi, e.n_pairs, e.paired, claim.rule, claim.sign, claim.band())
    trained = [e for e in claim.estimates if e.source == TRAINED]
    use = trained or claim.estimates
    top = max(rank(e)[:2] for e in use)
    at_top = [e for e in use if rank(e)[:2] == top]
    for e in at_top:
        e.decides = True
    verdicts = {e.verdict for e in at_top}
    claim.verdict = verdicts.pop() if len(verdicts) == 1 and not verdicts & {NOT_MEASURED} else INCONCLUSIVE
    claim.decided_by = _cell_name(at_top[0]) + ("" if trained else ", through evaluation variants")
    if len(at_top) == 1:
        claim.reason = at_top[0].reason
    else:
        counts = pd.Series([e.verdict for e in at_top]).value_counts()
        claim.reason = f"{len(at_top)} comparisons at this size: " + ", ".join(f"{n} {v}" for v, n in counts.items())
    smaller = [e for e in use if rank(e)[:2] != top]
    claim.sizes_agree = all(e.verdict == claim.verdict for e in smaller) if smaller else None


def evaluate_claims(ok: pd.DataFrame) -> list[Claim]:
    """One Claim per entry of CLAIMS, from the finished runs (load.RunTable.ok), each with its verdict."""
    df = _prepare(ok)
    rank = _rank(df)
    claims = []
    for cid, statement, paper, paper_pct, rule, sign, find in CLAIMS:
        claim = Claim(id=cid, statement=statement, paper=paper, paper_pct=paper_pct, rule=rule, sign=sign)
        if df.empty:
            estimates, why = [], "no finished runs"
        else:
            estimates, why = find(df)
        claim.estimates = sorted(estimates, key=lambda e: (rank(e), e.a, e.b, e.source))
        if claim.estimates:
            _decide(claim, rank)
        else:
            claim.reason = why
        claims.append(claim)
    return claims


# ---------------------------------------------------------------- tables and JSON

def _num(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}"


def _rule_text(c: Claim) -> str:
    if c.rule == MAGNITUDE:
        lo, hi = c.band()
        side = "> 0" if c.sign > 0 else "< 0"
        return f"magnitude: interval meets [{lo:.3g}, {hi:.3g}] and is all {side}"
    return f"directional: interval all {'> 0' if c.sign > 0 else '< 0'}"


def _estimate_text(e: Estimate) -> str:
    interval = f"[{_num(e.lo)}, {_num(e.hi)}]" if e.n_pairs >= 2 else "no interval"
    return f"{_num(e.pct)}% {interval}, {e.n_pairs} seed pairs: {e.a} vs {e.b}"


def claims_table(claims: list[Claim]) -> pd.DataFrame:
    """One row per claim: the paper's number, the deciding estimate(s), the verdict and why."""
    rows = []
    for c in claims:
        decided = [e for e in c.estimates if e.decides]
        rows.append({"claim": c.id, "statement": c.statement, "paper": c.paper, "rule": _rule_text(c),
                     "this study (largest size)": "; ".join(_estimate_text(e) for e in decided) or "n/a",
                     "size": c.decided_by or "n/a", "verdict": c.verdict, "why": c.reason,
                     "smaller sizes agree": {None: "n/a", True: "yes", False: "no"}[c.sizes_agree]})
    return pd.DataFrame(rows)


def estimates_table(claims: list[Claim]) -> pd.DataFrame:
    """Every comparison behind the claims, per size: % ppl difference, interval, pairs, parameters."""
    rows = [{"claim": c.id, "size": e.size, "A": e.a, "B": e.b, "source": e.source, "ppl A": _num(e.ppl_a),
             "ppl B": _num(e.ppl_b), "ppl diff %": _num(e.pct), "95% interval": f"[{_num(e.lo)}, {_num(e.hi)}]",
             "seed pairs": e.n_pairs, "params A": _num(e.params_a), "params B": _num(e.params_b),
             "KV bytes A": _num(e.kv_a), "KV bytes B": _num(e.kv_b), "note": e.note, "verdict": e.verdict,
             "why": e.reason} for c in claims for e in c.estimates]
    return pd.DataFrame(rows)


def claims_markdown(claims: list[Claim]) -> str:
    rule = "\n".join(f"- {k}: {v}" for k, v in RULE.items())
    return (f"Decision rule:\n\n{rule}\n\n{md_table(claims_table(claims))}\n"
            f"Estimates per size:\n\n{md_table(estimates_table(claims))}")


def _json_safe(v):
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_json_safe(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def claims_json(claims: list[Claim]) -> dict:
    """The content of claims.json: {"rule": RULE, "claims": [...]}, NaN written as null."""
    out = []
    for c in claims:
        d = asdict(c)
        d["band"] = list(c.band()) if c.band() else None
        out.append(d)
    return _json_safe({"rule": dict(RULE, magnitude_rel_band=MAGNITUDE_REL_BAND,
                                    magnitude_min_band_pp=MAGNITUDE_MIN_BAND_PP), "claims": out})
