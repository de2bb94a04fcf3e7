"""The paper's claims (docs/method.md, section 6), recomputed from whichever runs a study holds.

Every claim compares runs A against runs B of the same model size and training-token budget by the
seed-paired percent difference in validation perplexity, 100 * (ppl_A / ppl_B - 1) (negative: A is
better), with its 95% Student-t interval across seeds (`compare.paired_pct`, `compare._t_interval`).
Each such comparison is an `Estimate` (claim_pairs.py); a `Claim` holds one per size (and per Attamba variant where the
claim covers several) and an overall verdict.

Decision rule, per estimate:
- a *directional* claim ("A is worse than B", sign +1; "A is better", sign -1) is supported when the whole
  interval lies on the claimed side of 0, contradicted when it lies wholly on the other side, inconclusive
  when it spans 0;
- a *magnitude* claim ("A is about x% worse than B") has a tolerance band x +- max(MAGNITUDE_MIN_BAND_PP,
  MAGNITUDE_REL_BAND * |x|) (on one side of 0 for every claim here). It is supported when the whole
  interval lies inside the band (an equivalence test: every value the data allow is "about x"),
  contradicted when the interval misses the band, inconclusive when it reaches past an edge of the band
  (values in and out of it both fit the data);
- one seed pair gives no interval: inconclusive, "one seed: no interval"; runs that share no seed (or
  repeat one) cannot be paired: inconclusive.
Overall: trained comparisons decide; comparisons through evaluation variants (trained weights evaluated
under another setting) decide only when the study has no trained one. Of those, the estimates at the
largest size (most non-embedding parameters, then most training tokens) give the verdict: supported or
contradicted when all of them say so, inconclusive otherwise; `sizes_agree` says whether the smaller
sizes gave the same verdict. A claim with no comparable runs is "not measured", with what is missing.

Gated on the regime: a claim whose mechanism needs context beyond Attamba's window (`needs_context` in CLAIMS,
with one line of why) is testable only where this study's models use that context. Each of its estimates is
gated on the full transformer's context use (context.py: its loss through a window of W keys minus its loss
with the whole context, per seed, 95% Student-t interval) at the estimate's size and token budget: beyond L
(a window of L + 1 keys), L the smallest leading_tokens of the Attamba models the estimate compares, where the
study measured it, else beyond 40 keys (schema.CONTEXT_WINDOW). Where that context use is not shown (its
interval includes 0 or lies below it, or one seed) or not measured, the estimate's verdict is "untestable
here", its reason quoting the figure and what the interval alone said; a claim with an untestable estimate
among those that decide it is "untestable here", quoting the figure. Where the context use is shown, the
verdicts are the rule's above. Claims that do not need it are not gated.

Which runs each claim compares (claim_pairs.py): baselines by their kind tag, so an iso-KV claim never
reads an iso_flop run; the plain cyclic Attamba against baselines; ablations between variants that differ
in one field only; evaluation variants from evalvar/<label>/ppl and the tags eval_variant.<label>.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import pandas as pd

from pipeline import schema
from pipeline.report import fmt
from pipeline.report.claim_pairs import (TRAINED, Estimate, boundaries_random, boundaries_uniform, collapse,
                                         full_gap, full_gap_5pct, iso_flop, iso_kv_trained, iso_kv_window,
                                         leading_tokens, prepare, segmentation)
from pipeline.report.context import Gate, context_uses
from pipeline.report.summary import md_table

SUPPORTED, CONTRADICTED, INCONCLUSIVE, NOT_MEASURED = "supported", "contradicted", "inconclusive", "not measured"
UNTESTABLE = "untestable here"
DIRECTIONAL, MAGNITUDE = "directional", "magnitude"
MAGNITUDE_REL_BAND = 0.5        # a magnitude claim's band: half the paper's number either side ...
MAGNITUDE_MIN_BAND_PP = 2.0     # ... and at least 2 percentage points
ONE_SEED = "one seed: no interval"
NOT_PAIRED = "runs share no seed (or repeat one): no paired interval"

RULE = {
    "difference": "100 * (ppl_A / ppl_B - 1) in validation perplexity, paired by seed, same size and "
                  "training tokens; negative: A is better",
    "interval": "95% Student-t interval over the seed pairs",
    DIRECTIONAL: "supported when the whole interval is on the claimed side of 0, contradicted when it is wholly "
                 "on the other side, inconclusive when it spans 0",
    MAGNITUDE: f"band = paper +- max({MAGNITUDE_MIN_BAND_PP:g} points, {MAGNITUDE_REL_BAND:g} x |paper|); "
               "supported when the whole interval lies inside the band, contradicted when it misses the band, "
               "inconclusive when it reaches past an edge of the band",
    "one_seed": f"inconclusive ({ONE_SEED})",
    "overall": "trained comparisons decide (evaluation variants only when no trained one exists); the verdict "
               "at the largest size (non-embedding parameters, then training tokens): supported / contradicted "
               "when every estimate there agrees, else inconclusive; sizes_agree tells whether smaller sizes agree",
    NOT_MEASURED: "no pair of runs the claim needs; the reason names what is missing",
    "context": "a claim whose mechanism needs context beyond Attamba's window (needs_context, why in context_why) "
               "is gated, estimate by estimate, on the full transformer's context use at that size and token "
               "budget: its loss through a window of L + 1 keys (L: the smallest leading_tokens of the Attamba "
               f"models compared) minus its loss with the whole context, where measured, else through "
               f"{schema.CONTEXT_WINDOW} keys; mean over seeds with a 95% Student-t interval",
    UNTESTABLE: "the gating context use is not shown (its interval includes 0, lies below 0, or rests on one seed) "
                "or was not measured: nothing beyond that window is shown to matter, so the claim's mechanism is "
                "not shown to be exercised; the estimate's reason quotes the figure and what its interval alone said, and a "
                "claim with such an estimate among those that decide it is untestable here (context_use quotes "
                "the figure)",
}


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
    needs_context: bool = False     # its mechanism needs context beyond Attamba's window: gated (module docstring)
    context_why: str = ""           # why it does or does not
    context_use: str = ""           # the context-use figure that gated its verdict ("" where not gated)

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
    if b_lo <= lo and hi <= b_hi:
        return SUPPORTED, f"interval inside the band [{b_lo:.3g}, {b_hi:.3g}]"
    return INCONCLUSIVE, f"interval reaches past the band [{b_lo:.3g}, {b_hi:.3g}]: values in and out of it fit"



def _p(a: float, b: float) -> float:
    return round(_pct(a, b), 2)


# id, statement (A vs B), paper, paper %, rule, sign, finder, needs context beyond the window, why
NOT_GATED = ("a perplexity gap between two trained models is measured whatever context they use; where nothing "
             "beyond the window matters it is the cost of building K/V with SSMs (docs/method.md section 1), not of "
             "compressing the context: read it with the context use")
CLAIMS = [
    ("attamba_vs_full_5pct", "Attamba (P=4) is about 5% worse than the transformer of the same size, for a ~4x smaller "
     "KV-cache", "21.74 vs 20.72: +4.9% (60M, 8B tokens, P=4, L=32)", _p(21.74, 20.72), MAGNITUDE, 1, full_gap_5pct,
     False, NOT_GATED),
    ("attamba_vs_full", "Attamba is worse than the transformer of the same size",
     "33.54 / 34.30 / 38.20 vs 29.40: +14.1% (P=4, L=8), +16.7% (P=8, L=8), +29.9% (P=16, L=16) (60M, 1B tokens)",
     None, DIRECTIONAL, 1, full_gap, False, NOT_GATED),
    ("attamba_vs_iso_kv", "Attamba beats the iso-KV transformer (trained at the KV-cache of the Attamba)",
     "33.54 vs 33.49 (+0.1%, P=4, L=8), 34.30 vs 36.74 (-6.6%, P=8, L=8), 38.20 vs 38.62 (-1.1%, P=16, L=16) "
     "(60M, 1B tokens)", None, DIRECTIONAL, -1, iso_kv_trained, True,
     "the same KV-cache spent two ways (every token at a narrower width, or L + 1 tokens and chunk summaries): "
     "the two differ only in what they keep of the tokens beyond L"),
    ("attamba_vs_iso_kv_window", "Attamba (P=4) is about 24% better than the iso-KV transformer evaluated with a "
     "sliding window", "21.74 vs 28.66: -24.1% (60M, 8B tokens, P=4, L=32)", _p(21.74, 28.66), MAGNITUDE, -1,
     iso_kv_window, True,
     "Attamba's edge over a windowed transformer is the chunk summaries of the tokens beyond its window"),
    ("attamba_vs_iso_flop", "The iso-FLOP transformer beats Attamba at every P",
     "33.54 vs 32.67 (+2.7%, P=4), 34.30 vs 33.43 (+2.6%, P=8), 38.20 vs 35.06 (+9.0%, P=16) (60M, 1B tokens)",
     None, DIRECTIONAL, 1, iso_flop, True,
     "the same attention FLOPs spent on every token at a narrower width or on chunk summaries beyond L: the "
     "trade is about the tokens beyond L"),
    ("cyclic_vs_uniform", "Cyclic boundaries beat uniform ones",
     "34.05 vs 36.52: -6.8% (60M, 1B tokens, P=8, L=8)", _p(34.05, 36.52), DIRECTIONAL, -1, boundaries_uniform,
     True, "where chunks end changes only the summaries of the tokens beyond the window"),
    ("cyclic_vs_random", "Cyclic boundaries beat random ones",
     "34.05 vs 36.97: -7.9% (60M, 1B tokens, P=8, L=8)", _p(34.05, 36.97), DIRECTIONAL, -1, boundaries_random,
     True, "where chunks end changes only the summaries of the tokens beyond the window"),
    ("larger_L_better", "A larger L (more leading tokens) gives a lower perplexity",
     "L=1 / 8 / 64 / 128: 37.25 / 34.05 / 32.31 / 31.38, each step -8.6% / -5.1% / -2.9% (60M, 1B tokens, P=8)",
     None, DIRECTIONAL, -1, leading_tokens, True,
     "a larger L keeps exact the tokens beyond the smaller L: it helps only where those tokens matter"),
    ("collapse_P64_L1", "Attamba with P >= 64 and L = 1 collapses to about twice the transformer's perplexity",
     "59-64 vs 29.40: +101% to +118% (60M, 1B tokens)", _p(61.5, 29.40), MAGNITUDE, 1, collapse, True,
     "with L = 1 every earlier token reaches the query through chunk summaries and its own chunk's SSM state: "
     "it can collapse only where the tokens beyond its window matter"),
    ("faithful_vs_released_segmentation", "The faithful chunk segmentation beats the released code's offset one",
     "paper: no number (the released code used offset)", None, DIRECTIONAL, -1, segmentation, True,
     "the segmentations differ in which earlier tokens each key summarises (its chunk, or tokens P apart "
     "reaching before the window): that matters only where tokens beyond the window do"),
]


def _rank(df: pd.DataFrame):
    params = df.groupby("_size")[schema.M_PARAMS_NON_EMB].mean() if schema.M_PARAMS_NON_EMB in df else {}
    return lambda e: (float(params.get(e.size, -math.inf)) if len(params) else -math.inf,
                      e.train_tokens if e.train_tokens is not None else -1.0, e.size)


def _cell_name(e: Estimate) -> str:
    return e.size + (f" ({fmt.num(e.train_tokens)} tokens)" if e.train_tokens is not None else "")


def _gate(e: Estimate, gate: Gate, leading: dict[str, float]) -> None:
    """The estimate's verdict gated on the context use (module docstring): untestable here where not shown."""
    L = min((leading[v] for v in (e.a, e.b) if v in leading), default=None)
    use, text = gate.figure(e.size, e.train_tokens, L)
    if use is None:
        text += ": whether anything beyond the window matters is unknown"
    elif not use.shown:
        text += f": nothing beyond {use.beyond(L)} is shown to matter at this budget"
    e.context_use = text
    if use is None or not use.shown:
        e.reason = f"{text}; the interval alone: {e.verdict} ({e.reason})"
        e.verdict = UNTESTABLE


def _decide(claim: Claim, rank, gate: Gate | None = None, leading: dict[str, float] | None = None) -> None:
    for e in claim.estimates:
        e.verdict, e.reason = judge(e.lo, e.hi, e.n_pairs, e.paired, claim.rule, claim.sign, claim.band())
        if gate is not None:
            _gate(e, gate, leading or {})
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
    if gate is not None:
        untestable = [e for e in at_top if e.verdict == UNTESTABLE]
        claim.context_use = "; ".join(dict.fromkeys(e.context_use for e in at_top))
        if untestable:
            claim.verdict = UNTESTABLE
            claim.context_use = untestable[0].context_use
            claim.reason = claim.context_use + (f" ({len(untestable)} of {len(at_top)} comparisons at this size)"
                                                if len(at_top) > 1 else "")
    smaller = [e for e in use if rank(e)[:2] != top]
    claim.sizes_agree = all(e.verdict == claim.verdict for e in smaller) if smaller else None


def evaluate_claims(ok: pd.DataFrame) -> list[Claim]:
    """One Claim per entry of CLAIMS, from the finished runs (load.RunTable.ok), each with its verdict."""
    df = prepare(ok)
    rank = _rank(df)
    gate = Gate(context_uses(ok))
    att = df[(df["_kind"] == "attamba") & df["_L"].notna()] if len(df) else df
    leading = dict(zip(att["_variant"], att["_L"])) if len(df) else {}
    claims = []
    for cid, statement, paper, paper_pct, rule, sign, find, needs, why_context in CLAIMS:
        claim = Claim(id=cid, statement=statement, paper=paper, paper_pct=paper_pct, rule=rule, sign=sign,
                      needs_context=needs, context_why=why_context)
        if df.empty:
            estimates, why = [], "no finished runs"
        else:
            estimates, why = find(df)
        claim.estimates = sorted(estimates, key=lambda e: (rank(e), e.a, e.b, e.source))
        if claim.estimates:
            _decide(claim, rank, gate if needs else None, leading)
        else:
            claim.reason = why
        claims.append(claim)
    return claims


# ---------------------------------------------------------------- tables and JSON

def _num(v, sig: int = 3) -> str:
    return fmt.num(v, sig)


def _rule_text(c: Claim) -> str:
    if c.rule == MAGNITUDE:
        lo, hi = c.band()
        side = "> 0" if c.sign > 0 else "< 0"
        return f"magnitude: interval inside [{lo:.3g}, {hi:.3g}] (all {side})"
    return f"directional: interval all {'> 0' if c.sign > 0 else '< 0'}"


def _estimate_text(e: Estimate) -> str:
    text = fmt.pct(e.pct, e.lo, e.hi) if e.n_pairs >= 2 else f"{fmt.pct(e.pct)} no interval"
    return f"{text}, {e.n_pairs} seed pair{'' if e.n_pairs == 1 else 's'}: {e.a} vs {e.b}"


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
    rows = [{"claim": c.id, "size": e.size, "A": e.a, "B": e.b, "source": e.source, "ppl A": _num(e.ppl_a, 4),
             "ppl B": _num(e.ppl_b, 4), "ppl diff %": fmt.signed(e.pct), "95% interval": fmt.interval(e.lo, e.hi),
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
