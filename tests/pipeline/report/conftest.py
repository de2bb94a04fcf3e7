"""The synthetic claims studies the claims and context tests share, each built once per session (a real SQLite
MLflow store and a report)."""
from __future__ import annotations

import pytest

from tests.pipeline.report.test_claims import _study


@pytest.fixture(scope="session")
def shown(tmp_path_factory):
    """The transformer loses through every window: context is shown to matter."""
    return _study(tmp_path_factory.mktemp("claims_shown"), "shown")


@pytest.fixture(scope="session")
def flat(tmp_path_factory):
    """The same runs, but the transformer scores the same through its windows: context is not shown to matter."""
    return _study(tmp_path_factory.mktemp("claims_flat"), "flat")
