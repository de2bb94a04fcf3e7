"""Fixtures of the search tests."""

import pytest


@pytest.fixture
def search_env(tmp_path, monkeypatch):
    """Storage, MLflow store, data cache and outputs all in tmp_path; Ray stopped afterwards whatever happens."""
    monkeypatch.setenv("ATTAMBA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv("ATTAMBA_OPTUNA_STORAGE", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    yield tmp_path
    import ray

    if ray.is_initialized():
        ray.shutdown()
