"""Figures a reader can read, on a real SQLite MLflow study whose Pareto points crowd together: every variant
plotted is named in its figure's legend or labels, in the one colour the report gives it everywhere; every
front point is labelled and no two labels overlap; log axes carry at least 3 labelled ticks; gap bars are
grouped by size, smallest first; captions name the front's colour and style as drawn."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from matplotlib.collections import Collection
from matplotlib.colors import to_rgb
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle
from mlflow.entities import Metric, RunTag

from pipeline import schema
from pipeline.report.compare import gap_to_transformer, iso_kv_comparison, recall_table
from pipeline.report.figures import (FRONT_COLOUR, FRONT_COLOUR_NAME, FRONT_STYLE_NAME, LABEL_ALL_UP_TO,
                                     LABEL_COLOUR, draw_figures, gap_figure, pareto_figure, report_colours)
from pipeline.report.load import load_runs
from pipeline.report.pareto import pareto_front, pareto_points
from pipeline.report.plotting import (GID, figure_texts, label_boxes, log_ticks, named_variants, place_labels,
                                      plotted_variants, variant_colours)
from pipeline.report.scaling import fit_variants
from tests.pipeline.report.test_report import _log_run, mlflow_experiment

SIZES = {"s1": 2e6, "s2": 8e6}
# variant -> (attention, P, L, ppl factor against the transformer, KV bytes per non-embedding parameter, sizes):
# KV-caches within a few % of each other, so that labels crowd.
VARIANTS = {
    "full": ("full", "", "", 1.00, 1.00, ("s1", "s2")),
    "attamba-P4-L16-cyclic": ("attamba", "4", "16", 1.12, 0.20, ("s1", "s2")),
    "attamba-P8-L16-cyclic": ("attamba", "8", "16", 1.15, 0.19, ("s1", "s2")),
    "iso_kv-F48": ("iso_kv", "", "", 1.10, 0.21, ("s2",)),
}
# The transformer's weights also evaluated through sliding windows of nearly the same KV-cache.
WINDOWS = {"swa-W40": (1.300, 0.100), "swa-W44": (1.292, 0.103), "swa-W72": (1.285, 0.106)}


@pytest.fixture(scope="module")
def ok(tmp_path_factory):
    root = tmp_path_factory.mktemp("figures")
    uri, client, exp_id = mlflow_experiment(root, "figures")
    rng = np.random.default_rng(7)
    for variant, (attention, P, L, f_ppl, f_kv, sizes) in VARIANTS.items():
        for size in sizes:
            n = SIZES[size]
            for seed in (0, 1, 2):
                loss = float(np.log(f_ppl) + 2.0 + 60.0 * n ** -0.3 + rng.normal(0, 0.005))
                rid = _log_run(client, exp_id, f"{variant}-{size}-seed{seed}", variant, attention, size, seed, P, L,
                               loss, f_kv * n, extra_tags={schema.TAG_KIND: attention})
                if variant != "full":
                    continue
                metrics, tags = [], []
                for label, (w_ppl, w_kv) in WINDOWS.items():
                    metrics += [Metric(schema.eval_variant_metric(label, "ppl"), float(np.exp(loss)) * w_ppl, 1, 200),
                                Metric(schema.eval_variant_metric(label, "kv_cache_bytes"), w_kv * n, 1, 200),
                                Metric(schema.eval_variant_metric(label, "attn_flops_per_token"), 3 * w_kv * n, 1,
                                       200)]
                    tags.append(RunTag(schema.TAG_EVAL_VARIANT_PREFIX + label, f"window={label[5:]}"))
                client.log_batch(rid, metrics=metrics, tags=tags)
    return load_runs("figures", uri).ok


@pytest.fixture(scope="module")
def figures(ok):
    fits = fit_variants(ok, n_bootstrap=0)
    return draw_figures(ok, fits, gap_to_transformer(ok), iso_kv_comparison(ok), recall_table(ok))


def _rgb(artist) -> tuple:
    if isinstance(artist, Line2D):
        return to_rgb(artist.get_color())
    if isinstance(artist, Rectangle):
        return to_rgb(artist.get_facecolor())
    if isinstance(artist, Collection):
        colours = artist.get_facecolor() if len(artist.get_facecolor()) else artist.get_edgecolor()
        return to_rgb(tuple(colours[0]))
    raise TypeError(type(artist))


def test_every_figure_names_each_variant_it_plots_in_the_reports_one_colour(ok, figures):
    colours = report_colours(ok)
    assert colours["full"] == "black" and len({to_rgb(c) for c in colours.values()}) == len(colours)
    variant_figures = 0
    for caption, fig in figures:
        plotted = plotted_variants(fig)
        if not plotted:
            continue
        variant_figures += 1
        assert named_variants(fig) == plotted, (caption, plotted - named_variants(fig), figure_texts(fig))
        for artist in fig.findobj(lambda a: (a.get_gid() or "").startswith(GID)):
            variant = artist.get_gid()[len(GID):]
            assert _rgb(artist) == pytest.approx(to_rgb(colours[variant])), (caption, variant, artist)
    # L(N), L(C), two Pareto figures, gap to the transformer, iso-KV
    assert variant_figures == 6
    pareto = [fig for caption, fig in figures if caption.startswith("Perplexity against KV-cache")][0]
    assert plotted_variants(pareto) == set(VARIANTS) | set(WINDOWS)


def test_each_front_point_is_labelled_and_no_two_labels_overlap(ok):
    fig = pareto_figure(ok, schema.M_KV_BYTES, "KV bytes")
    points = pareto_points(ok)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2
    crowded = 0
    for ax in panels:
        size = ax.get_title().split(":")[0]
        front = pareto_front(points[points[schema.TAG_SIZE] == size], schema.M_KV_BYTES)
        name = lambda r: r["variant"] if r["point"] == "trained" else f"{r['variant']} (from {r['trained_as']})"
        here = points[points[schema.TAG_SIZE] == size]
        assert len(here) <= LABEL_ALL_UP_TO and len(front) >= 4
        # Every point labelled (a panel of few points), the front's in the darker colour.
        assert sorted(t.get_text() for t in ax.texts) == sorted(name(r) for _, r in here.iterrows())
        dark = {t.get_text() for t in ax.texts if to_rgb(t.get_color()) == to_rgb(LABEL_COLOUR)}
        assert dark == {name(r) for _, r in front.iterrows()}
        boxes = label_boxes(ax)
        for a, b in itertools.combinations(boxes, 2):
            assert not a.overlaps(b), (a, b)
        # The windowed evaluations sit within 6% of each other's KV-cache: all drawn at one offset, right of
        # their points, labels collide; placed, they do not.
        naive = [ax.annotate(t.get_text(), t.xy, xytext=(6, 0), textcoords="offset points", fontsize=6.5,
                             va="center") for t in list(ax.texts)]
        naive_boxes = label_boxes(ax)[len(naive):]
        crowded += sum(a.overlaps(b) for a, b in itertools.combinations(naive_boxes, 2))
        for t in naive:
            t.remove()
    assert crowded > 0


def test_log_axes_carry_at_least_three_labelled_ticks(ok):
    fig = pareto_figure(ok, schema.M_KV_BYTES, "KV bytes")
    fig.canvas.draw()
    for ax in (a for a in fig.axes if a.get_visible()):
        for axis, (lo, hi) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            shown = [t for t in axis.get_majorticklabels() if t.get_text() and lo <= t.get_position()[
                0 if axis is ax.xaxis else 1] <= hi]
            assert len(shown) >= 3, (ax.get_title(), [t.get_text() for t in axis.get_majorticklabels()])
    # The study's perplexities span well under a decade: matplotlib's own log ticks would label one value.
    assert ok[schema.M_VAL_PPL].max() / ok[schema.M_VAL_PPL].min() < 2


@pytest.mark.parametrize("lo, hi", [(95.0, 130.0), (5e4, 1.0e5), (1.0e3, 1.0e7), (2.41, 2.47), (0.9, 1.1)])
def test_log_ticks_label_at_least_three_values_inside_any_range(lo, hi):
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    ax.set_xscale("log")
    ticks = log_ticks(ax.xaxis, lo, hi)
    assert 3 <= len(ticks) <= 8 and all(lo <= t <= hi for t in ticks) and len(set(ticks)) == len(ticks)
    labels = [ax.xaxis.get_major_formatter()(t, i) for i, t in enumerate(ticks)]
    assert len(set(labels)) == len(labels) and all(len(label) <= 5 for label in labels), labels


def test_labels_of_points_on_top_of_each_other_are_spread_apart():
    from matplotlib.figure import Figure

    ax = Figure(figsize=(5, 4)).subplots()
    xs, ys = np.full(8, 1.0) + np.arange(8) * 1e-3, np.full(8, 1.0)
    ax.scatter(xs, ys)
    ax.set_xlim(0.5, 1.5)
    ax.set_ylim(0.5, 1.5)
    place_labels(ax, [(x, y, f"variant number {i}", "k") for i, (x, y) in enumerate(zip(xs, ys))],
                 obstacles=list(zip(xs, ys)))
    boxes = label_boxes(ax)
    assert len(boxes) == 8
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)


def test_gap_bars_are_grouped_by_size_smallest_first_and_sorted_within(ok):
    gap = gap_to_transformer(ok)
    fig = gap_figure(gap, "t", variant_colours(gap["variant"]))
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    bold = [t.get_fontweight() == "bold" for t in fig.axes[0].get_yticklabels()]
    assert [lab for lab, b in zip(labels, bold) if b] == ["s1", "s2"]
    s2 = labels.index(next(lab for lab, b in zip(labels, bold) if b and lab.startswith("s2")))
    expected_s1 = sorted(f"{v} vs full" for v in gap[gap[schema.TAG_SIZE] == "s1"]["variant"])
    expected_s2 = sorted(f"{v} vs full" for v in gap[gap[schema.TAG_SIZE] == "s2"]["variant"])
    assert labels[1:s2] == expected_s1 and labels[s2 + 1:] == expected_s2
    bars = fig.findobj(Rectangle)
    assert {b.get_gid() for b in bars if b.get_gid()} == {GID + v for v in gap["variant"]}


def test_captions_say_the_fronts_colour_and_style_as_drawn(figures):
    for caption, fig in figures:
        if not caption.startswith("Perplexity against"):
            continue
        assert f"Pareto front a {FRONT_COLOUR_NAME} {FRONT_STYLE_NAME} line" in caption and "black" not in caption
        fronts = [line for ax in fig.axes for line in ax.lines if line.get_drawstyle() == "steps-post"]
        assert fronts and all(to_rgb(line.get_color()) == to_rgb(FRONT_COLOUR) and line.get_linestyle() == "--"
                              for line in fronts)
        assert to_rgb(FRONT_COLOUR) != (0.0, 0.0, 0.0)   # not the transformer's black
