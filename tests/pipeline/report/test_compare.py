"""Comparisons on a real SQLite MLflow store: verdicts from seed-paired Student-t intervals, Welch where seeds
do not pair, references matched by the `kind` tag (an iso-FLOP run is never the iso-KV reference), and both
parameter counts beside every comparison."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pipeline import schema
from pipeline.report import make_report
from pipeline.report.build import GAP_TITLE
from pipeline.report.fmt import parse
from pipeline.report.compare import ONE_SEED, paired_pct, pct_difference
from tests.pipeline.report.test_report import _log_run, _md_section, mlflow_experiment

FULL_LOSS = {0: 2.50, 1: 2.51, 2: 2.49}
KV, ATTN_FLOPS, PARAMS, FULL_PARAMS = 1e6, 3e6, 8e6, 9.7e6
ATTAMBA = {  # variant -> {seed: loss}
    "attamba-P4-L8-cyclic": {s: FULL_LOSS[s] - 0.05 + d for s, d in zip(FULL_LOSS, (0.001, -0.002, 0.001))},
    "attamba-P8-L8-cyclic": {s: FULL_LOSS[s] + 0.05 + d for s, d in zip(FULL_LOSS, (0.001, -0.002, 0.001))},
    "attamba-P16-L8-cyclic": {s: FULL_LOSS[s] + d for s, d in zip(FULL_LOSS, (0.02, -0.03, 0.005))},
    "attamba-P32-L8-cyclic": {0: FULL_LOSS[0] + 0.03},
    "attamba-P4-L8-uniform": {10: 2.45, 11: 2.465, 12: 2.44},    # seeds that pair with nothing
}
BASELINES = {  # variant -> (kind, KV bytes, attention FLOPs per token, non-embedding params, loss offset)
    "iso_kv-F96": ("iso_kv", 3 * KV, 9e6, PARAMS, 0.08),
    "iso_flop-F64": ("iso_flop", KV, 3.3e6, 7e6, 0.02),          # the iso-KV closest by KV bytes, were kind ignored
    "iso_flop-F128": ("iso_flop", 2 * KV, 3e7, 9e6, 0.01),
    "iso_param-F200": ("iso_param", 4 * KV, 1.2e7, 9.6e6, -0.01),
}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    uri, client, exp_id = mlflow_experiment(root, "compare-study")
    for seed, loss in FULL_LOSS.items():   # logged before the kind tag existed: matched by their attention tag
        _log_run(client, exp_id, f"full-s2-seed{seed}", "full", "full", "s2", seed, "", "", loss, 8 * KV,
                 overrides={schema.M_PARAMS_NON_EMB: FULL_PARAMS})
    for variant, losses in ATTAMBA.items():
        P = variant.split("-")[1][1:]
        for seed, loss in losses.items():
            _log_run(client, exp_id, f"{variant}-s2-seed{seed}", variant, "attamba", "s2", seed, P, "8", loss, KV,
                     extra_tags={schema.TAG_KIND: "attamba"})
    for variant, (kind, kv, flops, params, offset) in BASELINES.items():
        for seed, loss in FULL_LOSS.items():
            _log_run(client, exp_id, f"{variant}-s2-seed{seed}", variant, "iso_kv", "s2", seed, "", "",
                     loss + offset, kv, extra_tags={schema.TAG_KIND: kind},
                     overrides={schema.M_ATTN_FLOPS_PER_TOKEN: flops, schema.M_PARAMS_NON_EMB: params})
    out = root / "out"
    make_report("compare-study", out, tracking_uri=uri, n_bootstrap=0)
    return {"md": (out / "summary.md").read_text(), "json": json.loads((out / "fits.json").read_text())}


def _interval(text: str) -> tuple[float, float]:
    lo, hi = text.strip("[]").split(", ")
    return parse(lo), parse(hi)


def _ppl(losses: dict) -> dict:
    return {s: float(np.exp(v)) for s, v in losses.items()}


def test_gap_verdicts_and_paired_student_t(study):
    rows = {r["variant"]: r for r in _md_section(study["md"], GAP_TITLE)}
    assert rows["attamba-P4-L8-cyclic"]["verdict"] == "better"
    assert rows["attamba-P8-L8-cyclic"]["verdict"] == "worse"
    assert rows["attamba-P16-L8-cyclic"]["verdict"] == "inconclusive"
    one = rows["attamba-P32-L8-cyclic"]
    assert one["verdict"] == "one seed: no interval" and one["95% interval"] == "no interval" and one["pairs"] == "1"
    full = _ppl(FULL_LOSS)
    for variant in ("attamba-P4-L8-cyclic", "attamba-P8-L8-cyclic", "attamba-P16-L8-cyclic"):
        row, ppl = rows[variant], _ppl(ATTAMBA[variant])
        pct = np.array([100 * (ppl[s] / full[s] - 1) for s in sorted(ppl)])
        ci = stats.ttest_1samp(pct, 0.0).confidence_interval(0.95)
        # Printed with 3 significant figures: equal to a relative 5e-3.
        assert parse(row["ppl diff %"]) == pytest.approx(pct.mean(), rel=5e-3)
        assert _interval(row["95% interval"]) == pytest.approx((ci.low, ci.high), rel=5e-3)
        assert row["pairs"] == "3" and row["paired by seed"] == "True" and row["runs"] == "3 vs 3"
        # Equal size, unequal parameter counts: both shown, with their ratio.
        assert (parse(row["params"]), parse(row["ref params"])) == (PARAMS, FULL_PARAMS)
        assert parse(row["params ratio"]) == pytest.approx(PARAMS / FULL_PARAMS, rel=5e-3)


def test_unpaired_seeds_fall_back_to_welch(study):
    row = {r["variant"]: r for r in _md_section(study["md"], GAP_TITLE)}[
        "attamba-P4-L8-uniform"]
    a = np.array(list(ATTAMBA["attamba-P4-L8-uniform"].values()))     # log ppl = loss
    b = np.array(list(FULL_LOSS.values()))
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert row["paired by seed"] == "False" and row["pairs"] == "0" and row["runs"] == "3 vs 3"
    assert parse(row["ppl diff %"]) == pytest.approx(100 * np.expm1(a.mean() - b.mean()), rel=5e-3)
    assert _interval(row["95% interval"]) == pytest.approx((100 * np.expm1(ci.low), 100 * np.expm1(ci.high)),
                                                           rel=5e-3)
    record = next(r for r in study["json"]["gap_to_transformer"] if r["variant"] == "attamba-P4-L8-uniform")
    assert record["method"] == "Welch (unpaired)"


def test_unpaired_differences_are_one_per_run_not_every_pair():
    runs = pd.DataFrame({schema.TAG_SEED: [5.0, 6.0], schema.M_VAL_PPL: [10.0, 11.0]})
    ref = pd.DataFrame({schema.TAG_SEED: [0.0, 1.0, 2.0], schema.M_VAL_PPL: [10.0, 10.5, 11.0]})
    pct, paired = paired_pct(runs, ref)
    assert not paired and len(pct) == 2
    lone = pct_difference(runs.iloc[:1], ref)
    assert lone["method"] == "Welch (unpaired)" and lone["verdict"] == ONE_SEED and np.isnan(lone["pct_lo"])


def test_iso_kv_never_picks_an_iso_flop_run(study):
    iso = _md_section(study["md"], "Iso-KV comparison (the iso-KV baseline sized from each Attamba, same size)")
    assert {r["variant"] for r in iso} == set(ATTAMBA)
    assert {r["reference"] for r in iso} == {"iso_kv-F96"}
    flop = _md_section(study["md"], "Iso-FLOP comparison (the iso-FLOP baseline sized from each Attamba, same size)")
    assert {r["reference"] for r in flop} == {"iso_flop-F64"}        # 3.3e6 FLOPs against 3e6, not 3e7
    for row in flop:
        assert (parse(row["attn FLOPs/token"]), parse(row["ref attn FLOPs/token"])) == (ATTN_FLOPS, 3.3e6)
        assert parse(row["params ratio"]) == pytest.approx(PARAMS / 7e6, rel=5e-3)
    param = _md_section(study["md"], "Iso-parameter comparison (closest parameter-count baseline, same size)")
    assert {r["reference"] for r in param} == {"iso_param-F200"}
    assert all(parse(r["ref params"]) == 9.6e6 for r in param)
    assert {r["reference"] for r in study["json"]["iso_flop"]} == {"iso_flop-F64"}


def test_an_attamba_is_compared_with_the_iso_baselines_sized_from_it(tmp_path):
    """Attamba runs name the iso baselines sized from them (schema.TAG_MATCH): the comparison and the claims
    take those, even where another baseline of that kind is closer in the cost metric; runs without the tag
    fall back to the closest cost."""
    from pipeline.report.claims import evaluate_claims
    from pipeline.report.load import load_runs

    uri, client, exp_id = mlflow_experiment(tmp_path, "matched")
    for seed, loss in FULL_LOSS.items():
        for variant, match in (("attamba-P4-L8-cyclic", "iso_flop-F128"), ("attamba-P8-L8-cyclic", "")):
            tags = {schema.TAG_KIND: "attamba", **({schema.TAG_MATCH["iso_flop"]: match} if match else {})}
            _log_run(client, exp_id, f"{variant}-seed{seed}", variant, "attamba", "s2", seed, variant[9], "8", loss,
                     KV, extra_tags=tags)
        for variant in ("iso_flop-F64", "iso_flop-F128"):
            kind, kv, flops, params, offset = BASELINES[variant]
            _log_run(client, exp_id, f"{variant}-seed{seed}", variant, "iso_kv", "s2", seed, "", "", loss + offset,
                     kv, extra_tags={schema.TAG_KIND: kind},
                     overrides={schema.M_ATTN_FLOPS_PER_TOKEN: flops, schema.M_PARAMS_NON_EMB: params})
    out = tmp_path / "out"
    make_report("matched", out, tracking_uri=uri, n_bootstrap=0)
    flop = {r["variant"]: r for r in json.loads((out / "fits.json").read_text())["iso_flop"]}
    assert (flop["attamba-P4-L8-cyclic"]["reference"], flop["attamba-P4-L8-cyclic"]["matched_on"]) == (
        "iso_flop-F128", "sized from it")   # F64 is closer in attention FLOPs (3.3e6 against 3e6)
    assert (flop["attamba-P8-L8-cyclic"]["reference"], flop["attamba-P8-L8-cyclic"]["matched_on"]) == (
        "iso_flop-F64", f"closest {schema.M_ATTN_FLOPS_PER_TOKEN}")
    claim = {c.id: c for c in evaluate_claims(load_runs("matched", uri).ok)}["attamba_vs_iso_flop"]
    assert {(e.a, e.b) for e in claim.estimates} == {("attamba-P4-L8-cyclic", "iso_flop-F128"),
                                                      ("attamba-P8-L8-cyclic", "iso_flop-F64")}
