"""The recall section: points with seed intervals computed by hand, the claim "Attamba keeps recall that the window
and iso-KV lose" decided both ways and gated on the transformer's own recall, a recall study's answer and its
figures; through the real report (`make_report` on a runs.csv, as `attamba report --runs` reads it)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline import schema
from pipeline.report.build import make_report
from pipeline.report.claims import CONTRADICTED, NOT_MEASURED, SUPPORTED, UNTESTABLE
from pipeline.report.compare import _t_interval
from pipeline.report.load import fold_seq_len
from pipeline.report.recall import CLAIM_ID, EVALUATED, TRAINED, recall_claim, recall_points

SEEDS = (0, 1, 2)
NOISE = {0: -0.01, 1: 0.0, 2: 0.015}


def _run(size, T, variant, kind, recall, kv, seed, L=np.nan, P=np.nan, match="", windows=()):
    r = {"run_id": f"{size}-{T}-{variant}-{seed}", "run_name": variant, "mlflow_status": "FINISHED", "start_time": 1,
         schema.TAG_STUDY: "recall", schema.TAG_TRIAL: f"{size}__T{T}__{variant}__s{seed}", schema.TAG_SIZE: size,
         schema.TAG_ATTENTION: "iso_kv" if kind.startswith("iso") else kind, schema.TAG_VARIANT: variant,
         "variant": variant, schema.TAG_KIND: kind, schema.TAG_SEED: seed, schema.TAG_CHUNK: P,
         schema.TAG_LEADING: L, schema.TAG_MATCH["iso_kv"]: match, "data.seq_len": str(T), "data.mqar.pairs": "4",
         "data.source": "mqar", "state": "ok", schema.M_VAL_LOSS: 2.0 * (1 - recall) + 0.01,
         schema.M_VAL_RECALL: float(np.clip(recall + NOISE[seed], 0, 1)), schema.M_KV_BYTES: kv,
         schema.M_PARAMS_NON_EMB: 1e4, schema.M_TRAIN_TOKENS: 1500 * 32 * T,
         "val/recall_d1-8": 1.0, "val/recall_d9-32": float(np.clip(recall + NOISE[seed], 0, 1))}
    for W, rec, kv_w in windows:
        label = f"swa-W{W}"
        r[f"{schema.TAG_EVAL_VARIANT_PREFIX}{label}"] = f"attention=swa,window={W}"
        r[schema.eval_variant_metric(label, "recall")] = rec + NOISE[seed]
        r[schema.eval_variant_metric(label, "loss")] = 2.0
        r[schema.eval_variant_metric(label, "kv_cache_bytes")] = kv_w
        r[schema.eval_variant_metric(label, "recall_d1-8")] = 1.0
    return r


def _runs(full: float, attamba: float, window: float = 0.3, iso: float = 0.4, Ts=(64,)) -> pd.DataFrame:
    rows = []
    for T in Ts:
        for seed in SEEDS:
            rows.append(_run("tiny", T, "full", "full", full, 8192, seed, windows=[(9, window, 1152)]))
            rows.append(_run("tiny", T, "swa-W9", "swa", window, 1152, seed))
            for P in (4, 16):
                rows.append(_run("tiny", T, f"attamba-P{P}-L8-cyclic", "attamba", attamba, 1024 + 4096 // P, seed,
                                 L=8, P=P, match=f"iso_kv-F{64 // P}"))
                rows.append(_run("tiny", T, f"iso_kv-F{64 // P}", "iso_kv", iso, 1024 + 4096 // P, seed))
    return fold_seq_len(pd.DataFrame(rows))


def test_points_are_the_seed_means_with_their_t_intervals_clipped_to_a_fraction():
    ok = _runs(full=0.99, attamba=0.8)
    points = recall_points(ok)
    att = points[(points["variant"] == "attamba-P4-L8-cyclic")].iloc[0]
    mean, lo, hi = _t_interval([0.8 + NOISE[s] for s in SEEDS])
    assert (att["recall"], att["lo"], att["hi"]) == pytest.approx((mean, lo, hi))
    assert att["n"] == 3 and att["chance"] == 0.25 and att["kv_bytes"] == 2048 and att["point"] == TRAINED
    full = points[points["variant"] == "full"].iloc[0]
    assert full["hi"] == 1.0 and full["lo"] < 1.0   # 0.99 + 0.015 is clipped at 1, the t interval would pass 1
    window = points[(points["variant"] == "swa-W9") & (points["point"] == EVALUATED)].iloc[0]
    assert window["trained_as"] == "full" and window["kv_bytes"] == 1152
    assert window["recall"] == pytest.approx(0.3 + np.mean(list(NOISE.values())))
    assert att["distances"] == {(1, 8): 1.0, (9, 32): pytest.approx(mean)}


def test_attamba_above_the_window_and_iso_kv_supports_the_claim():
    claim = recall_claim(_runs(full=0.99, attamba=0.8, window=0.3, iso=0.4))
    assert claim.verdict == SUPPORTED
    pairs = {(e.a, e.b, e.source) for e in claim.estimates}
    assert pairs == {(f"attamba-P{P}-L8-cyclic", b, TRAINED) for P in (4, 16)
                     for b in ("swa-W9", f"iso_kv-F{64 // P}")}
    for e in claim.estimates:   # recall error A - B in points: 100 * (0.3 or 0.4 - 0.8), the same noise cancels
        assert e.pct == pytest.approx(100 * ((0.3 if e.b == "swa-W9" else 0.4) - 0.8))
        assert e.verdict == SUPPORTED and e.n_pairs == 3


def test_attamba_below_them_contradicts_it():
    claim = recall_claim(_runs(full=0.99, attamba=0.2, window=0.3, iso=0.5))
    assert claim.verdict == CONTRADICTED
    assert {e.verdict for e in claim.estimates} == {CONTRADICTED}


def test_mixed_estimates_are_inconclusive():
    claim = recall_claim(_runs(full=0.99, attamba=0.45, window=0.3, iso=0.6))
    assert claim.verdict == "inconclusive" and "4 comparisons" in claim.reason


def test_a_transformer_that_does_not_recall_makes_the_claim_untestable_here():
    claim = recall_claim(_runs(full=0.6, attamba=0.8, window=0.3, iso=0.4))
    assert claim.verdict == UNTESTABLE
    assert "the full transformer recalls 60" in claim.reason
    assert all(e.verdict == UNTESTABLE and "the interval alone: supported" in e.reason for e in claim.estimates)


def test_the_evaluated_window_stands_in_for_a_missing_trained_one():
    ok = _runs(full=0.99, attamba=0.8)
    claim = recall_claim(ok[ok["variant"] != "swa-W9"])
    assert {e.source for e in claim.estimates if e.b == "swa-W9"} == {"evaluated as swa-W9"}
    assert claim.verdict == SUPPORTED


def test_text_runs_leave_the_claim_not_measured():
    ok = _runs(full=0.99, attamba=0.8).drop(columns=[schema.M_VAL_RECALL])
    assert recall_claim(ok).verdict == NOT_MEASURED


def test_sequence_lengths_are_settings_of_their_own():
    ok = _runs(full=0.99, attamba=0.8, Ts=(64, 128))
    assert set(ok[schema.TAG_SIZE]) == {"tiny T=64", "tiny T=128"}
    assert fold_seq_len(ok).equals(ok)   # folding twice changes nothing (a runs.csv read back)
    one = _runs(full=0.99, attamba=0.8)
    assert set(one[schema.TAG_SIZE]) == {"tiny"}   # one length: sizes as they are
    claim = recall_claim(ok)
    assert {e.size for e in claim.estimates} == {"tiny T=64", "tiny T=128"}


def test_a_recall_study_report_opens_with_recall_and_draws_it(tmp_path):
    raw = pd.DataFrame([_run("tiny", T, *args, seed) for T in (64, 128) for seed in SEEDS
                        for args in (("full", "full", 0.99, 8192), ("swa-W9", "swa", 0.3, 1152))]
                       + [_run("tiny", T, "attamba-P4-L8-cyclic", "attamba", 0.8, 2048, seed, L=8, P=4,
                               match="iso_kv-F16") for T in (64, 128) for seed in SEEDS]
                       + [_run("tiny", T, "iso_kv-F16", "iso_kv", 0.4, 2048, seed) for T in (64, 128)
                          for seed in SEEDS])
    raw.to_csv(tmp_path / "runs.csv", index=False)
    result = make_report(None, tmp_path / "out", runs_file=tmp_path / "runs.csv", n_bootstrap=0)
    assert result.headline[0].startswith("tiny T=64, recall by KV-cache")
    assert "attamba-P4-L8-cyclic 80.2%" in result.headline[0]
    claims = json.loads((tmp_path / "out" / "claims.json").read_text())["claims"]
    recall = next(c for c in claims if c["id"] == CLAIM_ID)
    assert recall["verdict"] == SUPPORTED and len(recall["estimates"]) == 4
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert summary.index("Recall (MQAR, trained): recall against KV-cache bytes") < summary.index("What was measured")
    figures = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert figures[:2] == ["01-recall-against-kv-cache-bytes.png", "02-recall-by-key-query-distance.png"]
