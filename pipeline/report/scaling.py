"""Per-variant scaling laws from the table of finished runs: L(N), L(C) and, with several token budgets, L(N, D).

Each variant's free law (E + A x^-alpha) is fitted where the data identify it. Where they do not, the
constrained forms that are identified are fitted beside it, each under its own key and labelled by its form:
"L(N) power law" (E = 0, >= 3 sizes) and "L(N) shared E" (one E for every variant with >= 3 sizes, fitted
jointly), likewise for L(C)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline import schema
from pipeline.report.fits import (FORM_POWER, FORM_SHARED_E, PowerLawFit, fit_power_law, fit_scaling_law,
                                  fit_shared_e, predict)
from pipeline.report.pareto import pareto_mask

EXTRAPOLATION_FACTORS = (1.0, 2.0, 4.0, 10.0)
LAW_N, LAW_C, LAW_ND = "L(N)", "L(C)", "L(N,D)"
FORM_KEYS = {FORM_POWER: "power law", FORM_SHARED_E: "shared E"}   # a constrained law's key: "L(N) power law"


def law_key(law: str, form: str) -> str:
    return f"{law} {FORM_KEYS[form]}" if form in FORM_KEYS else law


@dataclass
class LawResult:
    """One fitted law for one variant, with the runs it used (residuals follow `run_ids`).
    `law` is L(N), L(C) or L(N,D); the form (free or constrained) is `fit.form`."""

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
    laws: dict[str, LawResult]          # by law_key(law, form): "L(N)", "L(N) power law", "L(N) shared E", ...


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


def _constrained(free: LawResult, fit: PowerLawFit, note: str = "") -> LawResult:
    """A constrained fit on the runs of `free` (same x, y, run order)."""
    key = law_key(free.law, fit.form)
    note = "; ".join(n for n in (free.note, note) if n)
    return LawResult(law=free.law, fit=fit, run_ids=free.run_ids, x=free.x, y=free.y, note=note,
                     predictions=_predictions(key, fit, free.x))


def _n_sizes(lr: LawResult) -> int:
    return len(np.unique(lr.x)) if lr.x.ndim == 1 else 0


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
        for law in (LAW_N, LAW_C):
            free = laws.get(law)
            if free is not None and not free.fit.ok and _n_sizes(free) >= 3:
                fit = fit_power_law(free.x, free.y, n_bootstrap=n_bootstrap, seed=seed, names=LAW_PARAM_NAMES[law])
                laws[law_key(law, FORM_POWER)] = _constrained(free, fit)
        out[variant] = VariantFits(variant=variant, n_runs=len(df), laws=laws)
    for law in (LAW_N, LAW_C):
        _add_shared_e(out, law, n_bootstrap, seed)
    return out


def _add_shared_e(fits: dict[str, VariantFits], law: str, n_bootstrap: int, seed: int) -> None:
    """Where some variant's free law is not identified, fit one E shared by every variant with >= 3 sizes."""
    frees = {v: vf.laws[law] for v, vf in fits.items() if law in vf.laws and _n_sizes(vf.laws[law]) >= 3}
    if len(frees) < 2 or all(lr.fit.ok for lr in frees.values()):
        return
    shared = fit_shared_e([lr.x for lr in frees.values()], [lr.y for lr in frees.values()],
                          n_bootstrap=n_bootstrap, seed=seed, names=LAW_PARAM_NAMES[law])
    note = f"E shared by {len(frees)} variants: {', '.join(frees)}"
    for (variant, free), fit in zip(frees.items(), shared):
        fits[variant].laws[law_key(law, FORM_SHARED_E)] = _constrained(free, fit, note)


def fits_to_json(fits: dict[str, VariantFits]) -> dict:
    """Plain-JSON view of the fits: form, identifiability, parameters, 95% intervals (or why omitted) with the
    fraction of bootstrap refits that succeeded, flags, predictions and per-run residuals."""
    out = {}
    for variant, vf in fits.items():
        out[variant] = {"n_runs": vf.n_runs, "laws": {}}
        for name, lr in vf.laws.items():
            f = lr.fit
            out[variant]["laws"][name] = {
                "law": lr.law, "form": f.form, "n_params": f.n_params,
                "status": f.status, "reason": f.reason, "note": lr.note, "n_points": f.n_points,
                "n_distinct_sizes": f.n_distinct, "params": f.params,
                "intervals_95": {k: list(v) for k, v in f.intervals.items()}, "interval_note": f.interval_note,
                "flags": f.flags, "n_bootstrap": f.n_bootstrap, "n_bootstrap_ok": f.n_bootstrap_ok,
                "refit_fraction": f.refit_fraction,
                "predictions": lr.predictions,
                "residuals_log": [{"run_id": r, "residual": v} for r, v in zip(lr.run_ids, f.residuals)],
            }
    return out
