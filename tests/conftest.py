"""Fixtures every test folder may use."""

import pytest
import torch


@pytest.fixture
def one_thread():
    # Tiny decode steps on a shared 2-core machine: a second intra-op thread only spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
