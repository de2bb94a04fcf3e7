"""Scaling-law fits in the style of Chinchilla approach 3 (Hoffmann et al. 2022).

L = E + sum_j A_j * x_j^(-alpha_j), fitted as log L = logsumexp(e, a_j - alpha_j * log(x_j / x0_j)) with a
Huber loss (delta 1e-3) on log-space residuals, L-BFGS from a grid of starting points. One size variable
gives L(N) or L(C); two give L(N, D) = E + A/N^alpha + B/D^beta.

Each x_j is divided by its geometric mean x0_j before fitting: with raw N ~ 1e8 or C ~ 1e18 the
coefficient a_j would sit far from its grid and the problem would be badly conditioned.
Uncertainty comes from a seeded bootstrap over runs (seeds included), refitting every resample.
"""
from __future__ import annotations

import itertools
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: only makes the fits faster
    threadpool_limits = None

HUBER_DELTA = 1e-3
ALPHA_BOUNDS = (0.0, 5.0)
LOG_BOUNDS = (-40.0, 40.0)
CI_LEVEL = 0.95
N_STARTS = 10   # grid points, ranked by their starting objective, that L-BFGS is run from
# Names of the public parameters for one and two size variables.
PARAM_NAMES = {1: ["E", "A", "alpha"], 2: ["E", "A", "alpha", "B", "beta"]}


@dataclass
class PowerLawFit:
    """A fitted law L = E + sum_j A_j x_j^-alpha_j, or the reason it was not fitted (`status != "ok"`).

    `params` and `intervals` use the names E, A, alpha (and B, beta); A and B are in the units of the raw x.
    `residuals` are log(observed) - log(predicted), one per input point, in input order.
    """

    status: str
    reason: str = ""
    n_points: int = 0
    n_distinct: int = 0
    params: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    residuals: list[float] = field(default_factory=list)
    n_bootstrap: int = 0
    n_bootstrap_ok: int = 0
    theta: np.ndarray | None = None          # [e, a_1..a_k, alpha_1..alpha_k] in normalised coordinates
    x0: np.ndarray | None = None             # per-variable normalisers
    boot_thetas: np.ndarray | None = None    # [n_bootstrap_ok, 1 + 2k]

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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


def _minimise(theta0: np.ndarray, z: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
    k = z.shape[1]
    bounds = [LOG_BOUNDS] * (1 + k) + [ALPHA_BOUNDS] * k
    res = minimize(_objective, theta0, args=(z, log_y, delta), jac=True, method="L-BFGS-B", bounds=bounds,
                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
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


def _fit_theta(z: np.ndarray, log_y: np.ndarray, starts: list[np.ndarray], delta: float) -> np.ndarray:
    if len(starts) > N_STARTS:
        # Screening the grid by its starting objective keeps the L-BFGS runs few without losing the basin.
        f0 = [_objective(t, z, log_y, delta)[0] for t in starts]
        starts = [starts[i] for i in np.argsort(f0)[:N_STARTS]]
    best, best_f = None, np.inf
    for theta0 in starts:
        theta, f = _minimise(theta0, z, log_y, delta)
        if f < best_f:
            best, best_f = theta, f
    return best


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


def fit_scaling_law(x: np.ndarray, y: np.ndarray, n_bootstrap: int = 500, seed: int = 0,
                    delta: float = HUBER_DELTA, names: list[str] | None = None) -> PowerLawFit:
    """Fit L = E + sum_j A_j x_j^-alpha_j. x: [n] or [n, k] raw sizes (k = 1 or 2); y: [n] losses (> 0).

    Rows are runs; repeated x (several seeds) are fine. Needs at least as many distinct x rows as parameters
    (3 for one variable, 5 for two), otherwise returns status "insufficient" with the reason.
    `names` renames the public parameters (default E, A, alpha[, B, beta]; e.g. E, A, gamma for L(C)).
    """
    with _single_thread_blas():
        return _fit_scaling_law(x, y, n_bootstrap, seed, delta, names)


def _fit_scaling_law(x: np.ndarray, y: np.ndarray, n_bootstrap: int, seed: int, delta: float,
                     names: list[str] | None) -> PowerLawFit:
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
    x, y = x[keep], y[keep]
    n_params = 1 + 2 * k
    n_distinct = len({tuple(row) for row in x})
    per_var = [len(np.unique(x[:, j])) for j in range(k)]
    if n_distinct < n_params or min(per_var, default=0) < 2:
        return PowerLawFit(status="insufficient", n_points=len(y), n_distinct=n_distinct,
                           reason=f"{n_distinct} distinct size point(s) (per variable {per_var}) for "
                                  f"{n_params} parameters: need at least {n_params} and 2 per variable; not fitted")
    x0 = np.exp(np.log(x).mean(0))
    z, log_y = np.log(x / x0), np.log(y)
    grid = initial_grid(log_y, k)
    theta = _fit_theta(z, log_y, grid, delta)

    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_bootstrap):
        idx = rng.integers(0, len(y), len(y))
        if len({tuple(row) for row in x[idx]}) < n_params or min(len(np.unique(x[idx, j])) for j in range(k)) < 2:
            continue
        # Resamples start at the full-data optimum: a resample's optimum lies close to it.
        boots.append(_fit_theta(z[idx], log_y[idx], [theta], delta))
    boot_thetas = np.array(boots) if boots else None

    params = _to_public(theta, x0, names)
    intervals = {}
    if boot_thetas is not None and len(boot_thetas) >= 2:
        pub = [_to_public(t, x0, names) for t in boot_thetas]
        q = 100 * (1 - CI_LEVEL) / 2
        for name in params:
            vals = np.array([p[name] for p in pub])
            intervals[name] = (float(np.percentile(vals, q)), float(np.percentile(vals, 100 - q)))
    residuals = (log_y - np.log(predict_theta(theta, x0, x))).tolist()
    return PowerLawFit(status="ok", n_points=len(y), n_distinct=n_distinct, params=params, intervals=intervals,
                       residuals=residuals, n_bootstrap=n_bootstrap, n_bootstrap_ok=len(boots), theta=theta,
                       x0=x0, boot_thetas=boot_thetas)
