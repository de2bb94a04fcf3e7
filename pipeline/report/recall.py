"""Recall, trained: how much of Zoology's multi-query associative recall (data.source: mqar) each model keeps,
against the KV-cache it spends, and how far back; and the claim "Attamba keeps recall that the window and
iso-KV lose".

Read from the final evaluation of every run trained on MQAR (pipeline/eval/mqar.py), which scores the whole
fixed validation set: val/recall (the fraction of queries answered right) and val/recall_d<lo>-<hi> (the
queries lo..hi tokens after their key); a full transformer's evaluation variants through a window of W keys
add evalvar/swa-W<W>/recall and its distances (evaluated points: the same weights, another attention).

- A point: one variant at one setting (the size, "<size> T=<seq_len>" in a study over several lengths,
  load.fold_seq_len), as trained or as evaluated: recall as the mean over seeds with a 95% Student-t
  interval (compare._t_interval), the KV-cache bytes at the evaluation context (cost/kv_cache_bytes, or the
  variant's evalvar/<label>/kv_cache_bytes), the chance level 1 / pairs (a model that knows which tokens are
  values but not which value belongs to which key: Zoology's layout gives no better guess).
- The claim (`recall_claim`): each Attamba against the sliding window that sees what its window sees
  (L + 1 keys, the query included: a trained swa run, else the full transformer evaluated through that window)
  and against the iso-KV transformer sized from it (its iso_kv_match tag), paired by seed. The difference is
  in recall error, percentage points, A minus B: 100 * (recall_B - recall_A), negative when Attamba recalls
  more; claims.judge decides each (directional, claimed < 0). Gate: a setting where the full transformer does
  not recall (mean recall below SOLVED) has nothing for Attamba to keep: its estimates are "untestable here",
  naming the transformer's recall. Overall: supported (or contradicted) when every testable estimate says so,
  inconclusive otherwise, untestable here when no estimate is testable, not measured when no Attamba has a
  window or iso-KV run to compare with.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipeline import schema
from pipeline.report import fmt
from pipeline.report.claim_pairs import Estimate
from pipeline.report.claims import (CONTRADICTED, DIRECTIONAL, INCONCLUSIVE, NOT_MEASURED, SUPPORTED, UNTESTABLE,
                                    Claim, judge)
from pipeline.report.compare import _t_interval
from pipeline.report.figures import to_png
from pipeline.report.plotting import log_ticks, mark, place_labels, variant_colours

SOLVED = 0.9                      # the full transformer's mean recall at which a setting tests the claim
PAIRS = "data.mqar.pairs"         # the config param that sets the chance level
TRAINED, EVALUATED = "trained", "evaluated"
DISTANCE = re.compile(rf"{re.escape(schema.RECALL_DISTANCE)}(\d+)-(\d+)$")
TITLE = "Recall (MQAR, trained): recall against KV-cache bytes (mean over seeds, 95% interval)"
DISTANCE_TITLE = "Recall (MQAR, trained): recall by key-query distance (mean over seeds)"
CLAIM_TITLE = "Recall (MQAR, trained): each Attamba against the window and the iso-KV transformer, paired by seed"
CLAIM_ID = "attamba_keeps_recall"
STATEMENT = "Attamba keeps recall that the sliding window at its L and the iso-KV transformer lose"
PAPER = ("no recall number in the paper; its premise: chunk summaries keep what a window drops, at the KV-cache "
         "of a narrower transformer")
MEASURED_BY = "`data.source: mqar` with an Attamba beside `baselines: [full, swa, iso_kv]` (configs/studies/recall.yaml)"
FIGURE_CAPTION = ("Recall against KV-cache bytes, one panel per setting (size and sequence length): mean over seeds "
                  "with 95% intervals, trained points filled circles, the transformer evaluated through a window "
                  "hollow diamonds, chance (1 / pairs) dotted")
DISTANCE_CAPTION = ("Recall by key-query distance, one panel per setting: each variant's mean over seeds per distance "
                    "bucket, evaluated windows dashed, chance dotted")


def _size_order(df: pd.DataFrame) -> list[str]:
    """Settings smallest first: the size's largest model (most non-embedding parameters of its points, every
    length of it together), then the sequence length of a "<size> T=<seq_len>" setting, then the name."""
    base = df[schema.TAG_SIZE].str.partition(" T=")[0]
    params = (pd.to_numeric(df[schema.M_PARAMS_NON_EMB], errors="coerce").groupby(base).max()
              if schema.M_PARAMS_NON_EMB in df else pd.Series(dtype=float))

    def key(size: str):
        name, _, T = size.partition(" T=")
        return (float(np.nan_to_num(params.get(name, np.inf), nan=np.inf)), name, int(T) if T.isdigit() else 0, size)
    return sorted(df[schema.TAG_SIZE].unique(), key=key)


def _pct(v: float) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{100 * v:.3g}%"


def _interval(lo: float, hi: float) -> str:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return "no interval"
    return f"[{100 * lo:.3g}, {100 * hi:.3g}]"


def recall_runs(ok: pd.DataFrame) -> pd.DataFrame:
    """The finished runs that logged val/recall (trained on MQAR)."""
    if ok.empty or schema.M_VAL_RECALL not in ok:
        return ok.iloc[:0]
    return ok[np.isfinite(pd.to_numeric(ok[schema.M_VAL_RECALL], errors="coerce"))]


def _chance(runs: pd.DataFrame) -> float:
    pairs = pd.to_numeric(runs[PAIRS], errors="coerce") if PAIRS in runs else pd.Series(dtype=float)
    pairs = pairs[np.isfinite(pairs)]
    return 1.0 / float(pairs.iloc[0]) if len(pairs) and pairs.nunique() == 1 and pairs.iloc[0] > 0 else np.nan


def _distance_columns(columns, prefix: str) -> list[tuple[int, int, str]]:
    """(lo, hi, column) of each recall-by-distance metric under `prefix` ('val/' or 'evalvar/<label>/')."""
    out = []
    for col in columns:
        if col.startswith(prefix):
            m = DISTANCE.fullmatch(col[len(prefix):])
            if m:
                out.append((int(m.group(1)), int(m.group(2)), col))
    return sorted(out)


def _point(size, variant, point, trained_as, kind, g: pd.DataFrame, recall_col: str, kv_col: str,
           prefix: str, chance: float) -> dict:
    values = pd.to_numeric(g[recall_col], errors="coerce").dropna().to_numpy()
    mean, lo, hi = _t_interval(values)
    lo, hi = max(lo, 0.0), min(hi, 1.0)   # recall is a fraction: its interval is clipped to [0, 1] (NaN stays NaN)
    row = {schema.TAG_SIZE: size, "variant": variant, "point": point, "trained_as": trained_as, "kind": kind,
           schema.M_PARAMS_NON_EMB: (float(pd.to_numeric(g[schema.M_PARAMS_NON_EMB], errors="coerce").mean())
                                     if schema.M_PARAMS_NON_EMB in g else np.nan),
           "recall": mean, "lo": lo, "hi": hi, "n": len(values), "chance": chance,
           "kv_bytes": float(pd.to_numeric(g[kv_col], errors="coerce").mean()) if kv_col in g else np.nan,
           "by_seed": dict(zip(g[schema.TAG_SEED], pd.to_numeric(g[recall_col], errors="coerce")))}
    row["distances"] = {(a, b): float(pd.to_numeric(g[col], errors="coerce").mean())
                        for a, b, col in _distance_columns(g.columns, prefix)
                        if pd.to_numeric(g[col], errors="coerce").notna().any()}
    return row


def recall_points(ok: pd.DataFrame) -> pd.DataFrame:
    """One row per point (module docstring): size, variant, point, trained_as, kind, recall, lo, hi, n, chance,
    kv_bytes, by_seed (seed -> recall), distances ((lo, hi) -> mean recall)."""
    runs = recall_runs(ok)
    if runs.empty:
        return pd.DataFrame()
    rows = []
    prefix, suffix = schema.M_EVAL_VARIANT_PREFIX, "/recall"
    labels = sorted(c[len(prefix):-len(suffix)] for c in runs.columns if c.startswith(prefix) and c.endswith(suffix))
    for (size, variant), g in runs.groupby([schema.TAG_SIZE, "variant"], sort=True):
        chance = _chance(g)
        kind = str(g[schema.TAG_KIND].iloc[0]) if schema.TAG_KIND in g else ""
        rows.append(_point(size, variant, TRAINED, variant, kind, g, schema.M_VAL_RECALL, schema.M_KV_BYTES,
                           "val/", chance))
        for label in labels:
            col = schema.eval_variant_metric(label, "recall")
            if col in g and pd.to_numeric(g[col], errors="coerce").notna().any():
                rows.append(_point(size, label, EVALUATED, variant, "swa" if label.startswith("swa-") else kind,
                                   g[pd.to_numeric(g[col], errors="coerce").notna()], col,
                                   schema.eval_variant_metric(label, "kv_cache_bytes"),
                                   f"{schema.M_EVAL_VARIANT_PREFIX}{label}/", chance))
    return pd.DataFrame(rows)


def points_table(points: pd.DataFrame) -> pd.DataFrame:
    """The recall table of the report: one row per point, smallest setting first, by KV-cache bytes."""
    rows = []
    buckets = sorted({b for d in points["distances"] for b in d})
    order = {size: i for i, size in enumerate(_size_order(points))}
    ordered = points.assign(_o=points[schema.TAG_SIZE].map(order)).sort_values(["_o", "kv_bytes", "variant", "point"])
    for _, r in ordered.iterrows():
        row = {"setting": r[schema.TAG_SIZE], "variant": r["variant"],
               "trained as": r["trained_as"] if r["point"] == EVALUATED else "",
               "KV-cache bytes": fmt.num(r["kv_bytes"]), "recall": _pct(r["recall"]),
               "95% interval (%)": _interval(r["lo"], r["hi"]), "seeds": int(r["n"]), "chance": _pct(r["chance"])}
        row.update({f"distance {a}-{b}": _pct(r["distances"].get((a, b), np.nan)) for a, b in buckets})
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- the claim

def _paired(a: dict, b: dict) -> tuple[float, float, float, int]:
    """Recall error difference A - B in points, 100 * (recall_B - recall_A), over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    diffs = np.array([100.0 * (b[s] - a[s]) for s in seeds if math.isfinite(a[s]) and math.isfinite(b[s])])
    mean, lo, hi = _t_interval(diffs)
    return mean, lo, hi, len(diffs)


def _estimate(att: pd.Series, ref: pd.Series, source: str, runs: pd.DataFrame) -> Estimate:
    mean, lo, hi, n = _paired(att["by_seed"], ref["by_seed"])
    params = runs.groupby("variant")[schema.M_PARAMS_NON_EMB].mean() if schema.M_PARAMS_NON_EMB in runs else {}
    return Estimate(size=att[schema.TAG_SIZE], train_tokens=None, a=att["variant"], b=ref["variant"], source=source,
                    pct=mean, lo=lo, hi=hi, n_pairs=n, paired=n > 0, ppl_a=np.nan, ppl_b=np.nan,
                    params_a=float(params.get(att["variant"], np.nan)),
                    params_b=float(params.get(ref["trained_as"], np.nan)), kv_a=att["kv_bytes"], kv_b=ref["kv_bytes"],
                    note=f"recall {_pct(att['recall'])} vs {_pct(ref['recall'])}; difference in recall error, "
                         f"points (A - B)")


def _window_for(here: pd.DataFrame, leading: int) -> tuple[pd.Series | None, str]:
    """The window that sees what an Attamba with L leading tokens sees (L + 1 keys): a trained swa run, else
    the full transformer evaluated through it."""
    label = f"swa-W{leading + 1}"
    for point, source in ((TRAINED, TRAINED), (EVALUATED, f"evaluated as {label}")):
        match = here[(here["variant"] == label) & (here["point"] == point)]
        if point == EVALUATED:
            match = match[match["trained_as"] == "full"]
        if len(match):
            return match.iloc[0], source
    return None, ""


def recall_claim(ok: pd.DataFrame, points: pd.DataFrame | None = None) -> Claim:
    """The claim CLAIM_ID with its estimates and verdict (module docstring)."""
    claim = Claim(id=CLAIM_ID, statement=STATEMENT, paper=PAPER, paper_pct=None, rule=DIRECTIONAL, sign=-1,
                  needs_context=True, context_why="recall of a key beyond the window is what a window loses and "
                  "chunk summaries may keep; where the transformer itself does not recall, there is nothing to keep")
    points = recall_points(ok) if points is None else points
    if points.empty:
        claim.reason = "no run trained on MQAR (data.source: mqar)"
        return claim
    runs = recall_runs(ok)
    match = dict(zip(runs["variant"], runs[schema.TAG_MATCH["iso_kv"]])) if schema.TAG_MATCH["iso_kv"] in runs else {}
    trained = points[points["point"] == TRAINED]
    for size in _size_order(points):
        here = points[points[schema.TAG_SIZE] == size]
        full = trained[(trained[schema.TAG_SIZE] == size) & (trained["kind"] == "full")]
        solved = full["recall"].iloc[0] if len(full) else np.nan
        for _, att in trained[(trained[schema.TAG_SIZE] == size) & (trained["kind"] == "attamba")].iterrows():
            leading = runs.loc[runs["variant"] == att["variant"], schema.TAG_LEADING]
            refs = []
            if len(leading) and math.isfinite(float(leading.iloc[0])):
                window, source = _window_for(here, int(leading.iloc[0]))
                if window is not None:
                    refs.append((window, source))
            iso = here[(here["variant"] == match.get(att["variant"], "")) & (here["point"] == TRAINED)]
            if len(iso):
                refs.append((iso.iloc[0], TRAINED))
            for ref, source in refs:
                e = _estimate(att, ref, source, runs[runs[schema.TAG_SIZE] == size])
                e.verdict, e.reason = judge(e.lo, e.hi, e.n_pairs, e.paired, DIRECTIONAL, -1)
                if not (math.isfinite(solved) and solved >= SOLVED):
                    e.context_use = (f"the full transformer recalls {_pct(solved)} at {size}" if math.isfinite(solved)
                                     else f"no full transformer at {size}")
                    e.reason = (f"{e.context_use} (below {SOLVED:.0%}): no recall to keep; the interval alone: "
                                f"{e.verdict} ({e.reason})")
                    e.verdict = UNTESTABLE
                claim.estimates.append(e)
    _decide(claim)
    return claim


def _decide(claim: Claim) -> None:
    if not claim.estimates:
        claim.reason = "no Attamba run has a window or iso-KV run at its setting to compare with"
        return
    testable = [e for e in claim.estimates if e.verdict != UNTESTABLE]
    for e in testable or claim.estimates:
        e.decides = True
    settings = list(dict.fromkeys(e.size for e in (testable or claim.estimates)))
    claim.decided_by = ", ".join(settings)
    if not testable:
        claim.verdict = UNTESTABLE
        claim.context_use = "; ".join(dict.fromkeys(e.context_use for e in claim.estimates))
        claim.reason = f"{claim.context_use}: no setting where the transformer recalls (>= {SOLVED:.0%})"
        return
    counts = pd.Series([e.verdict for e in testable]).value_counts()
    verdicts = set(counts.index)
    claim.verdict = verdicts.pop() if len(verdicts) == 1 and verdicts <= {SUPPORTED, CONTRADICTED} else INCONCLUSIVE
    claim.reason = (f"{len(testable)} comparisons where the transformer recalls (>= {SOLVED:.0%}): "
                    + ", ".join(f"{n} {v}" for v, n in counts.items()))
    skipped = len(claim.estimates) - len(testable)
    if skipped:
        claim.reason += f"; {skipped} more untestable (the transformer does not recall there)"
    claim.sizes_agree = None


def claim_table(claim: Claim) -> pd.DataFrame:
    rows = [{"setting": e.size, "Attamba": e.a, "against": e.b, "as": e.source, "KV bytes A / B": (
        f"{fmt.num(e.kv_a)} / {fmt.num(e.kv_b)}"), "recall A vs B": e.note.split(";")[0].removeprefix("recall "),
        "error diff (points)": fmt.signed(e.pct), "95% interval": fmt.interval(e.lo, e.hi), "seed pairs": e.n_pairs,
        "verdict": e.verdict, "why": e.reason} for e in claim.estimates]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- figures

def _panels(n: int, legend_h: float, height: float = 4.2):
    cols = min(n, 2)
    rows = -(-n // cols)
    fig = Figure(figsize=(6.2 * cols, height * rows + legend_h))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes, rows


def _colours(points: pd.DataFrame) -> dict:
    trained = set(points.loc[points["point"] == TRAINED, "variant"])
    return variant_colours(set(points["variant"]), first=trained)


def recall_figure(points: pd.DataFrame) -> Figure | None:
    """Recall against KV-cache bytes (log), one panel per setting (FIGURE_CAPTION), every point labelled."""
    points = points.dropna(subset=["recall", "kv_bytes"]) if len(points) else points
    if points.empty:
        return None
    colours = _colours(points)
    sizes = _size_order(points)
    handles = [Line2D([], [], marker="o", ls="", color="k", label="trained"),
               Line2D([], [], marker="D", ls="", color="k", mfc="none", label="transformer through a window"),
               Line2D([], [], ls=":", color="grey", label="chance (1 / pairs)")]
    fig, axes, rows = _panels(len(sizes), 0.5)
    for ax, size in zip(axes, sizes):
        here = points[points[schema.TAG_SIZE] == size]
        for _, r in here.iterrows():
            c = colours[r["variant"]]
            err = [[r["recall"] - r["lo"]], [r["hi"] - r["recall"]]] if math.isfinite(r["lo"]) else None
            mark(ax.errorbar([r["kv_bytes"]], [r["recall"]], yerr=err, fmt="o" if r["point"] == TRAINED else "D",
                             color=c, mfc=c if r["point"] == TRAINED else "none", ms=5, capsize=2, lw=0.8),
                 r["variant"])
        chance = here["chance"].dropna()
        if len(chance):
            ax.axhline(chance.iloc[0], color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        log_ticks(ax.xaxis, here["kv_bytes"].min(), here["kv_bytes"].max())
        ax.set_ylim(0, 1.05)
        ax.set_title(size, fontsize=9)
        ax.set_xlabel("KV-cache bytes at the evaluation context (log)", fontsize=8)
        ax.set_ylabel("recall (fraction of queries)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.5 / (4.2 * rows + 0.5) + 0.08 / rows, hspace=0.4, wspace=0.25)
    for ax, size in zip(axes, sizes):
        here = points[points[schema.TAG_SIZE] == size]
        labels = [(r["kv_bytes"], r["recall"], r["variant"] if r["point"] == TRAINED else
                   f"{r['variant']} ({r['trained_as']}'s weights)", colours[r["variant"]]) for _, r in here.iterrows()]
        place_labels(ax, labels, obstacles=list(zip(here["kv_bytes"], here["recall"])))
    return fig


def distance_figure(points: pd.DataFrame) -> Figure | None:
    """Recall against key-query distance bucket, one panel per setting, one line per point (DISTANCE_CAPTION)."""
    points = points[points["distances"].map(len) > 0] if len(points) else points
    if points.empty:
        return None
    colours = _colours(points)
    sizes = _size_order(points)
    variants = [v for v in colours if v in set(points["variant"])]
    ncol = 4
    legend_h = 0.3 + 0.2 * -(-len(variants) // ncol)
    fig, axes, rows = _panels(len(sizes), legend_h)
    for ax, size in zip(axes, sizes):
        here = points[points[schema.TAG_SIZE] == size]
        buckets = sorted({b for d in here["distances"] for b in d})
        xs = {b: i for i, b in enumerate(buckets)}
        for _, r in here.sort_values("kv_bytes").iterrows():
            d = sorted(r["distances"].items())
            mark(ax.plot([xs[b] for b, _ in d], [v for _, v in d], marker="o", ms=3, lw=1.2,
                         ls="-" if r["point"] == TRAINED else "--", color=colours[r["variant"]]), r["variant"])
        chance = here["chance"].dropna()
        if len(chance):
            ax.axhline(chance.iloc[0], color="grey", ls=":", lw=1)
        ax.set_xticks(range(len(buckets)), [f"{a}-{b}" for a, b in buckets], fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(size, fontsize=9)
        ax.set_xlabel("tokens from the key to its query", fontsize=8)
        ax.set_ylabel("recall", fontsize=8)
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colours[v], lw=1.5, label=v) for v in variants]
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=legend_h / (4.2 * rows + legend_h) + 0.08 / rows, hspace=0.4, wspace=0.25)
    return fig


@dataclass
class RecallSection:
    """What the report shows of recall: its tables (title -> table, in order), figures and claims.json part."""

    points: pd.DataFrame
    claim: Claim                  # "not measured" where no run trained on MQAR
    sections: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: list[tuple[str, bytes]] = field(default_factory=list)


def recall_section(ok: pd.DataFrame) -> RecallSection:
    """The recall section of a study with MQAR-trained runs (no tables or figures otherwise; the claim is then
    "not measured")."""
    points = recall_points(ok)
    claim = recall_claim(ok, points)
    if points.empty:
        return RecallSection(points, claim)
    sections = {TITLE: points_table(points)}
    if claim.estimates:
        sections[CLAIM_TITLE] = claim_table(claim)
    figures = [(caption, to_png(fig)) for caption, fig in ((FIGURE_CAPTION, recall_figure(points)),
                                                          (DISTANCE_CAPTION, distance_figure(points)))
               if fig is not None]
    return RecallSection(points, claim, sections, figures)


def answer_lines(section: RecallSection) -> list[str]:
    """The answer of a recall study, one line per setting: each model's recall with its interval, by
    KV-cache bytes, then the claim's verdict."""
    trained = section.points[section.points["point"] == TRAINED]
    lines = []
    for size in _size_order(trained):
        here = trained[trained[schema.TAG_SIZE] == size].sort_values("kv_bytes", ascending=False)
        parts = [f"{r['variant']} {_pct(r['recall'])} {_interval(r['lo'], r['hi'])}" for _, r in here.iterrows()]
        chance = here["chance"].dropna()
        tail = f" (chance {_pct(chance.iloc[0])})" if len(chance) else ""
        lines.append(f"**{size}**, recall by KV-cache (largest first){tail}: " + "; ".join(parts) + ".")
    return lines
