"""What the report opens with, on Claim objects and a small real study: the claims measured in a table and
the others in one line naming what would measure each; a verdict the headline does not know shown as it
is; the headline first, then each FRONT_SECTIONS section in order (none written yet for context)."""
from __future__ import annotations

import re

import numpy as np

from pipeline import schema
from pipeline.report import front, make_report
from pipeline.report.claims import CLAIMS, NOT_MEASURED, SUPPORTED, Claim
from pipeline.report.front import (MEASURED_BY, Block, ReportData, claims_block, claims_tally, context_matters,
                                   not_measured_line)
from pipeline.report.recall import CLAIM_ID as RECALL_CLAIM
from tests.pipeline.report.test_report import _log_run, mlflow_experiment


def _claim(cid: str, verdict: str, reason: str = "") -> Claim:
    return Claim(id=cid, statement=f"{cid} holds", paper="p", paper_pct=None, rule="directional", sign=1,
                 verdict=verdict, reason=reason)


def test_every_claim_says_what_would_measure_it():
    assert {c[0] for c in CLAIMS} | {RECALL_CLAIM} == set(MEASURED_BY)


def test_claims_not_measured_collapse_into_one_line_and_an_unknown_verdict_stays_a_row():
    claims = [_claim("attamba_vs_full", SUPPORTED), _claim("attamba_vs_iso_kv", NOT_MEASURED, "no run of kind iso_kv"),
              _claim("collapse_P64_L1", NOT_MEASURED), _claim("new_claim", NOT_MEASURED, "no long-context run"),
              _claim("long_context", "untestable here")]
    block = claims_block(claims)
    assert list(block.table["claim"]) == ["attamba_vs_full", "long_context"]
    assert list(block.table["verdict"]) == [SUPPORTED, "untestable here"]
    assert block.after == [not_measured_line(claims)]
    assert block.after[0] == ("Not measured (3): attamba_vs_iso_kv, needs `baselines: [iso_kv]`; collapse_P64_L1, "
                              f"needs {MEASURED_BY['collapse_P64_L1']}; new_claim (no long-context run).")
    assert claims_tally(claims) == ("The paper's claims: 1 of 5 decided here (attamba_vs_full: supported); "
                                    "1 untestable here, context not shown to matter (long_context; see \"Does "
                                    "context matter here?\"); 3 not measured (listed under Claims).")
    assert not_measured_line(claims[:1]) == "" and claims_block(claims[:1]).after == []
    assert claims_tally(claims[1:2]) == "The paper's claims: none of the 1 decided here; 1 not measured (listed under Claims)."


def test_the_headline_comes_first_and_front_sections_follow_in_order(tmp_path, monkeypatch):
    uri, client, exp_id = mlflow_experiment(tmp_path, "front")
    for seed in (0, 1):
        for variant, attention, P, L, loss, kv in (("full", "full", "", "", 2.5, 4e5),
                                                   ("attamba-P4-L16-cyclic", "attamba", "4", "16", 2.6, 2e5)):
            _log_run(client, exp_id, f"{variant}-s1-seed{seed}", variant, attention, "s1", seed, P, L,
                     loss + 0.01 * seed, kv)
    assert context_matters(ReportData(*[None] * 5)) == []   # no context section computed: no blocks

    def later(data: ReportData) -> list[Block]:
        return [Block("Later section", [f"{len(data.ok)} usable runs"])]

    monkeypatch.setattr(front, "FRONT_SECTIONS", [context_matters, later])
    out = tmp_path / "out"
    make_report("front", out, tracking_uri=uri, n_bootstrap=0)
    md = (out / "summary.md").read_text()
    headings = [h for h in re.findall(r"^## (.+)$", md, flags=re.M) if not h.startswith("Does context matter")]
    assert headings[:4] == ["The answer", "Later section", "What was measured", front.CLAIMS_TITLE]
    assert md.index("## The answer") < md.index("## Does context matter here?") < md.index("## Later section")
    answer = md.split("## The answer\n", 1)[1].split("\n## ", 1)[0]
    gap = 100 * (np.exp(0.1) - 1)
    assert f"- **attamba-P4-L16-cyclic @ s1**: perplexity +{gap:.3g}% " in answer
    assert "KV-cache 2.00x smaller than the transformer's" in answer and "- 4 usable runs" in md
    html = (out / "report.html").read_text()
    assert html.index("The answer") < html.index("Later section") < html.index("What was measured")
    assert html.index("<h1>") < html.index("class='headline'") < html.index("Runs: 4 in MLflow")
