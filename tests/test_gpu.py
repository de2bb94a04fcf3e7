"""The whole model on a CUDA GPU: the fast kernels (FlexAttention, mamba-ssm's Triton SSD) against the
references, end to end, and decoding on the GPU. Skipped without a GPU (CI has none)."""

from __future__ import annotations

import pytest
import torch

import attamba.ops.attention as attn
from attamba.ops import ssd
from attamba.model import AttambaLM
from attamba.presets import model_config

from attamba.generate import decode_logits
from tests.model.decode_models import small

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

KINDS = {
    "attamba-cyclic": dict(attention="attamba", chunk_size=8, leading_tokens=7, boundaries="cyclic"),
    "attamba-random": dict(attention="attamba", chunk_size=4, leading_tokens=3, boundaries="random"),
    "attamba-offset": dict(attention="attamba", chunk_size=8, leading_tokens=5, ssm_segmentation="offset"),
    "full": dict(attention="full"),
    "swa": dict(attention="swa", window=16),
    "iso_kv": dict(attention="iso_kv", kv_dim=32),
}


def use_backends(monkeypatch, attention: str, scan: str) -> None:
    monkeypatch.setattr(attn, "DEFAULT_BACKEND", attention)
    monkeypatch.setenv(ssd.BACKEND_ENV, scan)
    ssd.default_backend.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_ssd_default():
    yield
    ssd.default_backend.cache_clear()


def logits_and_grads(model: AttambaLM, tokens: torch.Tensor):
    model.zero_grad(set_to_none=True)
    logits = model(tokens)
    gen = torch.Generator().manual_seed(3)
    (logits * torch.randn(logits.shape, generator=gen).cuda()).sum().backward()
    return logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.parametrize("kind", KINDS)
def test_model_fast_kernels_match_references_on_cuda(kind, monkeypatch):
    """Logits and every parameter gradient: (flex or causal SDPA, Triton SSD) vs (dense mask, PyTorch SSD)."""
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    cfg = model_config("micro", max_seq_len=256, **KINDS[kind])
    model = AttambaLM(cfg).cuda().eval()  # eval: random boundaries drawn from the seed, identical in both runs
    tokens = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1)).cuda()
    use_backends(monkeypatch, "naive", "chunked")
    ref_logits, ref_grads = logits_and_grads(model, tokens)
    fast_scan = "triton" if ssd.triton_available() else "chunked"
    use_backends(monkeypatch, "auto", fast_scan)
    logits, grads = logits_and_grads(model, tokens)
    worst = max(rel(grads[n], ref_grads[n]) for n in ref_grads)
    print(f"\n{kind} (scan {fast_scan}): logits rel err {rel(logits, ref_logits):.2e}, worst grad rel err {worst:.2e}")
    assert rel(logits, ref_logits) < 1e-5
    assert worst < 1e-4


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "attamba-offset"])  # offset: no decoding (tested)
def test_decode_matches_parallel_on_cuda(kind, monkeypatch):
    """Prefill through the fast kernels, then token-by-token decoding on the GPU: the parallel logits."""
    monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
    use_backends(monkeypatch, "auto", "triton" if ssd.triton_available() else "chunked")
    model = AttambaLM(small(**KINDS[kind])).cuda().eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(2)).cuda()
    parallel = model(tokens)
    for prefill_length in (0, 37):
        err = float((decode_logits(model, tokens, prefill_length) - parallel).abs().max())
        print(f"\n{kind}: decode (prefill {prefill_length}) vs parallel max abs diff {err:.2e}")
        assert err <= 1e-4
