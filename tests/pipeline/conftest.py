"""Fixtures of the pipeline tests: a data cache per module and a run's environment (cache, MLflow store, one
thread) in the test's tmp_path."""

import pytest
import torch


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")



@pytest.fixture()
def env(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("ATTAMBA_CACHE", str(cache))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield tmp_path
    torch.set_num_threads(threads)
