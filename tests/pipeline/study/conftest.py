"""Fixtures of the study tests."""

import shutil
import tempfile

import pytest

from tests.helpers import stop_processes


@pytest.fixture
def ray_tmp():
    """A short, unique Ray temp dir (Unix socket paths must stay under 108 bytes); every process that
    names it is stopped at the end."""
    path = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    yield path
    stop_processes(path)
    shutil.rmtree(path, ignore_errors=True)
