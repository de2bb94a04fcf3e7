"""Scaling-law fits in the style of Chinchilla approach 3 (Hoffmann et al. 2022).

L = E + sum_j A_j * x_j^(-alpha_j), fitted as log L = logsumexp(e, a_j - alpha_j * log(x_j / x0_j)) with a
Huber loss (delta 1e-3) on log-space residuals, L-BFGS from a grid of starting points. One size variable
gives L(N) or L(C); two give L(N, D) = E + A/N^alpha + B/D^beta.

Each x_j is divided by its geometric mean x0_j before fitting: with raw N ~ 1e8 or C ~ 1e18 the
coefficient a_j would sit far from its grid and the problem would be badly conditioned.

A law is fitted only when the data identify it (`identifiability`): with as many sizes as parameters the
curve passes exactly through the size means and nothing is left to estimate. Where the free form is not
identified, two constrained forms can be, each labelled by its `form`: a 2-parameter power law L = A x^-alpha
(E = 0, log-linear, >= 3 sizes) and one E shared by several variants (`fit_shared_e`).

Uncertainty comes from a seeded bootstrap that resamples runs within sizes, refitting every resample;
intervals are reported with the fraction of refits that succeeded, and omitted below MIN_REFIT_FRACTION.
Exponents outside PLAUSIBLE_EXPONENT are flagged (`pipeline.report.uncertainty`).
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

from pipeline.report.uncertainty import (CI_LEVEL, bootstrap, exponent_flags, identifiability, intervals_from,
                                         size_labels)

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: only makes the fits faster
    threadpool_limits = None

HUBER_DELTA = 1e-3
ALPHA_BOUNDS = (0.0, 5.0)
LOG_BOUNDS = (-40.0, 40.0)
N_STARTS = 10   # grid points, ranked by their starting objective, that L-BFGS is run from
STATUS_OK, STATUS_NOT_IDENTIFIABLE = "ok", "not_identifiable"
FORM_FREE = "free E"                                   # L = E + A x^-alpha (+ B D^-beta)
FORM_POWER = "2-parameter power law, E = 0 (constrained)"   # L = A x^-alpha
FORM_SHARED_E = "E shared across variants (constrained)"    # one E, per-variant A and alpha
# Names of the public parameters for one and two size variables.
PARAM_NAMES = {1: ["E", "A", "alpha"], 2: ["E", "A", "alpha", "B", "beta"]}


@dataclass
class PowerLawFit:
    """A fitted law L = E + sum_j A_j x_j^-alpha_j, or the reason it was not fitted (`status != "ok"`).

    `params` and `intervals` use the names E, A, alpha (and B, beta); A and B are in the units of the raw x.
    A FORM_POWER law has no E. `intervals` is empty when `interval_note` says why they were omitted.
    `n_params` counts the parameters fitted jointly (for FORM_SHARED_E: the shared E and every variant's A, alpha).
    `residuals` are log(observed) - log(predicted), one per input point, in input order.
    """

    status: str
    reason: str = ""
    form: str = FORM_FREE
    n_params: int = 0
    n_points: int = 0
    n_distinct: int = 0
    params: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    interval_note: str = ""
    flags: list[str] = field(default_factory=list)
    residuals: list[float] = field(default_factory=list)
    n_bootstrap: int = 0
    n_bootstrap_ok: int = 0
    theta: np.ndarray | None = None          # [e, a_1..a_k, alpha_1..alpha_k] in normalised coordinates
    x0: np.ndarray | None = None             # per-variable normalisers
    boot_thetas: np.ndarray | None = None    # [n_bootstrap_ok, 1 + 2k]

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK

    @property
    def refit_fraction(self) -> float:
        return self.n_bootstrap_ok / self.n_bootstrap if self.n_bootstrap else float("nan")


def huber(r: np.ndarray, delta: float) -> np.ndarray:
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta: np.ndarray, z: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[float, np.ndarray]:
    """Mean Huber loss of log residuals and its gradient. z: [n, k] normalised log sizes; log_y: [n]."""
    k = z.shape[1]
    e, a, alpha = theta[0], theta[1:1 + k], theta[1 + k:]
    terms = np.concatenate([np.full((len(z), 1), e), a[None, :] - alpha[None, :] * z], axis=1)  # [n, 1+k]
    # Hand-written logsumexp/softmax: scipy's versions dominate the run time on these tiny arrays.
    m = terms.max(axis=1, keepdims=True)
    ex = np.exp(terms - m)
    tot = ex.sum(axis=1, keepdims=True)
    r = (m + np.log(tot))[:, 0] - log_y
    w = ex / tot
    # Scaled by 1/delta so gradients are O(1) and L-BFGS's default tolerances stay meaningful.
    dr = np.clip(r, -delta, delta) / delta / len(z)
    grad = np.concatenate([[np.sum(dr * w[:, 0])], (dr[:, None] * w[:, 1:]).sum(0),
                           -(dr[:, None] * w[:, 1:] * z).sum(0)])
    return float(huber(r, delta).sum() / delta / len(z)), grad


def _objective_shared(theta: np.ndarray, z: np.ndarray, g: np.ndarray, log_y: np.ndarray, delta: float,
                      n_groups: int) -> tuple[float, np.ndarray]:
    """`_objective` for one size variable with e shared by all groups and (a, alpha) per group.

    theta: [e, a_1..a_G, alpha_1..alpha_G]; z: [n] normalised log sizes; g: [n] group index in [0, G).
    """
    e, a, alpha = theta[0], theta[1:1 + n_groups], theta[1 + n_groups:]
    t1 = a[g] - alpha[g] * z
    m = np.maximum(e, t1)
    ex0, ex1 = np.exp(e - m), np.exp(t1 - m)
    tot = ex0 + ex1
    r = m + np.log(tot) - log_y
    w0, w1 = ex0 / tot, ex1 / tot
    dr = np.clip(r, -delta, delta) / delta / len(z)
    grad = np.concatenate([[np.sum(dr * w0)], np.bincount(g, dr * w1, n_groups),
                           -np.bincount(g, dr * w1 * z, n_groups)])
    return float(huber(r, delta).sum() / delta / len(z)), grad


def _minimise(theta0: np.ndarray, z: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    k = z.shape[1]
    bounds = [LOG_BOUNDS] * (1 + k) + [ALPHA_BOUNDS] * k
    res = minimize(_objective, theta0, args=(z, log_y, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    return res.x, float(res.fun)


def _minimise_shared(theta0: np.ndarray, z: np.ndarray, g: np.ndarray, log_y: np.ndarray, delta: float,
                     n_groups: int) -> tuple[np.ndarray, float]:
    bounds = [LOG_BOUNDS] * (1 + n_groups) + [ALPHA_BOUNDS] * n_groups
    res = minimize(_objective_shared, theta0, args=(z, g, log_y, delta, n_groups), jac=True, method="L-BFGS-B",
                   bounds=bounds, options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    return res.x, float(res.fun)


def initial_grid(log_y: np.ndarray, k: int) -> list[np.ndarray]:
    """Starting points spread around the data: E below the smallest loss, each term a share of the spread."""
    y = np.exp(log_y)
    spread = max(float(y.max() - y.min()), 1e-3 * float(y.min()))
    e_grid = np.log(y.min() * np.array([0.2, 0.5, 0.8, 0.95]))
    a_grid = np.log(spread * np.array([0.2, 1.0]))
    alpha_grid = [0.1, 0.3, 0.7]
    return [np.array([e, *a, *al]) for e in e_grid
            for a in itertools.product(a_grid, repeat=k) for al in itertools.product(alpha_grid, repeat=k)]


def _single_thread_blas():
    # L-BFGS-B calls BLAS on 3-5 parameters; a multi-threaded BLAS spends ~4x the time synchronising.
    return threadpool_limits(1) if threadpool_limits is not None else nullcontext()


def _best_of(objective, minimise, starts: list[np.ndarray]) -> np.ndarray:
    if len(starts) > N_STARTS:
        # Screening the grid by its starting objective keeps the L-BFGS runs few without losing the basin.
        f0 = [objective(t) for t in starts]
        starts = [starts[i] for i in np.argsort(f0)[:N_STARTS]]
    best, best_f = None, np.inf
    for theta0 in starts:
        theta, f = minimise(theta0)
        if f < best_f:
            best, best_f = theta, f
    return best


def _fit_theta(z: np.ndarray, log_y: np.ndarray, starts: list[np.ndarray], delta: float) -> np.ndarray:
    return _best_of(lambda t: _objective(t, z, log_y, delta)[0], lambda t: _minimise(t, z, log_y, delta), starts)


def _to_public(theta: np.ndarray, x0: np.ndarray, names: list[str]) -> dict[str, float]:
    k = len(x0)
    e, a, alpha = theta[0], theta[1:1 + k], theta[1 + k:]
    out = {names[0]: float(np.exp(e))}
    for name_a, name_alpha, a_j, alpha_j, x0_j in zip(names[1::2], names[2::2], a, alpha, x0):
        # A x^-alpha = exp(a) (x / x0)^-alpha  =>  A = exp(a) x0^alpha; computed in logs to avoid overflow.
        out[name_a] = float(np.exp(min(a_j + alpha_j * np.log(x0_j), 700.0)))
        out[name_alpha] = float(alpha_j)
    return out


def predict_theta(theta: np.ndarray, x0: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Loss predicted by normalised parameters. x: [n, k] raw sizes -> [n]."""
    x = np.atleast_2d(np.asarray(x, dtype=float))
    k = len(x0)
    z = np.log(x / x0[None, :])
    terms = np.concatenate([np.full((len(z), 1), theta[0]), theta[1:1 + k][None, :] - theta[1 + k:][None, :] * z],
                           axis=1)
    return np.exp(logsumexp(terms, axis=1))


def predict(fit: PowerLawFit, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point prediction and 95% bootstrap band at raw sizes x: [n, k] (or [n] for one variable) -> 3 x [n]."""
    x = np.asarray(x, dtype=float)
    x = x[:, None] if x.ndim == 1 else x
    mid = predict_theta(fit.theta, fit.x0, x)
    if fit.boot_thetas is None or len(fit.boot_thetas) < 2:
        return mid, np.full_like(mid, np.nan), np.full_like(mid, np.nan)
    boots = np.stack([predict_theta(t, fit.x0, x) for t in fit.boot_thetas])
    q = 100 * (1 - CI_LEVEL) / 2
    return mid, np.percentile(boots, q, axis=0), np.percentile(boots, 100 - q, axis=0)


def _exponents_ok(alpha: np.ndarray) -> bool:
    # A refit whose exponent sits on the search bound has degenerated (a constant term, or a step): count it failed.
    lo, hi = ALPHA_BOUNDS
    return bool(np.all(np.isfinite(alpha)) and np.all(alpha > lo + 1e-6) and np.all(alpha < hi - 1e-6))


def fit_scaling_law(x: np.ndarray, y: np.ndarray, n_bootstrap: int = 500, seed: int = 0,
                    delta: float = HUBER_DELTA, names: list[str] | None = None) -> PowerLawFit:
    """Fit L = E + sum_j A_j x_j^-alpha_j. x: [n] or [n, k] raw sizes (k = 1 or 2); y: [n] losses (> 0).

    Rows are runs; repeated x (several seeds) are fine. Fitted only where `identifiability` passes, otherwise
    status "not_identifiable" with the reason. `names` renames the public parameters (default E, A, alpha[, B,
    beta]; e.g. E, A, gamma for L(C)).
    """
    with _single_thread_blas():
        return _fit_scaling_law(x, y, n_bootstrap, seed, delta, names)


def _clean_inputs(x: np.ndarray, y: np.ndarray, names: list[str] | None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    x = np.asarray(x, dtype=float)
    x = x[:, None] if x.ndim == 1 else x
    y = np.asarray(y, dtype=float)
    if x.shape[0] != y.shape[0] or x.shape[1] not in PARAM_NAMES:
        raise ValueError(f"x must be [n] or [n, k] with k in (1, 2) and n = len(y) = {len(y)}, got {x.shape}")
    k = x.shape[1]
    names = list(names or PARAM_NAMES[k])
    if len(names) != 1 + 2 * k:
        raise ValueError(f"names must list {1 + 2 * k} parameter names for {k} size variable(s), got {names}")
    keep = np.isfinite(y) & (y > 0) & np.all(np.isfinite(x) & (x > 0), axis=1)
    return x[keep], y[keep], names


def _fit_scaling_law(x: np.ndarray, y: np.ndarray, n_bootstrap: int, seed: int, delta: float,
                     names: list[str] | None) -> PowerLawFit:
    x, y, names = _clean_inputs(x, y, names)
    k = x.shape[1]
    n_params = 1 + 2 * k
    n_distinct = len({tuple(row) for row in x})
    reason = identifiability(x, n_params)
    if reason:
        return PowerLawFit(status=STATUS_NOT_IDENTIFIABLE, reason=reason, n_params=n_params, n_points=len(y),
                           n_distinct=n_distinct)
    x0 = np.exp(np.log(x).mean(0))
    z, log_y = np.log(x / x0), np.log(y)
    theta = _fit_theta(z, log_y, initial_grid(log_y, k), delta)

    def refit(ly: np.ndarray) -> np.ndarray | None:
        # Resamples start at the full-data optimum: a resample's optimum lies close to it.
        t = _fit_theta(z, ly, [theta], delta)
        return t if _exponents_ok(t[1 + k:]) else None

    boots, note = bootstrap(refit, size_labels(*x.T), log_y, n_bootstrap, seed)
    law = _FitParts(FORM_FREE, n_params, n_distinct, x, y, theta, x0, lambda t: _to_public(t, x0, names),
                    names[2::2])
    return _fitted(law, boots, n_bootstrap, note)


@dataclass(frozen=True)
class _FitParts:
    """A law of `form` with `n_params` parameters fitted at `theta` (normalised by `x0`) to runs at sizes `x`
    with losses `y` (`n_distinct` distinct sizes); `to_public(theta)` names its parameters and `exponents`
    are those checked for plausibility."""

    form: str
    n_params: int
    n_distinct: int
    x: np.ndarray
    y: np.ndarray
    theta: np.ndarray
    x0: np.ndarray
    to_public: Callable[[np.ndarray], dict[str, float]]
    exponents: list[str]


def _fitted(law: _FitParts, boots: list[np.ndarray], n_bootstrap: int, note: str) -> PowerLawFit:
    """The PowerLawFit of `law` with its successful bootstrap refits `boots` (of `n_bootstrap`, `note` saying
    why any failed): public parameters, their intervals (or why omitted), flags and residuals."""
    params = law.to_public(law.theta)
    intervals, note = intervals_from(params, [law.to_public(t) for t in boots], n_bootstrap, note)
    residuals = (np.log(law.y) - np.log(predict_theta(law.theta, law.x0, law.x))).tolist()
    return PowerLawFit(status=STATUS_OK, form=law.form, n_params=law.n_params, n_points=len(law.y),
                       n_distinct=law.n_distinct, params=params, intervals=intervals, interval_note=note,
                       flags=exponent_flags(params, law.exponents), residuals=residuals, n_bootstrap=n_bootstrap,
                       n_bootstrap_ok=len(boots), theta=law.theta, x0=law.x0,
                       boot_thetas=np.array(boots) if intervals else None)


def fit_power_law(x: np.ndarray, y: np.ndarray, n_bootstrap: int = 500, seed: int = 0,
                  names: list[str] | None = None) -> PowerLawFit:
    """Fit the constrained 2-parameter law L = A x^-alpha (E = 0) by least squares in log-log.

    x: [n] raw sizes; y: [n] losses. `names` as for fit_scaling_law (E, A, alpha); E is not reported. Needs
    3 distinct sizes (with 2 the line passes exactly through both size means). With a real irreducible loss
    the exponent comes out smaller than the free law's: it is a description of the measured range, labelled
    FORM_POWER, not an estimate of E + A x^-alpha.
    """
    x, y, names = _clean_inputs(x, y, names)
    if x.shape[1] != 1:
        raise ValueError(f"x must be one size variable [n] for a power law, got shape {x.shape}")
    n_distinct = len(np.unique(x))
    reason = identifiability(x, 2)
    if reason:
        return PowerLawFit(status=STATUS_NOT_IDENTIFIABLE, reason=reason, form=FORM_POWER, n_params=2,
                           n_points=len(y), n_distinct=n_distinct)
    x0 = np.exp(np.log(x).mean(0))
    z, log_y = np.log(x / x0)[:, 0], np.log(y)
    zc = z - z.mean()

    def solve(ly: np.ndarray) -> np.ndarray:
        slope = float(zc @ (ly - ly.mean()) / (zc @ zc))
        return np.array([-np.inf, ly.mean() - slope * z.mean(), -slope])

    boots, note = bootstrap(solve, size_labels(x[:, 0]), log_y, n_bootstrap, seed)

    def to_public(t: np.ndarray) -> dict[str, float]:   # A and alpha: a power law has no E
        p = _to_public(t, x0, names)
        return {name: p[name] for name in names[1:3]}

    law = _FitParts(FORM_POWER, 2, n_distinct, x, y, solve(log_y), x0, to_public, [names[2]])
    return _fitted(law, boots, n_bootstrap, note)


def fit_shared_e(xs: list[np.ndarray], ys: list[np.ndarray], n_bootstrap: int = 500, seed: int = 0,
                 delta: float = HUBER_DELTA, names: list[str] | None = None) -> list[PowerLawFit]:
    """Fit L_v = E + A_v x^-alpha_v jointly over variants v: one irreducible loss E, per-variant A_v and alpha_v.

    xs, ys: per variant, [n_v] raw sizes and losses. Returns one PowerLawFit per variant (form FORM_SHARED_E, E
    the same in all), each "not_identifiable" unless there are >= 2 variants with >= 3 distinct sizes each and
    more points than the 1 + 2V parameters. The bootstrap resamples runs within each (variant, size).
    """
    with _single_thread_blas():
        return _fit_shared_e(xs, ys, n_bootstrap, seed, delta, names)


def _fit_shared_e(xs, ys, n_bootstrap, seed, delta, names) -> list[PowerLawFit]:
    clean = [_clean_inputs(x, y, names) for x, y in zip(xs, ys, strict=True)]
    names = clean[0][2] if clean else list(PARAM_NAMES[1])
    if any(x.shape[1] != 1 for x, _, _ in clean):
        raise ValueError("xs must hold one size variable [n] per variant for a shared-E fit")
    n_groups = len(clean)
    n_params = 1 + 2 * n_groups
    sizes = [len(np.unique(x)) for x, _, _ in clean]
    if n_groups < 2 or min(sizes) < 3 or len(set(zip(*_joint_keys(clean)))) <= n_params:
        reason = (f"not identifiable: a shared E needs >= 2 variants with >= 3 sizes each and more distinct "
                  f"points than its {n_params} parameters; got sizes {sizes} per variant")
        return [PowerLawFit(status=STATUS_NOT_IDENTIFIABLE, reason=reason, form=FORM_SHARED_E, n_params=n_params,
                            n_points=len(y), n_distinct=s) for (_, y, _), s in zip(clean, sizes)]
    x0s = np.array([np.exp(np.log(x).mean()) for x, _, _ in clean])
    g = np.concatenate([np.full(len(y), i) for i, (_, y, _) in enumerate(clean)])
    x_all = np.concatenate([x[:, 0] for x, _, _ in clean])
    z, log_y = np.log(x_all / x0s[g]), np.log(np.concatenate([y for _, y, _ in clean]))

    def fit(ly: np.ndarray, starts: list[np.ndarray]) -> np.ndarray:
        return _best_of(lambda t: _objective_shared(t, z, g, ly, delta, n_groups)[0],
                        lambda t: _minimise_shared(t, z, g, ly, delta, n_groups), starts)

    grid = [np.concatenate([[t[0]], np.full(n_groups, t[1]), np.full(n_groups, t[2])])
            for t in initial_grid(log_y, 1)]
    theta = fit(log_y, grid)

    def refit(ly: np.ndarray) -> np.ndarray | None:
        t = fit(ly, [theta])
        return t if _exponents_ok(t[1 + n_groups:]) else None

    boots, note = bootstrap(refit, size_labels(g, x_all), log_y, n_bootstrap, seed)

    def variant_theta(t: np.ndarray, v: int) -> np.ndarray:
        return np.array([t[0], t[1 + v], t[1 + n_groups + v]])

    out = []
    for v, (x, y, _) in enumerate(clean):
        x0 = x0s[v:v + 1]
        law = _FitParts(FORM_SHARED_E, n_params, sizes[v], x, y, variant_theta(theta, v), x0,
                        lambda t, x0=x0: _to_public(t, x0, names), [names[2]])
        out.append(_fitted(law, [variant_theta(t, v) for t in boots], n_bootstrap, note))
    return out


def _joint_keys(clean) -> tuple[list[int], list[float]]:
    """(variant index, size) of every run of a joint fit."""
    return ([v for v, (_, y, _) in enumerate(clean) for _ in y], [float(s) for x, _, _ in clean for s in x[:, 0]])
