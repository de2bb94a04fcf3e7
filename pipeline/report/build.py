"""`make_report`: MLflow experiment (or a saved runs.csv) -> report.html, summary.md, runs.csv, runs.json, fits.json,
claims.json."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report import summary as S
from pipeline.report import cluster
from pipeline.report.claims import claims_json, estimates_table, evaluate_claims
from pipeline.report.compare import (gap_to_transformer, iso_flop_comparison, iso_kv_comparison, iso_param_comparison,
                                     recall_table)
from pipeline.report.context import context_section
from pipeline.report.recall import recall_section
from pipeline.report.empty import empty, or_empty, reasons
from pipeline.report.figures import all_figures
from pipeline.report.front import Block, ReportData, claims_block, front_blocks, headline_text, run_description
from pipeline.report.html import report_html
from pipeline.report.load import load_runs, load_runs_file
from pipeline.report.measured import measured_table
from pipeline.report.pareto import pareto_front, pareto_points
from pipeline.report.scaling import fits_to_json, fit_variants


@dataclass
class ReportResult:
    out_dir: Path
    files: dict[str, Path]
    n_runs: int
    n_ok: int
    failed: list[str] = field(default_factory=list)     # trial names of failed / incomplete runs
    missing: list[str] = field(default_factory=list)    # expected trial names with no run
    fits: dict = field(default_factory=dict)            # the content of fits.json
    claims: dict = field(default_factory=dict)          # the content of claims.json
    headline: list[str] = field(default_factory=list)   # the answer's lines, as the report opens with them
    description: str = ""                               # the same as Markdown, for the MLflow parent run


def _clean(v):
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None (json.dumps would write bare NaN)."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_clean(x) for x in v]
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    return v if v is None or isinstance(v, str) else str(v)


def _records(df: pd.DataFrame) -> list[dict]:
    return df.to_dict(orient="records")


FIGURES_DIR = "figures"
GAP_TITLE = "Gap to the transformer of the same size preset (parameter and KV-cache ratios in the last columns)"


def _figure_links(out_dir: Path, figures: list[tuple[str, bytes]]) -> str:
    """Each figure also as figures/NN-<slug>.png, linked from a Figures section of summary.md (a Markdown
    viewer shows them; report.html embeds them). Figures of an earlier report are removed first."""
    folder = out_dir / FIGURES_DIR
    for old in folder.glob("*.png") if folder.is_dir() else []:
        old.unlink()
    if not figures:
        return ""
    folder.mkdir(exist_ok=True)
    lines = ["\n## Figures\n"]
    for i, (caption, png) in enumerate(figures, 1):
        slug = re.sub(r"[^a-z0-9]+", "-", caption.lower().split(",")[0]).strip("-")[:60]
        name = f"{i:02d}-{slug}.png"
        (folder / name).write_bytes(png)
        lines.append(f"![{caption}]({FIGURES_DIR}/{name})\n\n*{caption}*\n")
    return "\n".join(lines)


def make_report(experiment: str | None, out_dir: Path, tracking_uri: str | None = None,
                expected_runs: list[str] | None = None, n_bootstrap: int = 500, seed: int = 0,
                runs_file: str | Path | None = None, attempts: dict[str, list[dict]] | None = None) -> ReportResult:
    """Read every run of `experiment` (or, with runs_file, the runs.csv an earlier report saved), fit scaling
    laws, compare variants and write the report into out_dir. `attempts` (run name -> where each attempt
    trained, `pipeline.runs.markers.placements`) fills the cluster view; MLflow does not hold it."""
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}; use 0 to skip intervals")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if runs_file is not None:
        table = load_runs_file(runs_file, expected_runs)
        experiment = experiment or table.experiment
    else:
        table = load_runs(experiment, tracking_uri, expected_runs)
    ok = table.ok

    fits = fit_variants(ok, n_bootstrap=n_bootstrap, seed=seed) if len(ok) else {}
    gap = gap_to_transformer(ok) if len(ok) else pd.DataFrame()
    iso = iso_kv_comparison(ok) if len(ok) else pd.DataFrame()
    iso_flop = iso_flop_comparison(ok) if len(ok) else pd.DataFrame()
    iso_param = iso_param_comparison(ok) if len(ok) else pd.DataFrame()
    recall = recall_table(ok) if len(ok) else pd.DataFrame()
    recalled = recall_section(ok)
    claims = evaluate_claims(ok) + [recalled.claim]
    points = pareto_points(ok) if len(ok) else pd.DataFrame()
    fronts = {cost: pareto_front(points, cost) if cost in points else pd.DataFrame()
              for cost in (schema.M_KV_BYTES, schema.M_ATTN_FLOPS_PER_TOKEN)}
    why = reasons(table.runs, ok)

    context = context_section(ok, claims)
    data = ReportData(ok=ok, gap=gap, iso_kv=iso, iso_flop=iso_flop, claims=claims, context=context, recall=recalled)
    front = front_blocks(data)
    measured = or_empty(measured_table(table.runs, ok), why["results"])
    opening = [Block("What was measured", table=measured), claims_block(claims)]
    sections = {
        "Failed, incomplete and missing runs": or_empty(S.status_table(table), why["status"]),
        "Best run per variant": S.best_table(ok) if len(ok) else empty(why["results"]),
        "Scaling-law fits (95% bootstrap intervals)": or_empty(S.fits_table(fits), why["fits"]),
        "Predicted loss (largest size and extrapolations)": or_empty(S.predictions_table(fits), why["predictions"]),
        GAP_TITLE: or_empty(S.comparison_table(gap), why["gap"]),
        "Iso-KV comparison (the iso-KV baseline sized from each Attamba, same size)": or_empty(S.comparison_table(iso), why["iso_kv"]),
        "Iso-FLOP comparison (the iso-FLOP baseline sized from each Attamba, same size)": or_empty(
            S.comparison_table(iso_flop), why["iso_flop"]),
        "Iso-parameter comparison (closest parameter-count baseline, same size)": or_empty(
            S.comparison_table(iso_param), why["iso_param"]),
        **{title: or_empty(S.pareto_points_table(fronts[cost], cost), why[f"pareto:{cost}"])
           for title, cost in (("Pareto front: perplexity vs KV-cache bytes", schema.M_KV_BYTES),
                               ("Pareto front: perplexity vs attention FLOPs per token",
                                schema.M_ATTN_FLOPS_PER_TOKEN))},
        "Recall (MQAR) against P": or_empty(S.recall_points_table(recall), why["recall"]),
        "Claims: every comparison behind them": or_empty(estimates_table(claims), "no claim could be measured "
                                                         "from this study's runs (see the verdicts above)"),
        cluster.TITLE: cluster.cluster_table(attempts),
    }
    md = S.summary_markdown(experiment, table, sections, front=front, opening=opening)
    figures = recalled.figures + context.figures + (all_figures(ok, fits, gap, iso, recall, iso_flop) if len(ok) else [])
    md += _figure_links(out_dir, figures)

    files = {name: out_dir / name for name in ("report.html", "summary.md", "runs.csv", "runs.json", "fits.json",
                                                 "claims.json")}
    fits_json = {"experiment": experiment, "fits": fits_to_json(fits),
                 "gap_to_transformer": _records(gap), "iso_kv": _records(iso),
                 "iso_flop": _records(iso_flop), "iso_param": _records(iso_param),
                 "pareto": {cost: _records(front) for cost, front in fronts.items()},
                 "measured": _records(measured),
                 "failed": _records(S.status_table(table)), "missing": table.missing}
    files["report.html"].write_text(report_html(f"Study report: {experiment}", S.intro_lines(table), sections,
                                                figures, no_figures=why["results"], front=front,
                                                opening=opening), encoding="utf-8")
    files["summary.md"].write_text(md, encoding="utf-8")
    table.runs.to_csv(files["runs.csv"], index=False)
    files["runs.json"].write_text(json.dumps(_clean(_records(table.runs)), indent=1, allow_nan=False))
    files["fits.json"].write_text(json.dumps(_clean(fits_json), indent=1, allow_nan=False))
    claims_out = {"experiment": experiment, **claims_json(claims), "context_use": context.json}
    files["claims.json"].write_text(json.dumps(_clean(claims_out), indent=1, allow_nan=False))
    return ReportResult(out_dir=out_dir, files=files, n_runs=len(table.runs), n_ok=len(ok),
                        failed=table.not_ok["trial"].tolist(), missing=list(table.missing), fits=_clean(fits_json),
                        claims=_clean(claims_out), headline=headline_text(front[0]),
                        description=run_description(front[0], str(files["report.html"])))
