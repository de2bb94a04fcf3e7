"""Where a study's or search's outputs go: relative paths under $ATTAMBA_HOME, refused inside a Ray job
without it (a job's working directory is a temporary folder of the Ray session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.runs.outputs import HOME_ENV, RAY_JOB_ENV, durable_path, durable_uri, in_ray_job, output_root, tracking_uri


@pytest.fixture
def local(monkeypatch, tmp_path):
    """A plain local process in tmp_path: no Ray job, no $ATTAMBA_HOME, no tracking URI in the environment."""
    for name in (HOME_ENV, RAY_JOB_ENV, "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def ray_job(local, monkeypatch):
    """The environment Ray's job supervisor gives a job's entrypoint (seen with `ray job submit`)."""
    monkeypatch.setenv(RAY_JOB_ENV, '{"runtime_env": {}, "metadata": {}}')
    return local


def test_local_run_resolves_against_the_working_directory(local):
    assert not in_ray_job() and output_root() == local
    assert durable_path("studies", "out_dir") == local / "studies"
    assert durable_path("/abs/studies", "out_dir") == Path("/abs/studies")
    assert tracking_uri(None) == f"sqlite:///{local}/mlflow.db"


def test_relative_paths_and_sqlite_uris_resolve_under_attamba_home(local, monkeypatch, tmp_path):
    home = tmp_path / "home"
    monkeypatch.setenv(HOME_ENV, str(home))
    assert output_root() == home
    assert durable_path("studies", "out_dir") == home / "studies"
    assert durable_uri("sqlite:///mlflow.db", "tracking.uri") == f"sqlite:///{home}/mlflow.db"
    assert durable_uri("sqlite:///sub/o.db?timeout=5", "storage") == f"sqlite:///{home}/sub/o.db?timeout=5"
    assert tracking_uri(None) == f"sqlite:///{home}/mlflow.db"
    assert tracking_uri("sqlite:///runs.db") == f"sqlite:///{home}/runs.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert tracking_uri(None) == f"sqlite:///{home}/env.db"
    # absolute paths, in-memory databases and servers are left alone
    for uri in ("sqlite:////abs/m.db", "sqlite:///:memory:", "sqlite://", "http://mlflow:5000",
                "postgresql+psycopg2://u:p@db/optuna"):
        assert durable_uri(uri, "storage") == uri


def test_a_relative_attamba_home_is_refused(local, monkeypatch):
    monkeypatch.setenv(HOME_ENV, "data/attamba")
    with pytest.raises(ValueError, match=r"ATTAMBA_HOME='data/attamba' is a relative path; set it to an absolute"):
        durable_path("studies", "out_dir")


def test_a_ray_job_refuses_relative_paths_without_attamba_home(ray_job, monkeypatch, tmp_path):
    assert in_ray_job() and output_root() is None
    with pytest.raises(ValueError, match=r"out_dir='studies' is a relative path and this runs as a Ray job.*"
                                         r"set ATTAMBA_HOME to an absolute folder"):
        durable_path("studies", "out_dir")
    with pytest.raises(ValueError, match=r"tracking.uri='mlflow.db' is a relative path .* Ray job"):
        tracking_uri(None)
    with pytest.raises(ValueError, match=r"MLFLOW_TRACKING_URI='m.db' is a relative path"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///m.db")
        tracking_uri(None)
    # absolute paths and servers need no home
    assert durable_path(tmp_path / "s", "out_dir") == tmp_path / "s"
    assert tracking_uri("http://mlflow:5000") == "http://mlflow:5000"
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))
    assert durable_path("studies", "out_dir") == tmp_path / "home" / "studies"


def test_a_ray_package_folder_counts_as_a_ray_job(local, monkeypatch, tmp_path):
    # the working directory `ray job submit --working-dir` gives the entrypoint and its workers
    package = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0123"
    package.mkdir(parents=True)
    monkeypatch.chdir(package)
    assert in_ray_job()
    with pytest.raises(ValueError, match=r"out_dir='searches' is a relative path and this runs as a Ray job"):
        durable_path("searches", "out_dir")
