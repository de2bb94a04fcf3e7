"""`make_report`: MLflow experiment -> report.html, summary.md, runs.csv, runs.json, fits.json."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report import summary as S
from pipeline.report.compare import (config_table, gap_to_transformer, iso_flop_comparison, iso_kv_comparison,
                                     iso_param_comparison, pareto_table, recall_table)
from pipeline.report.figures import all_figures
from pipeline.report.html import report_html
from pipeline.report.load import load_runs
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


def make_report(experiment: str, out_dir: Path, tracking_uri: str | None = None,
                expected_runs: list[str] | None = None, n_bootstrap: int = 500, seed: int = 0) -> ReportResult:
    """Read every run of `experiment`, fit scaling laws, compare variants and write the report into out_dir."""
    if n_bootstrap < 0:
        raise ValueError(f"n_bootstrap must be >= 0, got {n_bootstrap}; use 0 to skip intervals")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = load_runs(experiment, tracking_uri, expected_runs)
    ok = table.ok

    fits = fit_variants(ok, n_bootstrap=n_bootstrap, seed=seed) if len(ok) else {}
    gap = gap_to_transformer(ok) if len(ok) else pd.DataFrame()
    iso = iso_kv_comparison(ok) if len(ok) else pd.DataFrame()
    iso_flop = iso_flop_comparison(ok) if len(ok) else pd.DataFrame()
    iso_param = iso_param_comparison(ok) if len(ok) else pd.DataFrame()
    recall = recall_table(ok) if len(ok) else pd.DataFrame()
    configs = config_table(ok) if len(ok) else pd.DataFrame()
    fronts = {cost: pareto_table(configs, cost) if cost in configs else pd.DataFrame()
              for cost in (schema.M_KV_BYTES, schema.M_ATTN_FLOPS_PER_TOKEN)}

    sections = {
        "Failed, incomplete and missing runs": S.status_table(table),
        "Best run per variant": S.best_table(ok) if len(ok) else pd.DataFrame(),
        "Scaling-law fits (95% bootstrap intervals)": S.fits_table(fits),
        "Predicted loss (largest size and extrapolations)": S.predictions_table(fits),
        "Gap to the transformer at equal size": S.comparison_table(gap),
        "Iso-KV comparison (closest KV-cache baseline, same size)": S.comparison_table(iso),
        "Iso-FLOP comparison (closest attention-FLOPs baseline, same size)": S.comparison_table(iso_flop),
        "Iso-parameter comparison (closest parameter-count baseline, same size)": S.comparison_table(iso_param),
        "Pareto front: perplexity vs KV-cache bytes": S.pareto_points_table(fronts[schema.M_KV_BYTES],
                                                                             schema.M_KV_BYTES),
        "Pareto front: perplexity vs attention FLOPs per token": S.pareto_points_table(
            fronts[schema.M_ATTN_FLOPS_PER_TOKEN], schema.M_ATTN_FLOPS_PER_TOKEN),
        "Recall (MQAR) against P": S.recall_points_table(recall),
    }
    md = S.summary_markdown(experiment, table, sections)
    intro = md.split("## ", 1)[0].splitlines()[1:]
    figures = all_figures(ok, fits, gap, iso, recall) if len(ok) else []

    files = {name: out_dir / name for name in ("report.html", "summary.md", "runs.csv", "runs.json", "fits.json")}
    fits_json = {"experiment": experiment, "fits": fits_to_json(fits),
                 "gap_to_transformer": _records(gap), "iso_kv": _records(iso),
                 "iso_flop": _records(iso_flop), "iso_param": _records(iso_param),
                 "pareto": {cost: _records(front) for cost, front in fronts.items()},
                 "failed": _records(S.status_table(table)), "missing": table.missing}
    files["report.html"].write_text(report_html(f"Study report: {experiment}", [l for l in intro if l.strip()],
                                                sections, figures), encoding="utf-8")
    files["summary.md"].write_text(md, encoding="utf-8")
    table.runs.to_csv(files["runs.csv"], index=False)
    files["runs.json"].write_text(json.dumps(_clean(_records(table.runs)), indent=1, allow_nan=False))
    files["fits.json"].write_text(json.dumps(_clean(fits_json), indent=1, allow_nan=False))
    return ReportResult(out_dir=out_dir, files=files, n_runs=len(table.runs), n_ok=len(ok),
                        failed=table.not_ok["trial"].tolist(), missing=list(table.missing), fits=_clean(fits_json))
