"""What a study's runs can support: whether they identify a law, bootstrap resamples that respect the
study's design, and intervals that say when they are missing and why.

Sizes are the design of a study (chosen, not sampled) and seeds are replicates at a size, so resamples
keep every size and redraw its seeds (`within_size_resamples`). An interval is reported with the number
of refits that succeeded and omitted below MIN_REFIT_FRACTION; exponents outside PLAUSIBLE_EXPONENT are
flagged rather than hidden.
"""
from __future__ import annotations

import numpy as np

CI_LEVEL = 0.95
MIN_REFIT_FRACTION = 0.8           # intervals are omitted when fewer bootstrap refits than this succeed
PLAUSIBLE_EXPONENT = (0.02, 2.0)   # fitted exponents (alpha, beta, gamma) outside this range are flagged


def identifiability(x: np.ndarray, n_params: int) -> str:
    """Why a law with `n_params` parameters is not identified by the sizes x: [n, k] ('' when it is).

    One variable: more runs than parameters and at least n_params + 1 distinct sizes (with n_params sizes the
    curve passes exactly through the size means, whatever the noise). Two variables: n_params + 1 distinct
    (N, D) points with at least 3 values of each variable.
    """
    x = np.asarray(x, dtype=float)
    x = x[:, None] if x.ndim == 1 else x
    n, k = x.shape
    n_distinct = len({tuple(row) for row in x})
    if k == 1:
        if n_distinct < n_params + 1 or n <= n_params:
            return f"not identifiable from {n_distinct} sizes (a {n_params}-parameter law needs >= {n_params + 1})"
        return ""
    per_var = [len(np.unique(x[:, j])) for j in range(k)]
    if n_distinct < n_params + 1 or min(per_var) < 3 or n <= n_params:
        return (f"not identifiable from {n_distinct} (N, D) points with {per_var} values per variable "
                f"(a {n_params}-parameter law needs >= {n_params + 1} points and >= 3 values per variable)")
    return ""


def within_size_resamples(strata: np.ndarray, log_y: np.ndarray, n: int,
                          rng: np.random.Generator) -> np.ndarray | None:
    """`n` bootstrap resamples of log losses at the same sizes: [n, len(log_y)], or None when no size has 2 runs.

    strata: [len(log_y)] labels, one per size (per (variant, size) for a joint fit). The sizes are the study's
    design, chosen rather than sampled, and the seeds at a size are its replicates: so every resample keeps every
    size and redraws that size's runs, with replacement, from the runs at that size. Resampling by size instead
    would change the design, and with 4-5 sizes most resamples would hold too few distinct sizes to refit.
    A draw is the size's mean plus the drawn run's deviation from it, scaled by sqrt(m / (m - 1)) for m runs at
    that size, so the resampled spread is the seed variance rather than (m - 1) / m of it (an interval 29%
    too narrow with 2 seeds, 13% with 4). A size with a single run draws its deviation from the pooled deviations of the
    sizes with several runs; with no such size the runs say nothing about seed noise, and None is returned.
    """
    labels = np.unique(np.asarray(strata), return_inverse=True)[1].ravel()
    groups = [np.flatnonzero(labels == s) for s in range(labels.max() + 1)]
    mean, dev = np.empty_like(log_y), np.zeros_like(log_y)
    for idx in groups:
        mean[idx] = log_y[idx].mean()
        if len(idx) > 1:
            dev[idx] = (log_y[idx] - mean[idx]) * np.sqrt(len(idx) / (len(idx) - 1))
    pool = np.concatenate([dev[idx] for idx in groups if len(idx) > 1] or [np.empty(0)])
    if not len(pool):
        return None
    out = np.repeat(mean[None, :], n, axis=0)
    for idx in groups:
        src = idx if len(idx) > 1 else None
        draws = (dev[src[rng.integers(0, len(src), (n, len(idx)))]] if src is not None
                 else pool[rng.integers(0, len(pool), (n, len(idx)))])
        out[:, idx] += draws
    return out


def size_labels(*cols: np.ndarray) -> np.ndarray:
    """One integer label per distinct row of the given columns."""
    rows = np.column_stack([np.asarray(c, dtype=float) for c in cols])
    return np.unique(rows, axis=0, return_inverse=True)[1].ravel()


def bootstrap(refit, strata: np.ndarray, log_y: np.ndarray, n_bootstrap: int,
              seed: int) -> tuple[list[np.ndarray], str]:
    """Refit every within-size resample; `refit(log_y) -> theta | None` (None: the refit failed).
    Returns the successful refits' thetas and, where no resample could be drawn, why."""
    if n_bootstrap == 0:
        return [], "no bootstrap (n_bootstrap=0)"
    samples = within_size_resamples(strata, log_y, n_bootstrap, np.random.default_rng(seed))
    if samples is None:
        return [], ("interval omitted: one run per size, so resampling runs within sizes has no spread "
                    "(run >= 2 seeds per size)")
    return [t for t in (refit(s) for s in samples) if t is not None], ""


def intervals_from(params: dict[str, float], boot_params: list[dict[str, float]], n_bootstrap: int,
                   note: str) -> tuple[dict[str, tuple[float, float]], str]:
    """Percentile intervals, or none and why: too few successful refits, or a distribution of zero width."""
    if note:
        return {}, note
    n_ok = len(boot_params)
    if n_ok < max(2, MIN_REFIT_FRACTION * n_bootstrap):
        return {}, (f"interval omitted: {n_ok}/{n_bootstrap} refits succeeded "
                    f"(needs >= {MIN_REFIT_FRACTION:.0%})")
    q = 100 * (1 - CI_LEVEL) / 2
    out = {}
    for name, value in params.items():
        vals = np.array([p[name] for p in boot_params])
        lo, hi = float(np.percentile(vals, q)), float(np.percentile(vals, 100 - q))
        if not hi - lo > 1e-12 * max(abs(value), 1e-300):
            return {}, f"interval omitted: the {n_ok} refits all give {name}={value:.6g} (no spread to report)"
        out[name] = (lo, hi)
    return out, ""


def exponent_flags(params: dict[str, float], exponents: list[str]) -> list[str]:
    lo, hi = PLAUSIBLE_EXPONENT
    return [f"implausible: {name}={params[name]:.3g} outside [{lo:g}, {hi:g}]"
            for name in exponents if name in params and not lo <= params[name] <= hi]
