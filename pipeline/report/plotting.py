"""What every report figure shares: one colour per variant for the whole report, log axes with enough
labelled ticks, labels placed next to their points without overlapping, and the names a figure shows.

Artists that draw a variant carry the gid `variant:<name>` (`mark`), so a test (or a reader of the code)
can tell which variants a figure plotted and check that its legend or labels name each of them
(`named_variants`).
"""
from __future__ import annotations

import math

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import Container
from matplotlib.figure import Figure
from matplotlib.text import Text
from matplotlib.transforms import Bbox
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter

from pipeline.report import fmt

GID = "variant:"
TRANSFORMER_COLOUR = "black"
# Kinds in the order their variants take colours: the transformer first (always black), then Attamba.
KIND_ORDER = ("full", "attamba", "swa", "iso_kv", "iso_flop", "iso_param")


def variant_kind(variant: str) -> str:
    """The kind a variant label starts with (ModelConfig.variant(): "iso_flop-F48-W33" -> "iso_flop")."""
    for kind in sorted(KIND_ORDER, key=len, reverse=True):
        if variant == kind or variant.startswith(kind + "-"):
            return kind
    return "other"


def _palette() -> list:
    """Distinct colours, strongest first: tab10 without its grey, Dark2, Set1 without its yellow (25), then
    tab20's light shades without grey, tab20b and tab20c (74 in all)."""
    tab10 = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    set1 = [c for i, c in enumerate(colormaps["Set1"].colors) if i != 5]
    light = [c for i, c in enumerate(colormaps["tab20"].colors) if i % 2 and i != 15]
    return (tab10 + list(colormaps["Dark2"].colors) + set1 + light + list(colormaps["tab20b"].colors)
            + list(colormaps["tab20c"].colors))


def variant_colours(variants, first=()) -> dict[str, tuple]:
    """One colour per variant, for every figure of a report: the plain transformer ("full") black, the others
    each its own colour (repeating only past 74 variants), those in `first` (a report's trained variants)
    taking the strongest colours; within each group in KIND_ORDER, then by name."""
    colours = _palette()
    first = set(first)

    def order(v):
        kind = variant_kind(v)
        return (v not in first, KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), v)

    out, i = {}, 0
    for name in sorted(set(variants), key=order):
        if name == "full":
            out[name] = TRANSFORMER_COLOUR
        else:
            out[name] = colours[i % len(colours)]
            i += 1
    return out


def mark(artists, variant: str) -> None:
    """Tag the artists (lines, an errorbar or bar container, collections) that draw `variant`."""
    for artist in artists if isinstance(artists, list) else [artists]:
        for child in artist.get_children() if isinstance(artist, Container) else [artist]:
            child.set_gid(GID + variant)


def plotted_variants(fig: Figure) -> set[str]:
    return {a.get_gid()[len(GID):] for a in fig.findobj() if (a.get_gid() or "").startswith(GID)}


def figure_texts(fig: Figure) -> list[str]:
    """Every text a reader sees: legends, tick labels, annotations, titles."""
    out = []
    for legend in list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]:
        out += [t.get_text() for t in legend.get_texts()]
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        out += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        out += [t.get_text() for t in ax.texts]
    return [t for t in out if t]


def named_variants(fig: Figure) -> set[str]:
    """The plotted variants that some text names: equal to it, or starting it ("v vs ref", "v: E=..",
    "v (from w)")."""
    texts = figure_texts(fig)
    return {v for v in plotted_variants(fig)
            if any(t == v or t.startswith(v + " ") or t.startswith(v + ":") for t in texts)}


# ---------------------------------------------------------------- log axes

def _tick_text(v: float) -> str:
    text = fmt.num(v)
    if "." in text and "e" not in text:
        unit = text[-1] if text[-1].isalpha() else ""
        body = text[:-1] if unit else text
        text = body.rstrip("0").rstrip(".") + unit
    return text


def log_ticks(axis, lo: float, hi: float, most: int = 8) -> list[float]:
    """Put at least 3 labelled ticks on a log `axis` showing [lo, hi] (when lo < hi): powers of ten, else
    1-2-5 steps, else 1..9 steps, else evenly spaced round values. Labels are short (`200k`, `1.5`)."""
    if not (lo > 0 and hi > lo and math.isfinite(hi)):
        return []
    k0, k1 = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    ticks = []
    for subs in ((1,), (1, 2, 5), (1, 2, 3, 5, 7), tuple(range(1, 10))):
        ticks = [m * 10.0 ** k for k in range(k0, k1 + 1) for m in subs if lo <= m * 10.0 ** k <= hi]
        if len(ticks) >= 3:
            break
    if len(ticks) < 3:
        ticks = [t for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    if len(ticks) < 3:
        ticks = [float(f"{t:.2g}") for t in np.geomspace(lo, hi, 3)]
    while len(ticks) > most:
        ticks = ticks[::2]
    axis.set_major_locator(FixedLocator(ticks))
    axis.set_major_formatter(FuncFormatter(lambda v, _: _tick_text(v)))
    axis.set_minor_formatter(NullFormatter())
    return ticks


def freeze_log_limits(ax, pad: float = 0.08) -> None:
    """Fix both log axes' limits (with a margin of `pad` of each span, in log space) and tick them."""
    for axis, get, set_ in ((ax.xaxis, ax.get_xlim, ax.set_xlim), (ax.yaxis, ax.get_ylim, ax.set_ylim)):
        lo, hi = get()
        if lo > 0 and hi > lo:
            span = math.log10(hi / lo)
            lo, hi = lo / 10 ** (pad * span), hi * 10 ** (pad * span)
            set_(lo, hi)
            log_ticks(axis, lo, hi)


# ---------------------------------------------------------------- labels without overlap

# Offsets (points) tried around a point, nearest first, in 16 directions (right, above, left, below first);
# past the first ring a leader line joins label and point.
_DIRECTIONS = [(1, 0), (0, 1), (-1, 0), (0, -1), (1, 1), (-1, 1), (-1, -1), (1, -1),
               (2, 1), (1, 2), (-1, 2), (-2, 1), (-2, -1), (-1, -2), (1, -2), (2, -1)]
_RADII = (6, 14, 24, 36, 50, 66, 84, 110, 140)
# What a label may not cover, by weight: another label, a point, the outside of the axes, a leader line
# crossing a label or another leader, a drawn line (the front) under the label.
# A label nearer to another point than to its own (and without a leader line) reads as that point's.
_W_LABEL, _W_POINT, _W_OUTSIDE, _W_CROSS, _W_LINE, _W_AMBIGUOUS = 10.0, 5.0, 10.0, 400.0, 1.0, 300.0


def _text_box(ann, renderer):
    """An annotation's text box in display coordinates, without its leader line (its position is worked
    out at draw time: update it first)."""
    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _renderer(fig: Figure):
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    return fig.canvas.get_renderer()


def _overlap(a, b) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return w * h if w > 0 and h > 0 else 0.0


def _segment_in_box(p, q, box, samples: int = 24) -> float:
    """Roughly how much of the segment p-q (display coordinates) lies inside `box`, in pixels."""
    t = np.linspace(0.0, 1.0, samples)
    x, y = p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])
    inside = (x > box.x0) & (x < box.x1) & (y > box.y0) & (y < box.y1)
    return float(inside.mean() * math.hypot(q[0] - p[0], q[1] - p[1]))


def _cross(p, q, r, s) -> bool:
    """Whether the segments p-q and r-s cross (touching at an end does not count)."""
    def orient(a, b, c):
        return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])
    d1, d2, d3, d4 = orient(p, q, r), orient(p, q, s), orient(r, s, p), orient(r, s, q)
    return d1 * d2 < 0 and d3 * d4 < 0


def _distance(point, box) -> float:
    return math.hypot(max(box.x0 - point[0], 0.0, point[0] - box.x1), max(box.y0 - point[1], 0.0, point[1] - box.y1))


def _leader(point, box) -> tuple:
    """The leader line's segment: from the point to the nearest point of the label's box."""
    return point, (min(max(point[0], box.x0), box.x1), min(max(point[1], box.y0), box.y1))


LABEL_COLOUR = "#222222"
CLOSE_PX = 12.0   # a point this near another gets its label on a leader line (in its colour) for sure


def _annotate(ax, text, x, y, ox, oy, fontsize, colour, leader, text_colour=LABEL_COLOUR):
    dx, dy = np.sign(ox), np.sign(oy)
    arrow = {"arrowstyle": "-", "lw": 0.9, "color": colour, "shrinkA": 0, "shrinkB": 2} if leader else None
    return ax.annotate(text, (x, y), xytext=(ox, oy), textcoords="offset points", fontsize=fontsize,
                       color=text_colour,
                       ha="left" if dx > 0 else "right" if dx < 0 else "center",
                       va="bottom" if dy > 0 else "top" if dy < 0 else "center", arrowprops=arrow)


def place_labels(ax, labels: list[tuple], obstacles: list[tuple[float, float]] = (),
                 lines: list[tuple[tuple[float, float], tuple[float, float]]] = (), fontsize: float = 6.5) -> list:
    """Annotate each (x, y, text, colour[, text colour[, optional]]) point with its text (`colour` is its
    leader line's; the text is LABEL_COLOUR unless given; an optional label is left out unless it fits
    without any cost). Greedy, in the order given: label by label, the offset (nearest
    first) whose box covers no placed label, no `obstacles` point and nothing outside the axes, and whose
    leader line crosses no placed label or leader, and that is nearer to its own point than to any other;
    failing that, the offset that costs least (weights _W_*). `lines`
    (segments in data coordinates, e.g. a drawn front) count lightly against covering them. A label set
    away from its point, or of a point within CLOSE_PX of another, gets a leader line. Call once the axes' limits and the figure's layout are final."""
    fig = ax.figure
    renderer = _renderer(fig)
    frame = ax.get_window_extent(renderer)
    to_px = ax.transData.transform
    dot = 3.5 * fig.dpi / 72.0
    dots = [to_px((x, y)) for x, y in obstacles]
    dot_boxes = [Bbox.from_extents(u - dot, v - dot, u + dot, v + dot) for u, v in dots]
    drawn = [(to_px(a), to_px(b)) for a, b in lines]
    boxes, leaders, out = [], [], []
    for x, y, text, colour, *rest in labels:
        text_colour = rest[0] if rest else LABEL_COLOUR
        optional = len(rest) > 1 and rest[1]
        point = to_px((x, y))
        crowded = any(1 < math.dist(d, point) < CLOSE_PX * fig.dpi / 72.0 for d in dots)
        best = None
        for radius in _RADII[1:] if crowded else _RADII:
            for dx, dy in _DIRECTIONS:
                norm = math.hypot(dx, dy)
                ox, oy = radius * dx / norm, radius * dy / norm
                ann = _annotate(ax, text, x, y, ox, oy, fontsize, colour, False)
                box = _text_box(ann, renderer).expanded(1.06, 1.15)
                ann.remove()
                leader = _leader(point, box) if radius > _RADII[0] else None
                cost = _W_LABEL * sum(_overlap(box, b) for b in boxes)
                cost += _W_POINT * sum(_overlap(box, b) for b in dot_boxes)
                cost += _W_OUTSIDE * (box.width * box.height - _overlap(box, frame))
                cost += _W_LINE * sum(_segment_in_box(p, q, box) for p, q in drawn)
                cost += _W_CROSS * sum(_segment_in_box(p, q, box) > 0 for p, q in leaders)
                own = _distance(point, box)
                cost += _W_AMBIGUOUS * sum(_distance(d, box) < own for d in dots if math.dist(d, point) > 1)
                if leader:
                    cost += _W_CROSS * sum(_segment_in_box(*leader, b) > 1 for b in boxes)
                    cost += _W_CROSS * sum(_cross(*leader, p, q) for p, q in leaders)
                if best is None or cost < best[0]:
                    best = (cost, ox, oy, radius, box, leader)
                if cost == 0:
                    break
            if best[0] == 0:
                break
        cost, ox, oy, radius, box, leader = best
        if optional and cost > 0:
            continue
        out.append(_annotate(ax, text, x, y, ox, oy, fontsize, colour, leader is not None, text_colour))
        boxes.append(box)
        if leader:
            leaders.append(leader)
    return out


def label_boxes(ax) -> list:
    """The window extents of the axes' annotation texts (without leader lines): for overlap checks."""
    renderer = _renderer(ax.figure)
    return [_text_box(t, renderer) for t in ax.texts]
