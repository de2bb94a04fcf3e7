"""The LM as a whole: causality for every attention kind, determinism, and the SSM's chunk Jacobian."""

import pytest
import torch

from attamba import boundaries as bnd
from attamba.config import SSMConfig
from attamba.layers import GatedRMSNorm, gated_rms_norm_reference
from attamba.model import AttambaLM
from attamba.ops import ssd
from attamba.presets import model_config
from attamba.ssm import ChunkSSM
from tests.helpers import assert_close, errors
from tests.model.decode_models import CUDA_KINDS

VARIANTS = {
    "full": {"attention": "full"},
    "swa": {"attention": "swa", "window": 5},
    "iso_kv": {"attention": "iso_kv", "kv_dim": 8},
    "attamba-uniform": {"boundaries": "uniform", "chunk_size": 4, "leading_tokens": 3},
    "attamba-cyclic": {"boundaries": "cyclic", "chunk_size": 5, "leading_tokens": 2},
    "attamba-cyclic-released": {"boundaries": "cyclic_released", "chunk_size": 8, "leading_tokens": 1},
    "attamba-random": {"boundaries": "random", "chunk_size": 3, "leading_tokens": 0},
    "attamba-pseudo": {"pseudo_chunk": True, "chunk_size": 4},
    "attamba-offset": {"ssm_segmentation": "offset", "chunk_size": 4, "leading_tokens": 2},
    "attamba-kvproj-nores": {"kv_proj": True, "ssm_residual": False, "chunk_size": 2},
}


def small(**overrides):
    ssm = SSMConfig(state_dim=8, inner_dim=32, heads=2, scan_chunk=8)
    return model_config("micro", vocab_size=61, max_seq_len=64, ssm=ssm, **overrides)


@pytest.mark.parametrize("name", VARIANTS)
def test_lm_is_causal(name):
    model = AttambaLM(small(**VARIANTS[name])).double().eval()
    torch.manual_seed(0)
    tokens = torch.randint(0, 61, (2, 37))
    base = model(tokens)
    assert base.shape == (2, 37, 61) and torch.isfinite(base).all()
    for t in (0, 9, 20, 36):
        changed = tokens.clone()
        changed[:, t + 1:] = torch.randint(0, 61, changed[:, t + 1:].shape)
        out = model(changed)
        assert torch.equal(out[:, : t + 1], base[:, : t + 1]), f"position <= {t} changed"
        if t < 36:
            assert not torch.allclose(out[:, t + 1:], base[:, t + 1:])


def test_loss_and_backward_every_parameter():
    model = AttambaLM(small(boundaries="cyclic", chunk_size=4, leading_tokens=2))
    tokens = torch.randint(0, 61, (2, 33))
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    assert loss.ndim == 0 and 3.5 < loss.item() < 4.8  # about ln(61) at init
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    per_token = model(tokens[:, :-1], targets=tokens[:, 1:], reduction="none")
    assert per_token.shape == (2, 32)
    assert_close("mean per-token loss", loss, per_token.mean(), 1e-5, measure="rel")


def test_init_is_deterministic_and_leaves_global_rng():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = AttambaLM(small())
    after = torch.rand(1)
    assert torch.equal(before, after)
    b = AttambaLM(small())
    c = AttambaLM(small(seed=1))
    for (n, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), n
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))


def test_random_boundaries_redrawn_in_training_fixed_in_eval():
    model = AttambaLM(small(boundaries="random", chunk_size=4))
    pos = torch.arange(64)
    model.train()
    draws = [model.layer_chunks(pos)[0].boundaries for _ in range(3)]
    assert not (torch.equal(draws[0], draws[1]) and torch.equal(draws[1], draws[2]))
    model.eval()
    assert torch.equal(model.layer_chunks(pos)[0].boundaries, model.layer_chunks(pos)[0].boundaries)


def test_sequence_longer_than_max_is_refused():
    model = AttambaLM(small())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))


def _dependency(ssm: ChunkSSM, seq_idx: torch.Tensor, T: int, dim: int) -> torch.Tensor:
    u = torch.randn(1, T, dim, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: ssm(x, seq_idx), u)  # [1, T, dim, 1, T, dim]
    return jac[0, :, :, 0].abs().sum(dim=(1, 3)) > 1e-12  # [T_out, T_in]


@pytest.mark.parametrize("strategy, P, layer", [("uniform", 4, 0), ("cyclic", 5, 1), ("random", 3, 2), ("uniform", 1, 0)])
@pytest.mark.parametrize("blocked", [True, False])
def test_ssm_jacobian_chunk_segmentation(strategy, P, layer, blocked):
    """Output t depends on exactly the inputs of t's chunk up to t (the model's block layout and the plain scan)."""
    torch.manual_seed(0)
    T, dim = 29, 8
    cfg = SSMConfig(state_dim=4, inner_dim=8, heads=2, scan_chunk=8).resolved(dim)
    ssm = ChunkSSM(dim, cfg, chunk_size=P if blocked else None).double()
    ssm.reset_parameters(0.5)
    ends = bnd.chunk_ends(strategy, P, layer, 4, torch.arange(T), seed=7)
    seg = bnd.segment_ids(ends)
    dep = _dependency(ssm, seg, T, dim)
    t = torch.arange(T)
    expected = (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None])
    assert torch.equal(dep, expected)


def test_ssm_jacobian_offset_segmentation_reproduces_released_mixing():
    """seq_idx = offset in chunk (the released code). Inside one scan chunk, token t reads the content of
    earlier tokens at stride P; the decay between them runs over every token in between, whose input-
    dependent dt therefore reaches t too. So t depends on [first same-offset token, t] when P is smaller
    than the scan chunk, and on itself alone when P >= the scan chunk: no SSM mixing at all."""
    torch.manual_seed(0)
    T, dim = 16, 8
    cfg = SSMConfig(state_dim=4, inner_dim=8, heads=2, scan_chunk=16).resolved(dim)
    ssm = ChunkSSM(dim, cfg).double()
    ssm.reset_parameters(0.5)
    t = torch.arange(T)
    for P in (4, 16):
        offsets = bnd.chunk_offsets(bnd.chunk_ends("uniform", P, 0, 1, t))
        dep = _dependency(ssm, offsets, T, dim)
        first = t % P  # the first token with t's offset (one scan chunk covers the sequence)
        expected = (t[None, :] >= first[:, None]) & (t[None, :] <= t[:, None])
        assert torch.equal(dep, expected), P
    assert torch.equal(dep, torch.eye(T, dtype=torch.bool))  # P = 16 = scan chunk: no mixing at all
    # and the faithful segmentation of the same chunks confines t to its own chunk
    seg = bnd.segment_ids(bnd.chunk_ends("uniform", 4, 0, 1, t))
    assert torch.equal(_dependency(ssm, seg, T, dim), (seg[:, None] == seg[None, :]) & (t[None, :] <= t[:, None]))


def _irregular_seq_idx(batch: int, seq_len: int, longest: int, seed: int) -> torch.Tensor:
    """Monotone ids whose segments are 1..longest tokens, different in every row."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        lengths = torch.randint(1, longest + 1, (seq_len,), generator=gen)
        rows.append(torch.repeat_interleave(torch.arange(seq_len), lengths)[:seq_len])
    return torch.stack(rows).int()


@pytest.mark.parametrize("case", ["uniform", "cyclic", "irregular", "too_long"])
def test_ssm_block_path_matches_plain_path(case):
    """ChunkSSM on the block layout (shift or gather) against the plain masked path: outputs and every grad."""
    torch.manual_seed(0)
    T, dim, P, batch = 45, 8, 4, 2
    cfg = SSMConfig(state_dim=4, inner_dim=8, heads=2, scan_chunk=8).resolved(dim)
    ssm = ChunkSSM(dim, cfg, chunk_size=P).double()
    ssm.reset_parameters(0.5)
    if case in ("uniform", "cyclic"):
        seq_idx = bnd.segment_ids(bnd.chunk_ends(case, P, 1, 4, torch.arange(T), seed=0))
    else:
        seq_idx = _irregular_seq_idx(batch, T, P if case == "irregular" else P + 3, seed=5)
    blocks = ssm.blocks(seq_idx, batch)
    if case == "too_long":
        assert blocks is None  # the plain path runs: nothing to compare
        return
    assert (blocks.shift is not None) == (case != "irregular")
    u = torch.randn(batch, T, dim, dtype=torch.float64, requires_grad=True)
    leaves = [u, *ssm.parameters()]
    got = ssm(u, seq_idx, blocks=blocks)
    ref, _ = ssm(u, seq_idx, return_states=True)  # the plain path (decoding prefill)
    assert_close("y", ref, got, 1e-12)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=ref.dtype)
    names = ["du", *(f"d{n}" for n, _ in ssm.named_parameters())]
    for name, g, r in zip(names, torch.autograd.grad(got, leaves, cot), torch.autograd.grad(ref, leaves, cot)):
        assert_close(name, r, g, 1e-12)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_gated_rms_norm_matches_autograd_reference(dtype, tol):
    norm = GatedRMSNorm(24, eps=1e-5).to(dtype)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=gen, dtype=dtype))
    y, z = (torch.randn(3, 7, 24, generator=gen, dtype=dtype).requires_grad_() for _ in range(2))
    got, ref = norm(y, z), gated_rms_norm_reference(y, z, norm.weight, norm.eps)
    assert_close("out", ref, got, tol)
    cot = torch.randn(ref.shape, generator=gen, dtype=dtype)
    leaves = (y, z, norm.weight)
    for name, g, r in zip(("dy", "dz", "dweight"), torch.autograd.grad(got, leaves, cot),
                          torch.autograd.grad(ref, leaves, cot)):
        assert_close(name, r, g, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestFastKernelsOnCuda:
    """The whole model through the fast kernels (FlexAttention or causal SDPA, mamba-ssm's Triton SSD) against
    the references (dense mask, PyTorch SSD) on a CUDA GPU."""

    @staticmethod
    def logits_and_grads(model: AttambaLM, tokens: torch.Tensor):
        model.zero_grad(set_to_none=True)
        logits = model(tokens)
        gen = torch.Generator().manual_seed(3)
        (logits * torch.randn(logits.shape, generator=gen).cuda()).sum().backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach(), grads

    @pytest.mark.parametrize("kind", CUDA_KINDS)
    def test_model_fast_kernels_match_references_on_cuda(self, kind, monkeypatch, cuda_backends):
        """Logits and every parameter gradient: (flex or causal SDPA, Triton SSD) vs (dense mask, PyTorch SSD)."""
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
        cfg = model_config("micro", max_seq_len=256, **CUDA_KINDS[kind])
        model = AttambaLM(cfg).cuda().eval()  # eval: random boundaries drawn from the seed, identical in both runs
        tokens = torch.randint(0, cfg.vocab_size, (2, 200), generator=torch.Generator().manual_seed(1)).cuda()
        cuda_backends("naive", "chunked")
        ref_logits, ref_grads = self.logits_and_grads(model, tokens)
        fast_scan = "triton" if ssd.triton_available() else "chunked"
        cuda_backends("auto", fast_scan)
        logits, grads = self.logits_and_grads(model, tokens)
        worst = max(errors(ref_grads[n], grads[n])["norm"] for n in ref_grads)
        print(f"\n{kind} (scan {fast_scan}): logits rel err {errors(ref_logits, logits)['norm']:.2e}, "
              f"worst grad rel err {worst:.2e}")
        assert_close("logits", ref_logits, logits, 1e-5, measure="norm")
        for n in ref_grads:
            assert_close(f"grad {n}", ref_grads[n], grads[n], 1e-4, measure="norm")
