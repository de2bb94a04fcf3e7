"""SSD scan: chunked vs references (outputs and every gradient), mamba-ssm seq_idx rules, step, dispatch."""

import pytest
import torch

from attamba.ops import ssd
from attamba.ops.ssd import (default_backend, resolve_backend, ssd_chunked, ssd_naive, ssd_naive_kernel_semantics,
                             ssd_scan, ssd_scan_aligned, ssd_step, triton_available)
from tests.helpers import assert_close, errors

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def make_inputs(bt, t, h, pd, g, n, dtype, seed=0, positive_bc=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bt, t, h, pd, generator=gen, dtype=dtype)
    dt = torch.rand(bt, t, h, generator=gen, dtype=dtype) * 0.5 + 0.05
    A = -(torch.rand(h, generator=gen, dtype=dtype) + 0.1)
    B = torch.randn(bt, t, g, n, generator=gen, dtype=dtype)
    C = torch.randn(bt, t, g, n, generator=gen, dtype=dtype)
    if positive_bc:
        B, C = B.abs() + 0.1, C.abs() + 0.1
    D = torch.randn(h, generator=gen, dtype=dtype)
    h0 = torch.randn(bt, h, pd, n, generator=gen, dtype=dtype)
    return x, dt, A, B, C, D, h0


def random_monotone_seq_idx(bt, t, seed, p_start=0.15):
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(bt, t, generator=gen) < p_start
    starts[:, 0] = False
    return torch.cumsum(starts.long(), dim=1)


def outputs_and_grads(fn, inputs, names, seed=1, **kw):
    """Runs fn, contracts y and final_state with fixed random cotangents, returns outputs + grads by name."""
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    y, final = fn(**leaves, return_final_state=True, **kw)
    gen = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=gen, dtype=y.dtype).to(y.device)
    gf = torch.randn(final.shape, generator=gen, dtype=final.dtype).to(final.device)
    loss = (y * gy).sum() + (final * gf).sum()
    grads = torch.autograd.grad(loss, [leaves[k] for k in names])
    return {"y": y, "final": final, **{f"d{k}": gr for k, gr in zip(names, grads)}}


def assert_all_close(got, ref, tol):
    for key in ref:
        assert_close(key, ref[key], got[key], tol, measure="rel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("t", [1, 63, 65, 130])
@pytest.mark.parametrize("g", [1, 2])
@pytest.mark.parametrize("extras", [False, True])
def test_chunked_matches_sequential_loop(dtype, t, g, extras):
    x, dt, A, B, C, D, h0 = make_inputs(2, t, 4, 3, g, 5, dtype, seed=t + 10 * g)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C)
    if extras:
        inputs.update(D=D, initial_state=h0)
    seq_idx = random_monotone_seq_idx(2, t, seed=t)
    names = list(inputs)
    ref = outputs_and_grads(ssd_naive, inputs, names, seq_idx=seq_idx)
    got = outputs_and_grads(ssd_chunked, inputs, names, seq_idx=seq_idx, scan_chunk=16)
    assert_all_close(got, ref, TOL[dtype])


def test_chunked_no_seq_idx_default_scan_chunk():
    x, dt, A, B, C, D, h0 = make_inputs(2, 150, 4, 3, 2, 5, torch.float64)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)
    ref = outputs_and_grads(ssd_naive, inputs, list(inputs))
    assert_all_close(outputs_and_grads(ssd_chunked, inputs, list(inputs)), ref, 1e-10)


@pytest.mark.parametrize("t", [63, 130])
def test_kernel_semantics_reference_equals_loop_on_monotone_ids(t):
    x, dt, A, B, C, D, h0 = make_inputs(2, t, 4, 3, 2, 5, torch.float64, seed=3)
    seq_idx = random_monotone_seq_idx(2, t, seed=4)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)
    ref = outputs_and_grads(ssd_naive, inputs, list(inputs), seq_idx=seq_idx)
    for q in (1, 16, 64):
        got = outputs_and_grads(ssd_naive_kernel_semantics, inputs, list(inputs), seq_idx=seq_idx, scan_chunk=q)
        assert_all_close(got, ref, 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("p", [2, 3, 8, 64, 100])
def test_offset_seq_idx_matches_kernel_rules(dtype, p):
    t = 150
    x, dt, A, B, C, D, h0 = make_inputs(2, t, 4, 3, 2, 5, dtype, seed=p)
    seq_idx = (torch.arange(t) % p).expand(2, t)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)
    for q in (16, 64):
        kw = dict(seq_idx=seq_idx, scan_chunk=q)
        ref = outputs_and_grads(ssd_naive_kernel_semantics, inputs, list(inputs), **kw)
        assert_all_close(outputs_and_grads(ssd_chunked, inputs, list(inputs), **kw), ref, TOL[dtype])


def dependency(p, q, t=256):
    """dep[t, s] = True iff x_s influences y_t, for seq_idx = position mod p and scan chunk q."""
    x, dt, A, B, C, _, _ = make_inputs(1, t, 1, 1, 1, 1, torch.float64, seed=5, positive_bc=True)
    basis = torch.eye(t, dtype=torch.float64)[:, :, None, None]          # batch row s holds x = e_s
    expand = lambda v: v.expand(t, *v.shape[1:])                          # noqa: E731
    seq_idx = (torch.arange(t) % p).expand(t, t)
    y = ssd_chunked(basis, expand(dt), A, expand(B), expand(C), seq_idx=seq_idx, scan_chunk=q)
    return (y[:, :, 0, 0].abs() > 1e-300).T                              # [t, s]


def test_offset_seq_idx_mixes_at_stride_p_within_scan_chunk():
    dep = dependency(p=8, q=64)
    s = torch.arange(256)
    # t = 100 (offset 4, scan chunk 1): exactly the tokens of chunk 1 with the same offset, up to t.
    assert torch.equal(dep[100], (s >= 64) & (s <= 100) & (s % 8 == 4))
    # t = 127 ends scan chunk 1 with offset 7 == offset of token 63: it also reads chunk 0's state.
    assert torch.equal(dep[127], (s <= 127) & (s % 8 == 7))


@pytest.mark.parametrize("p", [64, 100])
def test_offset_seq_idx_barely_mixes_when_p_at_least_scan_chunk(p):
    dep = dependency(p=p, q=64)
    off_diag = dep & ~torch.eye(256, dtype=torch.bool)
    if p == 100:
        assert not off_diag.any()
    else:
        # Only the last token of each scan chunk reads the previous chunk's last token (same offset 63).
        rows, cols = off_diag.nonzero(as_tuple=True)
        assert torch.equal(rows, torch.tensor([127, 191, 191, 255, 255, 255]))
        assert set(cols.tolist()) == {63, 127, 191}


def test_chunk_seq_idx_is_independent_of_scan_chunk():
    x, dt, A, B, C, D, h0 = make_inputs(2, 130, 4, 3, 1, 5, torch.float64, seed=7)
    seq_idx = (torch.arange(130) // 8).expand(2, 130)
    ref = ssd_naive(x, dt, A, B, C, D=D, seq_idx=seq_idx)
    for q in (1, 5, 8, 13, 64, 256):
        y = ssd_chunked(x, dt, A, B, C, D=D, seq_idx=seq_idx, scan_chunk=q)
        assert_close(f"y, scan chunk {q}", ref, y, 1e-10, measure="rel")


@pytest.mark.parametrize("block", [4, 8, 16])
@pytest.mark.parametrize("offset", [0, 3])
def test_aligned_scan_matches_loop(block, offset):
    t = 70
    x, dt, A, B, C, D, h0 = make_inputs(2, t, 4, 3, 2, 5, torch.float64, seed=block + offset)
    uniform = ((torch.arange(t) + (8 - offset) % 8) // 8).expand(1, t)
    uniform = uniform - uniform[:, :1]
    seq_idx = torch.cat([uniform, random_monotone_seq_idx(1, t, seed=block)], dim=0)
    inputs = dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0)
    ref = outputs_and_grads(ssd_naive, inputs, list(inputs), seq_idx=seq_idx)
    got = outputs_and_grads(ssd_scan_aligned, inputs, list(inputs), seq_idx=seq_idx, block=block)
    assert_all_close(got, ref, 1e-10)


def test_aligned_scan_rejects_non_monotone_ids():
    x, dt, A, B, C, _, _ = make_inputs(1, 10, 2, 2, 1, 2, torch.float32)
    with pytest.raises(ValueError, match="non-decreasing"):
        ssd_scan_aligned(x, dt, A, B, C, seq_idx=(torch.arange(10) % 3)[None], block=4)


def test_bf16_accumulates_in_float32():
    x, dt, A, B, C, D, _ = make_inputs(1, 100, 4, 8, 1, 16, torch.float64, seed=9)
    seq_idx = (torch.arange(100) // 8)[None]
    ref = ssd_naive(x, dt, A, B, C, D=D, seq_idx=seq_idx)
    bf = [v.to(torch.bfloat16) for v in (x, dt, B, C)]
    y = ssd_chunked(bf[0], bf[1], A, bf[2], bf[3], D=D, seq_idx=seq_idx)
    assert y.dtype == torch.bfloat16
    assert_close("y", ref, y.double(), 3e-2, measure="rel")


def test_step_chained_equals_parallel_scan_with_resets():
    t = 40
    x, dt, A, B, C, D, h0 = make_inputs(2, t, 4, 3, 2, 5, torch.float64, seed=11)
    seq_idx = random_monotone_seq_idx(2, t, seed=12, p_start=0.2)
    y_ref, final_ref = ssd_chunked(x, dt, A, B, C, D=D, seq_idx=seq_idx, initial_state=h0, scan_chunk=16,
                                   return_final_state=True)
    state, ys = h0.clone(), []
    for i in range(t):
        if i > 0:
            state = state * (seq_idx[:, i] == seq_idx[:, i - 1]).double()[:, None, None, None]
        y_t, state = ssd_step(x[:, i], dt[:, i], A, B[:, i], C[:, i], D, state)
        ys.append(y_t)
    assert_close("y", y_ref, torch.stack(ys, 1), 1e-12, measure="rel")
    assert_close("final state", final_ref, state, 1e-12, measure="rel")


def test_step_leading_dims_broadcast_parameters():
    """ssd_step on [2, Bt, ...] with per-slice A and D [2, 1, H] equals one call per slice."""
    gen = torch.Generator().manual_seed(13)
    h, pd, g, n = 4, 3, 2, 5
    x, B, C = (torch.randn(2, 3, *shape, generator=gen, dtype=torch.float64) for shape in ((h, pd), (g, n), (g, n)))
    dt = torch.rand(2, 3, h, generator=gen, dtype=torch.float64)
    A = -torch.rand(2, 1, h, generator=gen, dtype=torch.float64)
    D = torch.randn(2, 1, h, generator=gen, dtype=torch.float64)
    state = torch.randn(2, 3, h, pd, n, generator=gen, dtype=torch.float64)
    y, new_state = ssd_step(x, dt, A, B, C, D, state)
    for i in range(2):
        y_i, state_i = ssd_step(x[i], dt[i], A[i, 0], B[i], C[i], D[i, 0], state[i])
        assert_close(f"y[{i}]", y_i, y[i], 0)
        assert_close(f"state[{i}]", state_i, new_state[i], 0)
    with pytest.raises(ValueError, match="state must be"):
        ssd_step(x, dt, A, B, C, D, state[0])


def test_input_validation_names_the_field():
    x, dt, A, B, C, _, _ = make_inputs(1, 10, 4, 2, 1, 2, torch.float32)
    with pytest.raises(ValueError, match="scan_chunk"):
        ssd_scan(x, dt, A, B, C, scan_chunk=0)
    with pytest.raises(ValueError, match="groups G"):
        ssd_scan(x, dt, A, B[:, :, [0, 0, 0]], C[:, :, [0, 0, 0]])
    with pytest.raises(ValueError, match="seq_idx"):
        ssd_scan(x, dt, A, B, C, seq_idx=torch.full((1, 10), -1))


def test_backend_dispatch(monkeypatch):
    x, dt, A, B, C, D, _ = make_inputs(1, 20, 2, 2, 1, 3, torch.float64)
    seq_idx = (torch.arange(20) % 3)[None]
    try:
        monkeypatch.setenv(ssd.BACKEND_ENV, "naive")
        default_backend.cache_clear()
        assert resolve_backend() == "naive"
        assert resolve_backend("chunked") == "chunked"
        # "naive" on non-monotone ids is the kernel-rule reference, so it agrees with chunked.
        y_naive = ssd_scan(x, dt, A, B, C, D=D, seq_idx=seq_idx, scan_chunk=8)
        y_chunked = ssd_scan(x, dt, A, B, C, D=D, seq_idx=seq_idx, scan_chunk=8, backend="chunked")
        assert_close("chunked y", y_naive, y_chunked, 1e-10, measure="rel")
        monkeypatch.setenv(ssd.BACKEND_ENV, "fastest")
        default_backend.cache_clear()
        with pytest.raises(ValueError, match="ATTAMBA_SSD_BACKEND"):
            ssd_scan(x, dt, A, B, C)
    finally:
        monkeypatch.delenv(ssd.BACKEND_ENV)
        default_backend.cache_clear()
    assert resolve_backend() == "chunked"
    with pytest.raises(ValueError, match="backend must be one of"):
        ssd_scan(x, dt, A, B, C, backend="fastest")


def test_auto_and_the_naive_reference_resolve_to_their_kernels():
    assert resolve_backend("auto") == "chunked"
    assert resolve_backend("naive", monotone=True) == "naive"
    assert resolve_backend("naive", monotone=False) == "naive_kernel_semantics"
    assert resolve_backend("chunked", monotone=False) == "chunked"
    assert set(ssd.KERNELS) >= {resolve_backend(name, monotone) for name in ssd.BACKENDS if name != "triton"
                                for monotone in (True, False)}


@pytest.mark.skipif(torch.cuda.is_available() and triton_available(), reason="the Triton kernel is usable here")
def test_triton_request_without_it_is_a_clear_error():
    x, dt, A, B, C, _, _ = make_inputs(1, 20, 2, 2, 1, 3, torch.float32)
    with pytest.raises((RuntimeError, ValueError), match="triton"):
        ssd_scan(x, dt, A, B, C, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()), reason="needs CUDA and mamba_ssm")
class TestTritonOnCuda:
    @pytest.mark.parametrize("seq_kind,segment", [("chunk", 3), ("chunk", 8), ("chunk", 64), ("chunk", 100),
                                                  ("offset", 8), ("random", 0)])
    @pytest.mark.parametrize("t,g", [(300, 1), (1000, 2)])
    def test_triton_matches_chunked(self, seq_kind, segment, t, g, monkeypatch):
        """mamba-ssm's kernels (IEEE fp32 dots) against the PyTorch chunked SSD: outputs, final state, all grads."""
        monkeypatch.setenv("TRITON_F32_DEFAULT", "ieee")
        x, dt, A, B, C, D, h0 = make_inputs(2, t, 8, 32, g, 32, torch.float32, seed=13 + t + segment)
        if seq_kind == "chunk":
            ids = (torch.arange(t) // segment).expand(2, t)
        elif seq_kind == "offset":
            ids = (torch.arange(t) % segment).expand(2, t)
        else:
            ids = random_monotone_seq_idx(2, t, seed=t)
        inputs = {k: v.cuda() for k, v in dict(x=x, dt=dt, A=A, B=B, C=C, D=D, initial_state=h0).items()}
        kw = dict(seq_idx=ids.contiguous().cuda(), scan_chunk=64)
        ref = outputs_and_grads(ssd_chunked, inputs, list(inputs), **kw)
        got = outputs_and_grads(ssd.ssd_triton, inputs, list(inputs), **kw)
        print(f"\ntriton vs chunked ({seq_kind}, segment={segment}, T={t}, groups={g}): "
              + ", ".join(f"{k} {errors(ref[k], got[k])['rel']:.2e}" for k in ref))
        assert_all_close(got, ref, 1e-4)
