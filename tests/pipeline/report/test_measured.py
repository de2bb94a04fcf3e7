"""The report states what it measured, puts evaluation variants on its Pareto fronts beside the trained
points (labelled by size and variant, marked "evaluated"), and says why an empty section is empty; all
read back from a real SQLite MLflow store."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.entities import Metric, Param, RunTag

from pipeline import schema
from pipeline.report import make_report
from pipeline.report.build import GAP_TITLE
from pipeline.report.fmt import parse
from pipeline.report.empty import empty, or_empty, reason_of
from pipeline.report.front import CLAIMS_TITLE
from pipeline.report.pareto import pareto_mask_naive
from tests.pipeline.report.test_report import _log_run, _md_section, mlflow_experiment

PARAMS = {"data.source": "bundled", "data.tokenizer": "bpe", "model.vocab_size": "4096", "data.seq_len": "256",
          "eval.batches": "20"}
EVAL_AT = {  # trained variant -> (label evaluated at, overrides, ppl factor, KV bytes factor)
    "attamba-P4-L8-cyclic": ("attamba-P8-L8-cyclic", "chunk_size=8", 1.04, 0.55),
    "full": ("swa-W33", "attention=swa,window=33", 1.3, 0.02),
}


def _extra(client, rid, params=None, tags=None, metrics=()):
    client.log_batch(rid, metrics=list(metrics), params=[Param(k, v) for k, v in (params or {}).items()],
                     tags=[RunTag(k, v) for k, v in (tags or {}).items()])


def _experiment(tmp_path, name):
    return mlflow_experiment(tmp_path, name)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """full and Attamba P4 at two sizes x 2 seeds; s2 trained on twice the tokens; one run from before the
    whole-split evaluation (no val/tokens); one run at another code version; every run evaluated at one
    other attention setting."""
    root = tmp_path_factory.mktemp("measured")
    uri, client, exp_id = _experiment(root, "measured")
    rng = np.random.default_rng(5)
    runs = {}
    for variant, (attention, P, L) in {"full": ("full", "", ""), "attamba-P4-L8-cyclic": ("attamba", "4", "8")}.items():
        for size, n in (("s1", 2e6), ("s2", 8e6)):
            for seed in (0, 1):
                trial = f"{variant}-{size}-seed{seed}"
                loss = float((2.0 if attention == "full" else 2.1) + 60.0 * n ** -0.3 + rng.normal(0, 0.01))
                kv = (1.0 if attention == "full" else 0.3) * n
                rid = _log_run(client, exp_id, trial, variant, attention, size, seed, P, L, loss, kv)
                old = trial == "attamba-P4-L8-cyclic-s2-seed1"
                label, overrides, f_ppl, f_kv = EVAL_AT[variant]
                ev_ppl = float(np.exp(loss) * f_ppl * (1 + 0.01 * seed))
                metrics = [Metric(schema.M_EVAL_CONTEXT, 256, 0, 0),
                           Metric(schema.eval_variant_metric(label, "ppl"), ev_ppl, 1, 200),
                           Metric(schema.eval_variant_metric(label, "loss"), float(np.log(ev_ppl)), 1, 200),
                           Metric(schema.eval_variant_metric(label, "kv_cache_bytes"), kv * f_kv, 1, 200),
                           Metric(schema.eval_variant_metric(label, "attn_flops_per_token"), 3 * kv * f_kv, 1, 200)]
                if size == "s2":
                    metrics.append(Metric(schema.M_TRAIN_TOKENS, 2e8, 1, 1))
                if not old:
                    metrics.append(Metric(schema.M_VAL_TOKENS, 12345, 1, 200))
                _extra(client, rid, PARAMS, {schema.TAG_CODE_VERSION: "def456-dirty" if old else "abc123",
                                             schema.TAG_EVAL_VARIANT_PREFIX + label: overrides}, metrics)
                runs[rid] = (variant, size, seed)
    out = root / "out"
    result = make_report("measured", out, tracking_uri=uri, n_bootstrap=0)
    return {"client": client, "exp_id": exp_id, "runs": runs, "out": out, "result": result}


def _section_text(md: str, title: str) -> str:
    return md.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0].strip()


def test_report_opens_with_the_answer_then_what_was_measured(measured):
    md = (measured["out"] / "summary.md").read_text()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    # the answer, then "Does context matter here?" (pipeline/report/context.py), then what was measured
    rest = [h for h in headings[1:] if not h.startswith("Does context matter here?")]
    assert headings[0] == "The answer" and headings[1] == "Does context matter here?"
    assert rest[:2] == ["What was measured", CLAIMS_TITLE]
    facts = {r["measured"]: r["value"] for r in _md_section(md, "What was measured")}
    assert facts["corpus (data.source)"] == "bundled (all 8 usable runs)"
    assert facts["tokenizer"] == "bpe, vocabulary 4096 (all 8 usable runs)"
    assert facts["sequence length (data.seq_len)"] == "256 (all 8 usable runs)"
    assert facts["evaluation context behind the KV-cache and attention-FLOP axes (tokens)"] == "256 (all 8 usable runs)"
    # s1 runs trained on 1e8 tokens, s2 runs on 2e8: said per size and variant (4 significant figures).
    assert facts["training tokens per run"] == ("100M: attamba-P4-L8-cyclic @ s1, full @ s1; "
                                                "200M: attamba-P4-L8-cyclic @ s2, full @ s2")
    assert facts["validation tokens scored by the final evaluation"] == (
        "12.35k tokens (7 usable runs); first 20 batches only (1 usable run)")
    assert facts["seeds per configuration (variant @ size)"] == "2 (each of the 4 configurations)"
    assert facts["code version"] == "abc123 (7 usable runs); def456-dirty (1 usable run)"
    html = (measured["out"] / "report.html").read_text()
    assert html.index("What was measured") < html.index("<h2>Figures</h2>")
    assert "first 20 batches only (1 usable run)" in html
    assert json.loads((measured["out"] / "fits.json").read_text())["measured"][0]["measured"] == "corpus (data.source)"


def test_pareto_fronts_hold_evaluated_points_averaged_over_seeds(measured):
    client, md = measured["client"], (measured["out"] / "summary.md").read_text()
    # Independent: every point's mean over seeds straight from MLflow, then the brute-force front.
    values = {}
    for rid, (variant, size, seed) in measured["runs"].items():
        m = client.get_run(rid).data.metrics
        label = EVAL_AT[variant][0]
        for key, ppl, kv, flops in (
                ((variant, "trained", variant, size), m[schema.M_VAL_PPL], m[schema.M_KV_BYTES],
                 m[schema.M_ATTN_FLOPS_PER_TOKEN]),
                ((label, "evaluated", variant, size), m[schema.eval_variant_metric(label, "ppl")],
                 m[schema.eval_variant_metric(label, "kv_cache_bytes")],
                 m[schema.eval_variant_metric(label, "attn_flops_per_token")])):
            values.setdefault(key, []).append((ppl, kv, flops, m[schema.M_PARAMS_NON_EMB]))
    keys = sorted(values)
    mean = {k: np.mean(values[k], axis=0) for k in keys}
    assert {k[1] for k in keys} == {"trained", "evaluated"} and len(keys) == 8
    for title, col, cost in (("Pareto front: perplexity vs KV-cache bytes", 1, schema.M_KV_BYTES),
                             ("Pareto front: perplexity vs attention FLOPs per token", 2,
                              schema.M_ATTN_FLOPS_PER_TOKEN)):
        on = pareto_mask_naive(np.array([mean[k][col] for k in keys]), np.array([mean[k][0] for k in keys]))
        expected = {k for k, o in zip(keys, on) if o}
        rows = _md_section(md, title)
        assert {(r["variant"], r["point"], r["trained as"], r["size"]) for r in rows} == expected
        assert any(r["point"] == "evaluated" for r in rows) and any(r["point"] == "trained" for r in rows)
        for r in rows:
            k = (r["variant"], r["point"], r["trained as"], r["size"])
            assert parse(r["mean val/ppl"]) == pytest.approx(mean[k][0], rel=5e-4)   # 4 figures
            assert parse(r[cost]) == pytest.approx(mean[k][col], rel=5e-3)               # 3 figures
            assert parse(r["params"]) == pytest.approx(mean[k][3], rel=5e-3)
            assert r["seeds"] == "2"
    front = json.loads((measured["out"] / "fits.json").read_text())["pareto"][schema.M_KV_BYTES]
    assert {p["point"] for p in front} == {"trained", "evaluated"}


def test_pareto_figure_marks_evaluated_points_and_labels_sizes(measured):
    from pipeline.report.figures import pareto_figure
    from pipeline.report.load import load_runs

    ok = load_runs("measured", measured["client"].tracking_uri).ok
    fig = pareto_figure(ok, schema.M_KV_BYTES, "KV bytes")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title().split(":")[0] for ax in panels] == ["s1", "s2"]   # one panel per size, smallest first
    markers = {(line.get_marker(), line.get_markerfacecolor() == "none") for ax in panels for line in ax.lines
               if line.get_marker() not in (None, "None", "")}
    assert ("o", False) in markers and ("D", True) in markers
    from pipeline.report.pareto import pareto_front, pareto_points

    points = pareto_points(ok)
    for ax in panels:   # each panel's points carry their variant (and, evaluated, what they were trained as)
        size = ax.get_title().split(":")[0]
        here = points[points[schema.TAG_SIZE] == size]
        front = pareto_front(here, schema.M_KV_BYTES)
        name = lambda r: r["variant"] if r["point"] == "trained" else f"{r['variant']} (from {r['trained_as']})"
        expected = [name(r) for _, r in front.iterrows()]
        # The front's labels first, then (4 points: a panel of few) every other point's.
        assert [t.get_text() for t in ax.texts][:len(expected)] == expected and expected
        assert sorted(t.get_text() for t in ax.texts) == sorted(name(r) for _, r in here.iterrows())
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert {"trained at the variant", "evaluated at the variant (trained as another)"} <= set(legend)
    assert set(points["variant"]) <= set(legend)   # every variant plotted, by name, in its colour


def _sections(md: str) -> dict[str, str]:
    return {m.group(1): _section_text(md, m.group(1)) for m in re.finditer(r"^## (.+)$", md, flags=re.M)}


def test_empty_sections_say_why(tmp_path):
    """One size of Attamba alone: no transformer, no iso-KV baseline, no MQAR, nothing failed."""
    uri, client, exp_id = _experiment(tmp_path, "lonely")
    for seed in (0, 1):
        _log_run(client, exp_id, f"a-s1-seed{seed}", "attamba-P4-L8-cyclic", "attamba", "s1", seed, "4", "8",
                 2.5 + 0.01 * seed, 1e5)
    make_report("lonely", tmp_path / "out", tracking_uri=uri, n_bootstrap=0)
    md = (tmp_path / "out" / "summary.md").read_text()
    sections = _sections(md)
    assert sections["Failed, incomplete and missing runs"] == "_every run finished and none is missing_"
    assert sections[GAP_TITLE] == "_no full-attention transformer run in this study_"
    assert sections["Iso-KV comparison (the iso-KV baseline sized from each Attamba, same size)"] == "_no iso-KV baseline in this study_"
    assert sections["Recall (MQAR) against P"] == "_no MQAR lengths evaluated (eval.mqar_lengths)_"
    for title, text in sections.items():
        assert text and text not in ("_none_", "_no rows_"), title
    html = (tmp_path / "out" / "report.html").read_text()
    assert "<p class='note'>no iso-KV baseline in this study</p>" in html
    assert ">none<" not in html


def test_a_study_with_no_finished_run_says_so(tmp_path):
    uri, client, exp_id = _experiment(tmp_path, "broken")
    _log_run(client, exp_id, "a-s1-seed0", "attamba-P4-L8-cyclic", "attamba", "s1", 0, "4", "8", 2.5, 1e5,
             status="FAILED")
    client.create_experiment("nothing", artifact_location=str(tmp_path / "artifacts2"))
    make_report("broken", tmp_path / "out", tracking_uri=uri, n_bootstrap=0)
    make_report("nothing", tmp_path / "none", tracking_uri=uri, n_bootstrap=0)
    sections = _sections((tmp_path / "out" / "summary.md").read_text())
    for title in ("Best run per variant", GAP_TITLE, "Recall (MQAR) against P",
                  "Pareto front: perplexity vs KV-cache bytes"):
        assert sections[title] == "_no runs finished_", title
    assert "a-s1-seed0" in sections["Failed, incomplete and missing runs"]
    # What was measured still says what the failed run was set up with.
    assert "not recorded" in sections["What was measured"]
    assert "No figure: no runs finished." in (tmp_path / "out" / "report.html").read_text()
    nothing = _sections((tmp_path / "none" / "summary.md").read_text())
    assert nothing["What was measured"] == "_no runs in this experiment_"
    assert nothing["Failed, incomplete and missing runs"] == "_no runs in this experiment_"


def test_empty_helper():
    df = empty("no iso-KV baseline in this study")
    assert df.empty and reason_of(df) == "no iso-KV baseline in this study"
    full = pd.DataFrame({"a": [1]})
    assert or_empty(full, "unused") is full and reason_of(or_empty(full.iloc[:0], "why")) == "why"
    with pytest.raises(ValueError, match="reason must be a non-empty sentence"):
        empty(" ")
