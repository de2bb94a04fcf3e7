"""Does context matter here? What the study's transformer gains from the tokens beyond a window, the loss by
position in the context, and the figure each context-dependent claim is gated on (claims.py).

Both come from the final evaluation of every run (pipeline/eval), which scores the whole validation split:

- Loss by position: the mean loss of the targets at positions 1-8, 9-32, 33-128, ... (position = how many
  tokens the model could see; schema.position_buckets), from val/loss_pos_<first>-<last> and, per evaluation
  variant, evalvar/<label>/loss_pos_<first>-<last>. Per configuration (variant, size, training tokens; an
  evaluated point also by the variant its weights were trained as): the mean over seeds with a 95% Student-t
  interval (compare._t_interval).
- Context use beyond a window of W keys (the query included): the full transformer's loss through its last W
  keys (its evaluation variant swa-W<W>) minus its loss with the whole context, per run (the same weights, so
  each seed is its own pair), as the mean over seeds in nats with a 95% Student-t interval, and as % perplexity
  100 * (ppl_W / ppl - 1) with its own interval. A study scores its transformers through W = L + 1 for each
  Attamba L (what Attamba's window sees: the tokens beyond L) and W = schema.CONTEXT_WINDOW (40).
  Reading (from the nats interval): "shown" when it lies above 0; "not shown" when it includes 0, lies below 0
  (the window scores better) or rests on one seed; "not measured" when no full transformer of that size and
  token budget was evaluated through such a window.

The gate (`Gate`): for an Attamba model with L leading tokens at a size and token budget, the context use beyond
L (a window of L + 1 keys) where the study measured it there, else beyond 40 keys; claims.py gives a claim whose
mechanism needs context beyond the window the verdict "untestable here" when that figure is not shown.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from pipeline import schema
from pipeline.report.claim_pairs import eval_variant_overrides
from pipeline.report.compare import _t_interval
from pipeline.report.empty import empty, with_note
from pipeline.report.figures import to_png
from pipeline.report.pareto import EVALUATED, TRAINED, eval_variant_labels

SHOWN = "shown"
NOT_SHOWN_SPANS = "not shown (interval includes 0)"
NOT_SHOWN_BELOW = "not shown (interval below 0: the window scores better)"
NOT_SHOWN_ONE_SEED = "not shown (one seed: no interval)"
NOT_MEASURED = "not measured (no full transformer evaluated through a window)"
TITLE = "Does context matter here?"
CLAIMS_TITLE = "Does context matter here? The claims that need it, and the figure that gates each"
POSITION_TITLE = "Does context matter here? Loss by position in the context (mean over seeds, 95% interval)"
FIGURE_CAPTION = ("Loss by position in the context, per size: trained variants solid, the transformer through a "
                  "window dashed (95% intervals over seeds)")


def _num(v: float, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:+.3g}" if signed else f"{v:.3g}"


def _interval(lo: float, hi: float) -> str:
    return f"[{_num(lo)}, {_num(hi)}]" if math.isfinite(lo) and math.isfinite(hi) else "no interval"


@dataclass(frozen=True)
class ContextUse:
    """The full transformer `transformer` at (size, tokens) through a window of `window` keys, over `n` runs."""

    size: str
    tokens: float                # training tokens (-1 where the runs did not log them)
    transformer: str             # the full transformer's variant
    window: int                  # W keys, the query included
    label: str                   # the evaluation variant read (swa-W<W>)
    n: int
    nats: float
    nats_lo: float
    nats_hi: float
    pct: float
    pct_lo: float
    pct_hi: float
    reading: str

    @property
    def shown(self) -> bool:
        return self.reading == SHOWN

    def beyond(self, leading: float | None = None) -> str:
        """What the window leaves out: "L=32 (a window of 33 keys)" when read as Attamba's, else "40 keys"."""
        if leading is not None and self.window == leading + 1:
            return f"L={leading:g} (a window of {self.window} keys)"
        return f"{self.window} keys"

    def text(self, leading: float | None = None) -> str:
        """"context use beyond 40 keys at small: +0.0005 nats [-0.0007, 0.0017], +0.05% perplexity [...]
        (3 seeds): not shown (interval includes 0)"."""
        return (f"context use beyond {self.beyond(leading)} at {self.size}: {_num(self.nats, True)} nats "
                f"{_interval(self.nats_lo, self.nats_hi)}, {_num(self.pct, True)}% perplexity "
                f"{_interval(self.pct_lo, self.pct_hi)} ({self.n} seed{'' if self.n == 1 else 's'}): {self.reading}")


def reading(lo: float, hi: float, n: int) -> str:
    """The reading of a context use's nats interval (module docstring)."""
    if n < 2 or not (math.isfinite(lo) and math.isfinite(hi)):
        return NOT_SHOWN_ONE_SEED
    if lo > 0:
        return SHOWN
    if hi < 0:
        return NOT_SHOWN_BELOW
    return NOT_SHOWN_SPANS


def _window_labels(ok: pd.DataFrame) -> dict[str, int]:
    """label -> W for the evaluation variants of a full transformer through a sliding window (their overrides:
    attention=swa,window=W)."""
    out = {}
    for label, overrides in eval_variant_overrides(ok).items():
        if (set(overrides) <= {"attention", "window"} and overrides.get("attention", "swa") == "swa"
                and overrides.get("window", "").isdigit()):
            out[label] = int(overrides["window"])
    return out


def _tokens(df: pd.DataFrame) -> pd.Series:
    col = df[schema.M_TRAIN_TOKENS] if schema.M_TRAIN_TOKENS in df else pd.Series(np.nan, index=df.index)
    return pd.to_numeric(col, errors="coerce").fillna(-1.0)


def context_uses(ok: pd.DataFrame) -> list[ContextUse]:
    """Every context use the study measured: per full transformer variant, size, token budget and window."""
    if ok.empty or schema.TAG_KIND not in ok or schema.M_VAL_LOSS not in ok:
        return []
    full = ok[ok[schema.TAG_KIND] == "full"]
    out = []
    for label, window in sorted(_window_labels(ok).items(), key=lambda item: (item[1], item[0])):
        loss, ppl = schema.eval_variant_metric(label, "loss"), schema.eval_variant_metric(label, "ppl")
        if loss not in full:
            continue
        runs = full[full[loss].notna() & full[schema.M_VAL_LOSS].notna()]
        keys = [runs["variant"], runs[schema.TAG_SIZE], _tokens(runs).rename("_tokens")]
        for (variant, size, tokens), g in runs.groupby(keys, sort=True):
            nats, lo, hi = _t_interval((g[loss] - g[schema.M_VAL_LOSS]).to_numpy())
            if ppl in g and schema.M_VAL_PPL in g:
                pct, pct_lo, pct_hi = _t_interval(100.0 * (g[ppl] / g[schema.M_VAL_PPL] - 1.0).to_numpy())
            else:
                pct = pct_lo = pct_hi = math.nan
            out.append(ContextUse(size=str(size), tokens=float(tokens), transformer=str(variant), window=window,
                                  label=label, n=len(g), nats=nats, nats_lo=lo, nats_hi=hi, pct=pct,
                                  pct_lo=pct_lo, pct_hi=pct_hi, reading=reading(lo, hi, len(g))))
    return out


@dataclass
class Gate:
    """The context-use figure each Attamba model's comparisons are gated on (module docstring)."""

    uses: list[ContextUse] = field(default_factory=list)

    def figure(self, size: str, tokens: float | None, leading: float | None) -> tuple[ContextUse | None, str]:
        """(the figure, the words that quote it) for an Attamba with L = `leading` at (size, tokens): beyond L
        where measured there, else beyond 40 keys, else none (not measured)."""
        tokens = -1.0 if tokens is None else float(tokens)
        here = sorted((u for u in self.uses if u.size == size and u.tokens == tokens),
                      key=lambda u: (len(u.transformer), u.transformer))
        has_l = leading is not None and math.isfinite(leading)
        at_l = next((u for u in here if has_l and u.window == leading + 1), None)
        if at_l is not None:
            return at_l, at_l.text(leading)
        at_40 = next((u for u in here if u.window == schema.CONTEXT_WINDOW), None)
        missing_l = f"beyond L={leading:g} not measured" if has_l else "no L to read"
        if at_40 is not None:
            return at_40, f"{at_40.text()} ({missing_l}, so beyond {schema.CONTEXT_WINDOW} keys is used)"
        windows = f"{int(leading) + 1} or {schema.CONTEXT_WINDOW}" if has_l else f"{schema.CONTEXT_WINDOW}"
        return None, (f"context use not measured at {size}: no full transformer of that size was evaluated "
                      f"through a window of {windows} keys")


# ---------------------------------------------------------------- loss by position

def position_points(ok: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (variant, point, trained_as, size, tokens, bucket) with the mean loss over seeds,
    its 95% interval and the number of runs."""
    if ok.empty:
        return pd.DataFrame()
    tokens = _tokens(ok)
    labels = {schema.split_metric("validation", ""): None,
              **{schema.eval_variant_metric(label, ""): label for label in eval_variant_labels(ok.columns)}}
    rows = []
    for col in ok.columns:
        bucket = schema.parse_loss_pos(col)
        prefix = col[:col.rfind("/") + 1]
        if bucket is None or prefix not in labels:
            continue
        label = labels[prefix]
        frame = pd.DataFrame({"variant": ok["variant"] if label is None else label,
                              "point": TRAINED if label is None else EVALUATED,
                              "trained_as": "" if label is None else ok["variant"],
                              schema.TAG_SIZE: ok[schema.TAG_SIZE], "tokens": tokens,
                              "first": bucket[0], "last": bucket[1], "loss": ok[col]}).dropna(subset=["loss"])
        rows.append(frame)
    if not rows:
        return pd.DataFrame()
    long = pd.concat(rows, ignore_index=True)
    out = []
    for key, g in long.groupby(["variant", "point", "trained_as", schema.TAG_SIZE, "tokens", "first", "last"],
                               sort=True):
        mean, lo, hi = _t_interval(g["loss"].to_numpy())
        out.append(dict(zip(["variant", "point", "trained_as", schema.TAG_SIZE, "tokens", "first", "last"], key),
                        loss=mean, lo=lo, hi=hi, n=len(g)))
    return pd.DataFrame(out)


def position_table(points: pd.DataFrame, reason: str) -> pd.DataFrame:
    """One row per configuration, one column per position bucket: "mean [lo, hi]" (nats per token)."""
    if points.empty:
        return empty(reason)
    keys = ["variant", "point", "trained_as", schema.TAG_SIZE, "tokens"]
    buckets = sorted({(a, b) for a, b in zip(points["first"], points["last"])})
    rows = []
    for key, g in points.groupby(keys, sort=False):
        row = {"variant": key[0], "point": key[1], "trained as": key[2], "size": key[3], "seeds": int(g["n"].max())}
        for a, b in buckets:
            cell = g[(g["first"] == a) & (g["last"] == b)]
            row[f"loss at {a}-{b}"] = ("n/a" if cell.empty else
                                       f"{_num(cell['loss'].iloc[0])} {_interval(cell['lo'].iloc[0], cell['hi'].iloc[0])}")
        rows.append(row)
    return pd.DataFrame(rows)


def position_figure(points: pd.DataFrame, ok: pd.DataFrame) -> Figure | None:
    """Loss against position bucket, one panel per size (smallest first): every trained variant (solid) and the
    full transformer through each window (dashed), mean over seeds with 95% intervals."""
    if points.empty:
        return None
    windows = set(_window_labels(ok))
    full = set(ok.loc[ok[schema.TAG_KIND] == "full", "variant"]) if schema.TAG_KIND in ok else set()
    shown = points[(points["point"] == TRAINED)
                   | (points["variant"].isin(windows) & points["trained_as"].isin(full))]
    if shown.empty:
        return None
    sizes = sorted(shown[schema.TAG_SIZE].unique(), key=_size_order(ok))
    buckets = sorted({(a, b) for a, b in zip(shown["first"], shown["last"])})
    fig = Figure(figsize=(6.2 * min(len(sizes), 2), 4.4 * -(-len(sizes) // 2) + 0.6))
    axes = np.atleast_1d(fig.subplots(-(-len(sizes) // 2), min(len(sizes), 2), squeeze=False).ravel())
    from matplotlib import colormaps
    cmap = colormaps["tab20"]
    lines = sorted(set(zip(shown["variant"], shown["point"], shown["trained_as"])))
    colours = {line: cmap(i % 20) for i, line in enumerate(lines)}   # one colour per line in every panel
    for ax, size in zip(axes, sizes):
        here = shown[shown[schema.TAG_SIZE] == size]
        for (variant, point, trained_as, _), g in here.groupby(["variant", "point", "trained_as", "tokens"],
                                                               sort=True):
            g = g.sort_values("first")
            x = [buckets.index((a, b)) for a, b in zip(g["first"], g["last"])]
            err = np.vstack([g["loss"] - g["lo"], g["hi"] - g["loss"]])
            label = variant if point == TRAINED else f"{trained_as} through {variant}"
            ax.errorbar(x, g["loss"], yerr=np.nan_to_num(err), fmt="o-" if point == TRAINED else "s--",
                        color=colours[(variant, point, trained_as)], ms=3.5, lw=1.0, capsize=2, label=label)
        ax.set_xticks(range(len(buckets)), [f"{a}-{b}" for a, b in buckets], fontsize=7.5)
        ax.set_xlabel("position of the target in its context (tokens the model could see)", fontsize=8)
        ax.set_ylabel("validation loss (nats/token)", fontsize=8)
        ax.set_title(size, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in axes[len(sizes):]:
        ax.set_visible(False)
    return fig


# ---------------------------------------------------------------- the section

def _leading(ok: pd.DataFrame) -> list[float]:
    if ok.empty or schema.TAG_KIND not in ok or schema.TAG_LEADING not in ok:
        return []
    att = ok[ok[schema.TAG_KIND] == "attamba"]
    return sorted(set(pd.to_numeric(att[schema.TAG_LEADING], errors="coerce").dropna()))


def _size_order(ok: pd.DataFrame):
    """A sort key for sizes: by mean non-embedding parameters (unknown last), then name."""
    params = (ok.groupby(schema.TAG_SIZE)[schema.M_PARAMS_NON_EMB].mean() if schema.M_PARAMS_NON_EMB in ok
              else pd.Series(dtype=float))
    return lambda size: (float(params.get(size, math.inf)), size)


def _largest_size(ok: pd.DataFrame, sizes: set[str]) -> str:
    order = _size_order(ok)
    known = [s for s in sizes if math.isfinite(order(s)[0])]
    return max(known or sizes, key=order)


def study_reading(ok: pd.DataFrame, uses: list[ContextUse]) -> str:
    """The section's one-line reading: each measured figure at the largest size that has one, and which of
    beyond-L and beyond-40-keys the study did not measure."""
    leading = _leading(ok)
    if not uses:
        return (f"Context use: {NOT_MEASURED}. Whether anything beyond Attamba's window matters in this study is "
                f"unknown; the claims that need it are \"untestable here\".")
    size = _largest_size(ok, {u.size for u in uses})
    here = [u for u in uses if u.size == size]
    parts = [u.text(u.window - 1 if u.window - 1 in leading else None) for u in here]
    missing = [f"L={L:g}" for L in leading if L + 1 not in {u.window for u in here}]
    if missing:
        parts.append(f"beyond {', '.join(missing)} (a window of L + 1 keys): not measured (no full transformer "
                     f"evaluated through such a window)")
    if schema.CONTEXT_WINDOW not in {u.window for u in here}:
        parts.append(f"beyond {schema.CONTEXT_WINDOW} keys: not measured")
    shown = [u for u in here if u.shown]
    verdict = (f"Context beyond a window of {min(u.window for u in shown)} keys is shown to matter at {size}."
               if shown else f"Nothing beyond {min(u.window for u in here)} keys is shown to matter at {size}.")
    return f"At the largest size measured, {size}: " + "; ".join(parts) + f". {verdict}"


RULE_TEXT = ("Claims whose mechanism needs context beyond Attamba's window are gated: each comparison on the "
             "context use beyond its Attamba's L at its size (a window of L + 1 keys) where measured, else beyond "
             f"{schema.CONTEXT_WINDOW} keys; where that is not shown (its interval includes 0 or lies below it) or "
             "not measured, the claim's verdict is \"untestable here\" (rule in claims.json; estimates still listed).")


def context_table(uses: list[ContextUse], leading: list[float], ok: pd.DataFrame) -> pd.DataFrame:
    order = _size_order(ok)
    uses = sorted(uses, key=lambda u: (order(u.size), u.tokens, u.transformer, u.window))
    rows = [{"size": u.size, "transformer": u.transformer, "window (keys)": u.window,
             "beyond": u.beyond(u.window - 1 if u.window - 1 in leading else None), "seeds": u.n,
             "context use (nats)": _num(u.nats, True), "95% interval (nats)": _interval(u.nats_lo, u.nats_hi),
             "ppl diff %": _num(u.pct, True), "95% interval (%)": _interval(u.pct_lo, u.pct_hi),
             "reading": u.reading} for u in uses]
    return pd.DataFrame(rows)


def claims_context_table(claims) -> pd.DataFrame:
    """One row per claim: whether it needs context beyond the window, why, the figure that gated it, its verdict."""
    return pd.DataFrame([{"claim": c.id, "needs context beyond the window": "yes" if c.needs_context else "no",
                          "why": c.context_why, "gated on": c.context_use or ("not gated" if not c.needs_context
                                                                             else "n/a: nothing measured"),
                          "verdict": c.verdict} for c in claims])


@dataclass
class ContextSection:
    sections: dict[str, pd.DataFrame]       # heading -> table, in order, for the report's opening
    figures: list[tuple[str, bytes]]        # (caption, PNG), appended to the report's figures
    json: dict                              # claims.json's "context_use"


def context_section(ok: pd.DataFrame, claims) -> ContextSection:
    """The report's "Does context matter here?" section: the context use with its one-line reading and the rule,
    the claims it gates (claims.evaluate_claims), the loss by position (table and figure)."""
    uses = context_uses(ok)
    leading = _leading(ok)
    line = study_reading(ok, uses)
    table = context_table(uses, leading, ok) if uses else empty(f"Context use: {NOT_MEASURED}")
    points = position_points(ok)
    why = ("not measured: no run logged its loss by position (val/loss_pos_*), which final evaluations log since "
           "issue 26" if len(ok) else "no runs finished")
    sections = {TITLE: with_note(table, f"{line} {RULE_TEXT}"), CLAIMS_TITLE: claims_context_table(claims),
                POSITION_TITLE: position_table(points, why)}
    fig = position_figure(points, ok)
    return ContextSection(sections=sections, figures=[(FIGURE_CAPTION, to_png(fig))] if fig is not None else [],
                          json={"reading": line, "rule": RULE_TEXT, "uses": [asdict(u) for u in uses]})
