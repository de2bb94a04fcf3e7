"""Search: a declared P/L space and objectives, an Optuna study as the only state, ask/tell of trials that
train on Ray, and the Pareto front exported as CSV, JSON and a plot."""

from pipeline.search.driver import run_search
from pipeline.search.space import SearchConfig, load_search

__all__ = ["SearchConfig", "load_search", "run_search"]
