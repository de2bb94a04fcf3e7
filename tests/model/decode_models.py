"""Models shared by the decoding and cost tests."""

import pytest
import torch

from attamba.config import SSMConfig
from attamba.presets import model_config

VOCAB = 61


@pytest.fixture
def one_thread():
    # Tiny decode steps on a shared 2-core machine: a second intra-op thread only spins.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small(**overrides):
    # Slow decay, large steps and a wider init make the SSM states matter at the 1e-4 tolerance,
    # so a state carried across a chunk start (or wrongly dropped) shows in the logits.
    ssm = SSMConfig(state_dim=8, inner_dim=32, heads=2, scan_chunk=8, a_init_min=0.05, a_init_max=0.5,
                    dt_min=0.1, dt_max=1.0)
    return model_config("micro", **{"vocab_size": VOCAB, "max_seq_len": 128, "ssm": ssm,
                                    "init_std": 0.1, **overrides})
