"""Does context matter here? The transformer's context use from its windowed evaluations, the loss by position,
and the claims gated on it, through the real report code on real SQLite MLflow stores: one where every window
costs the transformer (verdicts as the rule gives them), one where no window does (the context-dependent claims
are "untestable here"), and the first with its windowed evaluations removed (not measured)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline import schema
from pipeline.report.claims import NOT_MEASURED, UNTESTABLE, evaluate_claims
from pipeline.report.context import (NOT_SHOWN_BELOW, NOT_SHOWN_ONE_SEED, NOT_SHOWN_SPANS, POSITION_TITLE, SHOWN,
                                     TITLE, context_section, context_uses, reading)
from tests.pipeline.report.test_claims import CONTEXT, EXPECTED, SIZES, POSITIONS, _interval, _ppl
from tests.pipeline.report.test_report import _md_section

GATED = {"attamba_vs_iso_kv", "attamba_vs_iso_kv_window", "attamba_vs_iso_flop", "cyclic_vs_uniform",
         "cyclic_vs_random", "larger_L_better", "collapse_P64_L1", "faithful_vs_released_segmentation"}




@pytest.mark.parametrize("lo, hi, n, want", [
    (0.01, 0.03, 3, SHOWN), (-0.01, 0.03, 3, NOT_SHOWN_SPANS), (-0.03, -0.01, 3, NOT_SHOWN_BELOW),
    (0.0, 0.03, 3, NOT_SHOWN_SPANS), (math.nan, math.nan, 1, NOT_SHOWN_ONE_SEED), (0.01, 0.03, 1, NOT_SHOWN_ONE_SEED),
])
def test_the_reading_of_a_context_use(lo, hi, n, want):
    assert reading(lo, hi, n) == want


@pytest.mark.parametrize("mode", ["shown", "flat"])
def test_context_use_is_the_logged_loss_difference_per_seed(mode, shown, flat):
    got = {(u.size, u.window): u for u in context_uses((shown if mode == "shown" else flat)["ok"])}
    assert set(got) == {(size, w) for size in SIZES for w, _, _ in CONTEXT[mode].values()}
    for label, (window, _, mult) in CONTEXT[mode].items():
        for size in SIZES:
            u = got[(size, window)]
            # by hand: the window's loss minus the run's, per seed; log(ppl * m) - log(ppl) = log(m)
            nats = [math.log(_ppl("full", size, s) * mult[s]) - math.log(_ppl("full", size, s)) for s in (0, 1, 2)]
            assert (u.nats, u.nats_lo, u.nats_hi) == pytest.approx(_interval(nats), rel=1e-6)
            assert (u.pct, u.pct_lo, u.pct_hi) == pytest.approx(_interval([100 * (mult[s] - 1) for s in (0, 1, 2)]),
                                                                rel=1e-6)
            assert (u.label, u.transformer, u.n) == (label, "full", 3)
            assert u.reading == (SHOWN if mode == "shown" else NOT_SHOWN_SPANS)


def test_context_shown_leaves_the_verdicts_as_the_rule_gives_them(shown):
    claims = shown["claims"]
    assert {cid: c.verdict for cid, c in claims.items()} == EXPECTED
    # gated on beyond L where the study measured it (L=32: a window of 33 keys), else beyond 40 keys (L=8)
    window = claims["attamba_vs_iso_kv_window"]
    assert window.needs_context and window.context_use.startswith("context use beyond L=32 (a window of 33 keys) at s2")
    assert window.context_use.endswith(f": {SHOWN}")
    uniform = claims["cyclic_vs_uniform"]
    assert uniform.context_use.startswith("context use beyond 40 keys at s2")
    assert uniform.context_use.endswith("(beyond L=8 not measured, so beyond 40 keys is used)")
    # larger L: the smaller L of the pair (8) decides what must matter
    assert all("beyond L=8 not measured" in e.context_use for e in claims["larger_L_better"].estimates)
    for cid in ("attamba_vs_full", "attamba_vs_full_5pct"):
        assert not claims[cid].needs_context and claims[cid].context_use == "" and claims[cid].context_why
    assert {cid for cid, c in claims.items() if c.needs_context} == GATED
    assert all(c.context_why for c in claims.values())


def test_context_not_shown_makes_the_context_dependent_claims_untestable(shown, flat):
    claims = flat["claims"]
    want = {cid: (UNTESTABLE if cid in GATED and v != NOT_MEASURED else v) for cid, v in EXPECTED.items()}
    assert {cid: c.verdict for cid, c in claims.items()} == want
    iso = claims["attamba_vs_iso_kv"]
    assert iso.reason.startswith("context use beyond ") and "not shown (interval includes 0)" in iso.reason
    # at s2 the L=32 comparison reads its own window (33 keys), the L=8 ones 40 keys: the first untestable is quoted
    assert iso.reason.startswith("context use beyond L=32 (a window of 33 keys) at s2")
    assert "nothing beyond L=32 (a window of 33 keys) is shown to matter at this budget (2 of 2 comparisons" in iso.reason
    uniform = claims["cyclic_vs_uniform"]
    assert uniform.reason.endswith("(beyond L=8 not measured, so beyond 40 keys is used): nothing beyond 40 keys is "
                                   "shown to matter at this budget")
    # the estimates are still listed, with the numbers the context-shown study gives, and what the interval said
    before = {(e.size, e.a, e.b): e for e in shown["claims"]["attamba_vs_iso_kv"].estimates}
    assert len(iso.estimates) == len(before) > 0
    for e in iso.estimates:
        twin = before[(e.size, e.a, e.b)]
        assert (e.pct, e.lo, e.hi) == (twin.pct, twin.lo, twin.hi)
        assert e.verdict == UNTESTABLE and f"the interval alone: {twin.verdict} ({twin.reason})" in e.reason
    data = json.loads((flat["out"] / "claims.json").read_text())
    assert {c["id"]: c["verdict"] for c in data["claims"]} == {**want, "attamba_keeps_recall": NOT_MEASURED}
    assert "untestable here" in data["rule"] and "context" in data["rule"]
    assert all(c["context_use"] for c in data["claims"] if c["id"] in GATED and c["verdict"] == UNTESTABLE)
    md = (flat["out"] / "summary.md").read_text()
    rows = {r["claim"]: r for r in _md_section(md, "Claims: the paper's, recomputed from this study (rule in claims.json)")}
    # the measured claims are rows; the ones not measured share one line (pipeline/report/front.py)
    assert {cid: r["verdict"] for cid, r in rows.items()} == {c: v for c, v in want.items() if v != "not measured"}
    missing = [c for c, v in want.items() if v == "not measured"] + ["attamba_keeps_recall"]   # a text study
    assert f"Not measured ({len(missing)}): " + missing[0] in md
    assert "Nothing beyond 33 keys is shown to matter at s2." in md.split(f"## {TITLE}\n", 1)[1]


def test_context_not_measured_makes_them_untestable_too(shown):
    ok = shown["ok"].drop(columns=[c for c in shown["ok"].columns if "/swa-W" in c])
    claims = {c.id: c for c in evaluate_claims(ok)}
    for cid in GATED - {"collapse_P64_L1"}:
        assert claims[cid].verdict == UNTESTABLE, cid
        assert claims[cid].context_use.startswith("context use not measured at ")
        assert "whether anything beyond the window matters is unknown" in claims[cid].reason
    assert claims["attamba_vs_full"].verdict == EXPECTED["attamba_vs_full"]
    section = context_section(ok, list(claims.values())).sections[TITLE]
    assert section.empty and section.attrs["note"].startswith("Context use: not measured (no full transformer")


def test_the_section_opens_the_report_with_tables_and_a_figure(shown):
    out = shown["out"]
    md = (out / "summary.md").read_text()
    assert md.index(f"## {TITLE}\n") < md.index("## What was measured\n") < md.index("## Claims: the paper's")
    html = (out / "report.html").read_text()
    assert html.index(TITLE) < html.index("What was measured")
    rows = _md_section(md, TITLE)
    assert {(r["size"], r["window (keys)"], r["reading"]) for r in rows} == {(s, str(w), SHOWN) for s in SIZES
                                                                          for w in (33, 40)}
    row = next(r for r in rows if r["size"] == "s2" and r["window (keys)"] == "40")
    mean, lo, hi = _interval([math.log(CONTEXT["shown"]["swa-W40"][2][s]) for s in (0, 1, 2)])
    assert row["context use (nats)"] == f"{mean:+.3g}" and row["95% interval (nats)"] == f"[{lo:.3g}, {hi:.3g}]"
    assert row["beyond"] == "40 keys"
    assert next(r for r in rows if r["window (keys)"] == "33")["beyond"] == "L=32 (a window of 33 keys)"
    reading_line = md.split(f"## {TITLE}\n", 1)[1].strip().splitlines()[0]
    assert reading_line.startswith("At the largest size measured, s2: context use beyond L=32 (a window of 33 keys)")
    assert "beyond L=8, L=64 (a window of L + 1 keys): not measured" in reading_line
    assert "Context beyond a window of 33 keys is shown to matter at s2." in reading_line
    # loss by position: the mean over seeds with its 95% interval, per configuration and bucket
    positions = _md_section(md, POSITION_TITLE)
    full = next(r for r in positions if r["variant"] == "full" and r["size"] == "s1")
    mean, lo, hi = _interval([math.log(_ppl("full", "s1", s)) + POSITIONS["loss_pos_9-32"] for s in (0, 1, 2)])
    assert full["loss at 9-32"] == f"{mean:.3g} [{lo:.3g}, {hi:.3g}]" and full["point"] == "trained"
    through = next(r for r in positions if r["variant"] == "swa-W40" and r["size"] == "s1")
    assert (through["point"], through["trained as"]) == ("evaluated", "full")
    assert through["loss at 1-8"] == full["loss at 1-8"] != through["loss at 9-32"]
    figure = next(p for p in (out / "figures").glob("*loss-by-position*.png"))
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"(figures/{figure.name})" in md
    data = json.loads((out / "claims.json").read_text())["context_use"]
    assert data["reading"] == reading_line.split(" Claims whose mechanism")[0]
    assert len(data["uses"]) == len(rows) and {u["reading"] for u in data["uses"]} == {SHOWN}
    assert np.isfinite([u["nats_lo"] for u in data["uses"]]).all()
