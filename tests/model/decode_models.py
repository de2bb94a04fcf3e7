"""Models shared by the decoding, cost and CUDA tests."""

import pytest
import torch

import attamba.ops.attention as attn
from attamba.config import SSMConfig
from attamba.ops import ssd
from attamba.presets import model_config

VOCAB = 61

# The model kinds compared on a CUDA GPU: fast kernels against the references, and decoding.
CUDA_KINDS = {
    "attamba-cyclic": dict(attention="attamba", chunk_size=8, leading_tokens=7, boundaries="cyclic"),
    "attamba-random": dict(attention="attamba", chunk_size=4, leading_tokens=3, boundaries="random"),
    "attamba-offset": dict(attention="attamba", chunk_size=8, leading_tokens=5, ssm_segmentation="offset"),
    "full": dict(attention="full"),
    "swa": dict(attention="swa", window=16),
    "iso_kv": dict(attention="iso_kv", kv_dim=32),
}


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


@pytest.fixture
def cuda_backends(monkeypatch):
    """use(attention, scan) sets the attention and SSD scan backends for the rest of the test."""
    def use(attention: str, scan: str) -> None:
        monkeypatch.setattr(attn, "DEFAULT_BACKEND", attention)
        monkeypatch.setenv(ssd.BACKEND_ENV, scan)
        ssd.default_backend.cache_clear()

    yield use
    ssd.default_backend.cache_clear()
