"""What the tracking tests share: one SQLite MLflow store per test module and a client of it."""

import pytest

from tests.pipeline.tracking.mlflow_runs import client


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module: creating its schema costs a few seconds."""
    root = tmp_path_factory.mktemp("mlflow_sqlite")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client(uri).search_experiments()  # runs the migrations once
    return uri

