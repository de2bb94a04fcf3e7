"""Paper-style figures, drawn on bare `matplotlib.figure.Figure` objects (Agg canvas, no pyplot global state)
and returned as PNG bytes: report.html embeds them (one self-contained file), summary.md links their files."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from pipeline import schema
from pipeline.report.fits import predict
from pipeline.report.pareto import EVALUATED, TRAINED, pareto_front, pareto_points
from pipeline.report.scaling import LAW_C, LAW_N, LAW_ND, VariantFits

DPI = 110


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _plain_log_y(ax) -> None:
    # Losses span well under a decade: "2.4" reads better than matplotlib's "2.4 x 10^0".
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _colours(names: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps
    cmap = colormaps["tab10"]
    return {n: cmap(i % 10) for i, n in enumerate(sorted(names))}


def scaling_figure(fits: dict[str, VariantFits], law: str, xlabel: str) -> Figure | None:
    """Loss against size (log-log): seed mean +- std, fitted curve with 95% band, extrapolation dashed,
    and a residual panel below."""
    laws = {v: vf.laws[law] for v, vf in fits.items() if law in vf.laws}
    # a variant at one size is a point, not a trend: those are left to the tables
    single = [v for v, lr in laws.items() if len(np.unique(np.asarray(lr.x, dtype=float))) < 2]
    laws = {v: lr for v, lr in laws.items() if v not in single}
    if not laws:
        return None
    fig = Figure(figsize=(7.5, 6.5 + 0.18 * len(laws)))
    ax, rax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    colours = _colours(list(laws))
    for variant, lr in laws.items():
        c = colours[variant]
        frame = pd.DataFrame({"x": lr.x, "y": lr.y})
        g = frame.groupby("x")["y"]
        mean, std = g.mean(), g.std().fillna(0.0)
        label = variant
        if lr.fit.ok:
            p = lr.fit.params
            exponent = list(p)[2]
            lo_hi = lr.fit.intervals.get(exponent, (np.nan, np.nan))
            label += f": E={p['E']:.3g}, {exponent}={p[exponent]:.3f} [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]"
            xs_in = np.geomspace(lr.x.min(), lr.x.max(), 80)
            xs_out = np.geomspace(lr.x.max(), lr.x.max() * 10, 40)
            for xs, style in ((xs_in, "-"), (xs_out, "--")):
                mid, lo, hi = predict(lr.fit, xs)
                ax.plot(xs, mid, style, color=c, lw=1.6)
                if np.isfinite(lo).all():
                    ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0)
            rax.scatter(lr.x, 100 * np.asarray(lr.fit.residuals), color=c, s=14)
        else:
            label += " (not fitted: too few sizes)"
        ax.errorbar(mean.index, mean.values, yerr=std.values, fmt="o", color=c, ms=5, capsize=3, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_log_y(ax)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{law} fits: solid = fitted range, dashed = extrapolation, band = 95% bootstrap"
                 + (f"\n({len(single)} variants run at one size only are in the tables)" if single else ""),
                 fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=7.5, frameon=False, ncol=1)
    fig.subplots_adjust(bottom=0.1 + 0.03 * len(laws))
    ax.grid(True, which="both", alpha=0.3)
    rax.axhline(0, color="k", lw=0.8)
    rax.set_xlabel(xlabel)
    rax.set_ylabel("residual (% log loss)")
    rax.grid(True, which="both", alpha=0.3)
    return fig


def nd_figure(fits: dict[str, VariantFits]) -> Figure | None:
    """L(N, D) fits: observed against predicted loss, one colour per variant."""
    laws = {v: vf.laws[LAW_ND] for v, vf in fits.items() if LAW_ND in vf.laws and vf.laws[LAW_ND].fit.ok}
    if not laws:
        return None
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    colours = _colours(list(laws))
    for variant, lr in laws.items():
        pred = predict(lr.fit, lr.x)[0]
        p = lr.fit.params
        ax.scatter(pred, lr.y, color=colours[variant], s=16,
                   label=f"{variant}: alpha={p['alpha']:.3f}, beta={p['beta']:.3f}")
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel("predicted loss L(N, D) (nats/token)")
    ax.set_ylabel("observed validation loss (nats/token)")
    ax.set_title("L(N, D) = E + A/N^alpha + B/D^beta")
    ax.legend(fontsize=7.5)
    ax.grid(True, alpha=0.3)
    return fig


MARKERS = {TRAINED: "o", EVALUATED: "D"}   # evaluated points are hollow diamonds


KIND_COLOURS = {"full": "black", "swa": "tab:gray", "attamba": "tab:blue", "iso_kv": "tab:orange",
                "iso_flop": "tab:green", "iso_param": "tab:purple"}


def _label_kind(variant: str) -> str:
    """The kind a variant label starts with (ModelConfig.variant(): "iso_flop-F48-W33" -> "iso_flop")."""
    for kind in sorted(KIND_COLOURS, key=len, reverse=True):
        if variant == kind or variant.startswith(kind + "-"):
            return kind
    return "other"


def pareto_figure(ok: pd.DataFrame, cost: str, xlabel: str) -> Figure | None:
    """Perplexity against one cost, one panel per size (models compete at equal size): every point the mean
    +- std over seeds, coloured by its kind, trained points filled circles, evaluation variants hollow
    diamonds; each panel's front drawn as steps, its points labelled with their variant."""
    points = pareto_points(ok).dropna(subset=[cost, schema.M_VAL_PPL]) if len(ok) else pd.DataFrame()
    if points.empty:
        return None
    sizes = list(points.groupby(schema.TAG_SIZE)[schema.M_PARAMS_NON_EMB].min().sort_values().index)
    cols = min(len(sizes), 2)
    rows = -(-len(sizes) // cols)
    fig = Figure(figsize=(6.2 * cols, 4.6 * rows + 0.8))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, size in zip(axes, sizes):
        here = points[points[schema.TAG_SIZE] == size]
        for (variant, point), g in here.groupby(["variant", "point"]):
            c = KIND_COLOURS.get(_label_kind(variant), "tab:red")
            ax.errorbar(g[cost], g[schema.M_VAL_PPL], yerr=g[schema.M_VAL_PPL + " std"].fillna(0.0),
                        fmt=MARKERS[point], color=c, mfc=c if point == TRAINED else "none", ms=5, capsize=2,
                        alpha=0.9, lw=0.8)
        front = pareto_front(here, cost)
        ax.step(front[cost], front[schema.M_VAL_PPL], where="post", color="k", lw=1.0, alpha=0.6)
        for _, r in front.iterrows():
            text = r["variant"] if r["point"] == TRAINED else f"{r['variant']} (from {r['trained_as']})"
            ax.annotate(text, (r[cost], r[schema.M_VAL_PPL]), fontsize=6, xytext=(4, -9),
                        textcoords="offset points")
        params = here[schema.M_PARAMS_NON_EMB]
        ax.set_title(f"{size}: {params.min():.3g}-{params.max():.3g} non-embedding parameters", fontsize=9)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())   # minor tick labels collide within a decade
        ax.set_yscale("log")
        _plain_log_y(ax)
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("validation perplexity (per token)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for ax in axes[len(sizes):]:
        ax.set_visible(False)
    kinds = sorted({_label_kind(v) for v in points["variant"]}, key=lambda k: list(KIND_COLOURS).index(k)
                   if k in KIND_COLOURS else len(KIND_COLOURS))
    handles = [Line2D([], [], marker="s", ls="", color=KIND_COLOURS.get(k, "tab:red"), label=k) for k in kinds]
    handles += [Line2D([], [], marker=MARKERS[TRAINED], ls="", color="k", label="trained at the variant"),
                Line2D([], [], marker=MARKERS[EVALUATED], ls="", color="k", mfc="none",
                       label="evaluated at the variant (trained as another)"),
                Line2D([], [], color="k", alpha=0.6, label="Pareto front of the size (its points labelled)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=0.8 / (4.6 * rows + 0.8) + 0.06, hspace=0.35, wspace=0.25)
    return fig


def gap_figure(gap: pd.DataFrame, title: str) -> Figure | None:
    """Horizontal bars of % perplexity difference with 95% intervals across seeds."""
    if gap.empty:
        return None
    fig = Figure(figsize=(7, 0.45 * len(gap) + 1.6))
    ax = fig.subplots()
    labels = [f"{r['variant']} @ {r[schema.TAG_SIZE]} vs {r['reference']}" for _, r in gap.iterrows()]
    y = np.arange(len(gap))
    err = np.vstack([gap["pct_mean"] - gap["pct_lo"], gap["pct_hi"] - gap["pct_mean"]])
    ax.barh(y, gap["pct_mean"], xerr=np.nan_to_num(err), color="tab:blue", alpha=0.7, capsize=3)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7.5)
    ax.set_xlabel("perplexity difference vs reference (%, lower is better)")
    ax.set_title(title)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def recall_figure(recall: pd.DataFrame) -> Figure | None:
    """MQAR accuracy against chunk size P for Attamba runs, one line per (context, L)."""
    df = recall.dropna(subset=[schema.TAG_CHUNK]) if not recall.empty else recall
    if df.empty:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for (ctx, lead), g in df.groupby(["context", schema.TAG_LEADING]):
        g = g.groupby(schema.TAG_CHUNK)["acc_mean"].mean()
        ax.plot(g.index, g.values, "o-", label=f"T={ctx:g}, L={lead:g}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("chunk size P (tokens)")
    ax.set_ylabel("MQAR recall accuracy (fraction)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7.5)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def all_figures(ok: pd.DataFrame, fits: dict[str, VariantFits], gap: pd.DataFrame, iso: pd.DataFrame,
                recall: pd.DataFrame, iso_flop: pd.DataFrame | None = None) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) for every figure that has data."""
    candidates = [
        ("Validation loss against non-embedding parameters, L(N) = E + A N^-alpha",
         lambda: scaling_figure(fits, LAW_N, "non-embedding parameters N")),
        ("Validation loss against training compute, L(C) = E + A C^-gamma",
         lambda: scaling_figure(fits, LAW_C, "training compute C (FLOPs)")),
        ("L(N, D) fits, observed against predicted", lambda: nd_figure(fits)),
        ("Perplexity against KV-cache size, each point labelled with its size (Pareto front in black)",
         lambda: pareto_figure(ok, schema.M_KV_BYTES, "KV-cache at the evaluation context (bytes, all layers)")),
        ("Perplexity against attention FLOPs per token, each point labelled with its size (Pareto front in black)",
         lambda: pareto_figure(ok, schema.M_ATTN_FLOPS_PER_TOKEN, "attention FLOPs per token")),
        ("Gap to the transformer at equal size", lambda: gap_figure(gap, "vs full attention, same size")),
        ("Attamba against the iso-KV transformer sized from it (the same KV-cache)",
         lambda: gap_figure(iso, "vs iso-KV baseline, same size")),
        ("Attamba against the iso-FLOP transformer sized from it (the same attention-layer FLOPs)",
         lambda: gap_figure(iso_flop if iso_flop is not None else pd.DataFrame(), "vs iso-FLOP baseline, same size")),
        ("MQAR recall against chunk size P", lambda: recall_figure(recall)),
    ]
    out = []
    for caption, make in candidates:
        fig = make()
        if fig is not None:
            out.append((caption, to_png(fig)))
    return out
