"""Per-variant scaling laws from the table of finished runs: L(N), L(C) and, with several token budgets, L(N, D)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report.fits import PowerLawFit, fit_scaling_law, predict
from pipeline.report.pareto import pareto_mask

EXTRAPOLATION_FACTORS = (1.0, 2.0, 4.0, 10.0)
LAW_N, LAW_C, LAW_ND = "L(N)", "L(C)", "L(N,D)"


@dataclass
class LawResult:
    """One fitted law for one variant, with the runs it used (residuals follow `run_ids`)."""

    law: str
    fit: PowerLawFit
    run_ids: list[str]
    x: np.ndarray                       # [n] or [n, 2] raw sizes of the runs used
    y: np.ndarray                       # [n] val/loss
    note: str = ""
    predictions: list[dict] = field(default_factory=list)


@dataclass
class VariantFits:
    variant: str
    n_runs: int
    laws: dict[str, LawResult]


def _budget_for_size_law(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """L(N) needs one token budget: take the budget with the most distinct sizes (ties: the largest)."""
    if schema.M_TRAIN_TOKENS not in df or df[schema.M_TRAIN_TOKENS].nunique() <= 1:
        return df, ""
    counts = df.groupby(schema.M_TRAIN_TOKENS)[schema.M_PARAMS_NON_EMB].nunique()
    best = max(counts.index, key=lambda d: (counts[d], d))
    return df[df[schema.M_TRAIN_TOKENS] == best], f"runs at the token budget D={best:.4g} (of {len(counts)} budgets)"


def _compute_frontier(df: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """With several budgets, fit L(C) on the compute-efficient configurations only (lower envelope of loss)."""
    if schema.M_TRAIN_TOKENS not in df or df[schema.M_TRAIN_TOKENS].nunique() <= 1:
        return df, ""
    keys = [schema.M_PARAMS_NON_EMB, schema.M_TRAIN_TOKENS]
    cfg = df.groupby(keys, as_index=False)[[schema.M_TRAIN_FLOPS, schema.M_VAL_LOSS]].mean()
    front = cfg[pareto_mask(cfg[schema.M_TRAIN_FLOPS].to_numpy(), cfg[schema.M_VAL_LOSS].to_numpy())]
    keep = df.set_index(keys).index.isin(front.set_index(keys).index)
    return df[keep], f"compute-efficient frontier: {len(front)} of {len(cfg)} (N, D) configurations"


def _predictions(law: str, fit: PowerLawFit, x: np.ndarray) -> list[dict]:
    if not fit.ok:
        return []
    out = []
    for factor in EXTRAPOLATION_FACTORS:
        if x.ndim == 1:
            point = np.array([[x.max() * factor]])
        else:
            point = np.array([[x[:, 0].max() * factor, x[:, 1].max()]])
        mid, lo, hi = predict(fit, point)
        out.append({"law": law, "factor": factor, "x": point[0].tolist(), "loss": float(mid[0]),
                    "lo": float(lo[0]), "hi": float(hi[0]), "extrapolation": factor > 1.0})
    return out


LAW_PARAM_NAMES = {LAW_N: ["E", "A", "alpha"], LAW_C: ["E", "A", "gamma"], LAW_ND: ["E", "A", "alpha", "B", "beta"]}


def _law(law: str, df: pd.DataFrame, x_cols: list[str], note: str, n_bootstrap: int, seed: int) -> LawResult:
    df = df.dropna(subset=x_cols + [schema.M_VAL_LOSS])
    x = df[x_cols].to_numpy(dtype=float)
    x = x[:, 0] if len(x_cols) == 1 else x
    y = df[schema.M_VAL_LOSS].to_numpy(dtype=float)
    fit = fit_scaling_law(x, y, n_bootstrap=n_bootstrap, seed=seed, names=LAW_PARAM_NAMES[law])
    return LawResult(law=law, fit=fit, run_ids=df["run_id"].tolist(), x=x, y=y, note=note,
                     predictions=_predictions(law, fit, x))


def fit_variants(ok: pd.DataFrame, n_bootstrap: int = 500, seed: int = 0) -> dict[str, VariantFits]:
    """Fit every variant's laws from finished runs (one row per run, schema metric columns)."""
    out = {}
    for variant, df in ok.groupby("variant", sort=True):
        laws = {}
        if schema.M_PARAMS_NON_EMB in df:
            sub, note = _budget_for_size_law(df)
            laws[LAW_N] = _law(LAW_N, sub, [schema.M_PARAMS_NON_EMB], note, n_bootstrap, seed)
        if schema.M_TRAIN_FLOPS in df:
            sub, note = _compute_frontier(df)
            laws[LAW_C] = _law(LAW_C, sub, [schema.M_TRAIN_FLOPS], note, n_bootstrap, seed)
        if (schema.M_TRAIN_TOKENS in df and schema.M_PARAMS_NON_EMB in df
                and df[schema.M_TRAIN_TOKENS].nunique() > 1):
            laws[LAW_ND] = _law(LAW_ND, df, [schema.M_PARAMS_NON_EMB, schema.M_TRAIN_TOKENS], "",
                                n_bootstrap, seed)
        out[variant] = VariantFits(variant=variant, n_runs=len(df), laws=laws)
    return out


def fits_to_json(fits: dict[str, VariantFits]) -> dict:
    """Plain-JSON view of the fits: parameters, 95% intervals, predictions and per-run residuals."""
    out = {}
    for variant, vf in fits.items():
        out[variant] = {"n_runs": vf.n_runs, "laws": {}}
        for name, lr in vf.laws.items():
            f = lr.fit
            out[variant]["laws"][name] = {
                "status": f.status, "reason": f.reason, "note": lr.note, "n_points": f.n_points,
                "n_distinct_sizes": f.n_distinct, "params": f.params,
                "intervals_95": {k: list(v) for k, v in f.intervals.items()},
                "n_bootstrap": f.n_bootstrap, "n_bootstrap_ok": f.n_bootstrap_ok,
                "predictions": lr.predictions,
                "residuals_log": [{"run_id": r, "residual": v} for r, v in zip(lr.run_ids, f.residuals)],
            }
    return out
