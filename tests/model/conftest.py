"""Fixtures of the model tests."""

import pytest

import attamba.ops.attention as attn
from attamba.ops import ssd


@pytest.fixture
def cuda_backends(monkeypatch):
    """use(attention, scan) sets the attention and SSD scan backends for the rest of the test."""
    def use(attention: str, scan: str) -> None:
        monkeypatch.setattr(attn, "DEFAULT_BACKEND", attention)
        monkeypatch.setenv(ssd.BACKEND_ENV, scan)
        ssd.default_backend.cache_clear()

    yield use
    ssd.default_backend.cache_clear()
