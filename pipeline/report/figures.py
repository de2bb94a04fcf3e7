"""Paper-style figures, drawn on bare `matplotlib.figure.Figure` objects (Agg canvas, no pyplot global state)
and returned as PNG bytes: report.html embeds them (one self-contained file), summary.md links their files.

Every figure of a report colours a variant the same way (`plotting.variant_colours`, built once in
`all_figures`), names every variant it plots in its legend or labels, and its caption describes what is
drawn in the words of the constants that draw it (FRONT_COLOUR_NAME, ...).
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from pipeline import schema
from pipeline.report import fmt
from pipeline.report.fits import predict
from pipeline.report.pareto import EVALUATED, TRAINED, pareto_front, pareto_points
from pipeline.report.plotting import freeze_log_limits, mark, place_labels, variant_colours
from pipeline.report.scaling import LAW_C, LAW_N, LAW_ND, VariantFits

DPI = 110
MARKERS = {TRAINED: "o", EVALUATED: "D"}   # evaluated points are hollow diamonds
FRONT_COLOUR, FRONT_COLOUR_NAME, FRONT_STYLE, FRONT_STYLE_NAME = "dimgray", "grey", "--", "dashed"
LABEL_COLOUR, OFF_FRONT_LABEL_COLOUR = "#222222", "#777777"   # labels of front points; of the others
LABEL_ALL_UP_TO = 15   # in a panel of at most this many points, the points off the front are labelled where
                       # their label fits; in a larger one, the front's only


def _point_label(r) -> str:
    return r["variant"] if r["point"] == TRAINED else f"{r['variant']} (from {r['trained_as']})"


def to_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _colours_for(names, colours: dict | None) -> dict:
    """`colours` (the report's mapping) when it covers `names`, else a mapping of `names` alone."""
    names = list(names)
    return colours if colours is not None and all(n in colours for n in names) else variant_colours(names)


def scaling_figure(fits: dict[str, VariantFits], law: str, xlabel: str, colours: dict | None = None) -> Figure | None:
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
    colours = _colours_for(laws, colours)
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
            label += f": E={fmt.num(p['E'])}, {exponent}={fmt.num(p[exponent])} {fmt.interval(*lo_hi)}"
            xs_in = np.geomspace(lr.x.min(), lr.x.max(), 80)
            xs_out = np.geomspace(lr.x.max(), lr.x.max() * 10, 40)
            for xs, style in ((xs_in, "-"), (xs_out, "--")):
                mid, lo, hi = predict(lr.fit, xs)
                mark(ax.plot(xs, mid, style, color=c, lw=1.6), variant)
                if np.isfinite(lo).all():
                    mark(ax.fill_between(xs, lo, hi, color=c, alpha=0.15, lw=0), variant)
            mark(rax.scatter(lr.x, 100 * np.asarray(lr.fit.residuals), color=c, s=14), variant)
        else:
            label += " (not fitted: too few sizes)"
        mark(ax.errorbar(mean.index, mean.values, yerr=std.values, fmt="o", color=c, ms=5, capsize=3, label=label),
             variant)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"{law} fits: solid = fitted range, dashed = extrapolation, band = 95% bootstrap"
                 + (f"\n({len(single)} variant{'s' if len(single) > 1 else ''} run at one size only: in the "
                    "tables)" if single else ""),
                 fontsize=9)
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", fontsize=7.5, frameon=False, ncol=1)
    fig.subplots_adjust(bottom=0.1 + 0.03 * len(laws))
    freeze_log_limits(ax, pad=0.03)
    ax.grid(True, which="both", alpha=0.3)
    rax.axhline(0, color="k", lw=0.8)
    rax.set_xlabel(xlabel)
    rax.set_ylabel("residual (% log loss)")
    rax.grid(True, which="both", alpha=0.3)
    return fig


def nd_figure(fits: dict[str, VariantFits], colours: dict | None = None) -> Figure | None:
    """L(N, D) fits: observed against predicted loss, one colour per variant."""
    laws = {v: vf.laws[LAW_ND] for v, vf in fits.items() if LAW_ND in vf.laws and vf.laws[LAW_ND].fit.ok}
    if not laws:
        return None
    fig = Figure(figsize=(5.5, 5))
    ax = fig.subplots()
    colours = _colours_for(laws, colours)
    for variant, lr in laws.items():
        pred = predict(lr.fit, lr.x)[0]
        p = lr.fit.params
        mark(ax.scatter(pred, lr.y, color=colours[variant], s=16,
                        label=f"{variant}: alpha={fmt.num(p['alpha'])}, beta={fmt.num(p['beta'])}"), variant)
    lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
    ax.plot(lims, lims, "k--", lw=0.8)
    ax.set_xlabel("predicted loss L(N, D) (nats/token)")
    ax.set_ylabel("observed validation loss (nats/token)")
    ax.set_title("L(N, D) = E + A/N^alpha + B/D^beta")
    ax.legend(fontsize=7.5)
    ax.grid(True, alpha=0.3)
    return fig


def _size_order(df: pd.DataFrame) -> list[str]:
    """Sizes smallest first (fewest non-embedding parameters, then name)."""
    if schema.M_PARAMS_NON_EMB in df:
        params = df.groupby(schema.TAG_SIZE)[schema.M_PARAMS_NON_EMB].min()
        return sorted(params.index, key=lambda s: (np.nan_to_num(params[s], nan=np.inf), s))
    return sorted(df[schema.TAG_SIZE].unique())


def pareto_figure(ok: pd.DataFrame, cost: str, xlabel: str, colours: dict | None = None) -> Figure | None:
    """Perplexity against one cost, one panel per size (models compete at equal size): every point the mean
    +- std over seeds in its variant's colour, trained points filled circles, evaluation variants hollow
    diamonds; each panel's front drawn as dashed grey steps, its points labelled with their variant (and the
    other points too, in a lighter grey, where their label fits, when the panel has at most LABEL_ALL_UP_TO
    points)."""
    points = pareto_points(ok).dropna(subset=[cost, schema.M_VAL_PPL]) if len(ok) else pd.DataFrame()
    if points.empty:
        return None
    colours = _colours_for(points["variant"], colours)
    sizes = _size_order(points)
    plotted = [v for v in colours if v in set(points["variant"])]
    handles = [Patch(color=colours[v], label=v) for v in plotted]
    kinds = set(points["point"])
    handles += [Line2D([], [], marker=MARKERS[TRAINED], ls="", color="k", label="trained at the variant")] \
        if TRAINED in kinds else []
    handles += [Line2D([], [], marker=MARKERS[EVALUATED], ls="", color="k", mfc="none",
                       label="evaluated at the variant (trained as another)")] if EVALUATED in kinds else []
    handles += [Line2D([], [], color=FRONT_COLOUR, ls=FRONT_STYLE,
                       label=f"Pareto front of the size ({FRONT_COLOUR_NAME}, {FRONT_STYLE_NAME})")]
    ncol = 3 if len(handles) > 6 else 2
    legend_h = 0.3 + 0.2 * -(-len(handles) // ncol)
    cols = min(len(sizes), 2)
    rows = -(-len(sizes) // cols)
    fig = Figure(figsize=(6.4 * cols, 4.8 * rows + legend_h))
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    panels = []
    for ax, size in zip(axes, sizes):
        here = points[points[schema.TAG_SIZE] == size]
        for (variant, point), g in here.groupby(["variant", "point"]):
            c = colours[variant]
            mark(ax.errorbar(g[cost], g[schema.M_VAL_PPL], yerr=g[schema.M_VAL_PPL + " std"].fillna(0.0),
                             fmt=MARKERS[point], color=c, mfc=c if point == TRAINED else "none", ms=5, capsize=2,
                             alpha=0.9, lw=0.8), variant)
        front = pareto_front(here, cost)
        ax.step(front[cost], front[schema.M_VAL_PPL], where="post", color=FRONT_COLOUR, ls=FRONT_STYLE, lw=1.0)
        params = here[schema.M_PARAMS_NON_EMB]
        span = fmt.num(params.min()) if fmt.num(params.min()) == fmt.num(params.max()) else \
            f"{fmt.num(params.min())}-{fmt.num(params.max())}"
        ax.set_title(f"{size}: {span} non-embedding parameters", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=8)
        ax.set_ylabel("validation perplexity (per token)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        panels.append((ax, here, front))
    for ax in axes[len(sizes):]:
        ax.set_visible(False)
    fig.legend(handles=handles, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=legend_h / (4.8 * rows + legend_h) + 0.07 / rows, hspace=0.35, wspace=0.25)
    # Labels go on once limits and layout are final: their placement is measured on the drawn figure.
    for ax, here, front in panels:
        freeze_log_limits(ax, pad=0.12)
        # The front's points first (placed nearest, always), then, in a panel of few points, every other
        # point whose label fits without covering anything.
        keys = ["variant", "point", "trained_as"]
        others = here.merge(front[keys], on=keys, how="left", indicator=True)
        others = others[others["_merge"] == "left_only"] if len(here) <= LABEL_ALL_UP_TO else others.iloc[:0]
        labels = [(r[cost], r[schema.M_VAL_PPL], _point_label(r), colours[r["variant"]], text, optional)
                  for rows, text, optional in ((front, LABEL_COLOUR, False), (others, OFF_FRONT_LABEL_COLOUR, True))
                  for _, r in rows.iterrows()]
        xs, ys = front[cost].to_numpy(), front[schema.M_VAL_PPL].to_numpy()
        steps = [seg for i in range(len(xs) - 1)
                 for seg in (((xs[i], ys[i]), (xs[i + 1], ys[i])), ((xs[i + 1], ys[i]), (xs[i + 1], ys[i + 1])))]
        std = here[schema.M_VAL_PPL + " std"].fillna(0.0)
        bars = [((x, y - e), (x, y + e)) for x, y, e in zip(here[cost], here[schema.M_VAL_PPL], std) if e > 0]
        place_labels(ax, labels, obstacles=list(zip(here[cost], here[schema.M_VAL_PPL])), lines=steps + bars)
    return fig


def gap_figure(gap: pd.DataFrame, title: str, colours: dict | None = None) -> Figure | None:
    """Horizontal bars of % perplexity difference with 95% intervals across seeds, grouped by size (smallest
    first, a bold heading per size) and sorted by variant within a size, each bar in its variant's colour."""
    if gap.empty:
        return None
    colours = _colours_for(gap["variant"], colours)
    order = {s: i for i, s in enumerate(_size_order(gap.rename(columns={"params": schema.M_PARAMS_NON_EMB})))}
    df = gap.assign(_o=gap[schema.TAG_SIZE].map(order)).sort_values(["_o", "variant", "reference"], kind="stable")
    labels, heads, rows = [], [], []
    for _, g in df.groupby("_o", sort=True):
        heads.append(len(labels))
        labels.append(str(g[schema.TAG_SIZE].iloc[0]))
        for _, r in g.iterrows():
            rows.append((len(labels), r))
            labels.append(f"{r['variant']} vs {r['reference']}")
    fig = Figure(figsize=(7.5, 0.32 * len(labels) + 1.6))
    ax = fig.subplots()
    for pos, r in rows:
        lo, hi = r["pct_mean"] - r["pct_lo"], r["pct_hi"] - r["pct_mean"]
        err = np.nan_to_num([[lo], [hi]]) if np.isfinite([lo, hi]).all() else None
        mark(ax.barh(pos, r["pct_mean"], xerr=err, color=colours[r["variant"]], alpha=0.85, capsize=3,
                     height=0.7), r["variant"])
        end = max(r["pct_mean"], r["pct_hi"]) if np.isfinite(r["pct_hi"]) else r["pct_mean"]
        ax.annotate(fmt.pct(r["pct_mean"], r["pct_lo"], r["pct_hi"]), (max(end, 0), pos), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=7, color=LABEL_COLOUR)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7.5)
    for i, tick in enumerate(ax.get_yticklabels()):
        if i in heads:
            tick.set_fontweight("bold")
    ax.invert_yaxis()   # the smallest size on top
    lo, hi = ax.get_xlim()
    ax.set_xlim(lo, hi + 0.35 * (hi - lo))   # room for the value labels
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


def report_colours(ok: pd.DataFrame) -> dict:
    """The report's one variant -> colour mapping: every trained variant (the strongest colours) and every
    evaluation variant."""
    if ok.empty:
        return {}
    trained = set(ok["variant"])
    return variant_colours(trained | set(pareto_points(ok)["variant"]), first=trained)


PARETO_CAPTION = ("Perplexity against {what}, one panel per size: each variant in its own colour (legend), "
                  "trained points filled circles, evaluated points hollow diamonds, bars the seed std; the "
                  f"Pareto front a {FRONT_COLOUR_NAME} {FRONT_STYLE_NAME} line. Every point of the front is "
                  f"labelled with its variant in dark grey; in a panel of at most {LABEL_ALL_UP_TO} points the "
                  "others are too, in light grey, where their label fits")
GAP_CAPTION = ", grouped by size (smallest first), each bar in its variant's colour with its 95% interval"


def draw_figures(ok: pd.DataFrame, fits: dict[str, VariantFits], gap: pd.DataFrame, iso: pd.DataFrame,
                 recall: pd.DataFrame, iso_flop: pd.DataFrame | None = None) -> list[tuple[str, Figure]]:
    """(caption, Figure) for every figure that has data, all coloured by one report_colours mapping."""
    colours = report_colours(ok)
    iso_flop = iso_flop if iso_flop is not None else pd.DataFrame()
    candidates = [
        ("Validation loss against non-embedding parameters, L(N) = E + A N^-alpha",
         lambda: scaling_figure(fits, LAW_N, "non-embedding parameters N", colours)),
        ("Validation loss against training compute, L(C) = E + A C^-gamma",
         lambda: scaling_figure(fits, LAW_C, "training compute C (FLOPs)", colours)),
        ("L(N, D) fits, observed against predicted", lambda: nd_figure(fits, colours)),
        (PARETO_CAPTION.format(what="KV-cache size"),
         lambda: pareto_figure(ok, schema.M_KV_BYTES, "KV-cache at the evaluation context (bytes, all layers)",
                               colours)),
        (PARETO_CAPTION.format(what="attention FLOPs per token"),
         lambda: pareto_figure(ok, schema.M_ATTN_FLOPS_PER_TOKEN, "attention FLOPs per token", colours)),
        ("Gap to the transformer of the same size preset" + GAP_CAPTION,
         lambda: gap_figure(gap, "vs full attention, same size preset", colours)),
        ("Attamba against the iso-KV transformer sized from it (the same KV-cache)" + GAP_CAPTION,
         lambda: gap_figure(iso, "vs iso-KV baseline, same size preset", colours)),
        ("Attamba against the iso-FLOP transformer sized from it (the same attention-layer FLOPs)" + GAP_CAPTION,
         lambda: gap_figure(iso_flop, "vs iso-FLOP baseline, same size preset", colours)),
        ("MQAR recall against chunk size P, one line per context T and L", lambda: recall_figure(recall)),
    ]
    out = []
    for caption, make in candidates:
        fig = make()
        if fig is not None:
            out.append((caption, fig))
    return out


def all_figures(ok: pd.DataFrame, fits: dict[str, VariantFits], gap: pd.DataFrame, iso: pd.DataFrame,
                recall: pd.DataFrame, iso_flop: pd.DataFrame | None = None) -> list[tuple[str, bytes]]:
    """(caption, PNG bytes) for every figure that has data."""
    return [(caption, to_png(fig)) for caption, fig in draw_figures(ok, fits, gap, iso, recall, iso_flop)]
