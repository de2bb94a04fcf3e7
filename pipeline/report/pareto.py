"""Pareto fronts for two costs to minimise (e.g. perplexity against KV-cache bytes)."""
from __future__ import annotations

import numpy as np


def pareto_mask_naive(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Reference: point i is on the front unless some j is <= in both and < in one. x, y: [n] -> bool [n]."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.ones(len(x), dtype=bool)
    for i in range(len(x)):
        dominated = (x <= x[i]) & (y <= y[i]) & ((x < x[i]) | (y < y[i]))
        keep[i] = not dominated.any()
    return keep


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-dominated points when minimising both x and y, O(n log n). x, y: [n] -> bool [n].

    Points equal in both coordinates are all kept (none strictly dominates the others).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    keep = np.zeros(len(x), dtype=bool)
    order = np.lexsort((y, x))            # by x, then y
    best_y = np.inf                       # smallest y among points with strictly smaller x
    i = 0
    while i < len(order):
        # Points sharing one x value: only those with the group's smallest y can survive, and only if
        # nothing with a smaller x reached that y or lower.
        j = i
        while j < len(order) and x[order[j]] == x[order[i]]:
            j += 1
        group = order[i:j]
        group_min = y[group].min()
        if group_min < best_y:
            keep[group[y[group] == group_min]] = True
        best_y = min(best_y, group_min)
        i = j
    return keep
