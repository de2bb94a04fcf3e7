"""Attamba attention: fast paths against the dense-mask reference, outputs and every gradient."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import attamba.ops.attention as attn
from attamba.ops.attention import attention, attention_mask, blocked_attention, einsum_attention, naive_attention
from attamba.ops.attention import visible_keys
from attamba.ops.attention.blocked import BACKWARD_WINDOW_BLOCK, make_plan
from tests.helpers import assert_close, errors


def make_boundaries(strategy: str, seq_len: int, chunk_size: int, seed: int = 0) -> torch.Tensor | None:
    """Visible boundary flags [T] with the sink at 0, or None for the window-only baselines."""
    if strategy == "none":
        return None
    pos = torch.arange(seq_len)
    if strategy == "uniform":
        flags = pos % chunk_size == chunk_size - 1
    elif strategy == "cyclic":
        offset = chunk_size // 2
        flags = (pos - offset) % chunk_size == chunk_size - 1
    elif strategy == "random":
        gen = torch.Generator().manual_seed(seed + seq_len * 131 + chunk_size)
        flags = torch.rand(seq_len, generator=gen) < 1.0 / chunk_size
    else:
        raise ValueError(f"strategy must be uniform, cyclic, random or none, got {strategy!r}")
    flags[0] = True
    return flags


def brute_force_mask(seq_len: int, boundaries, leading_tokens) -> torch.Tensor:
    mask = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    for t in range(seq_len):
        for k in range(t + 1):
            in_window = leading_tokens is None or t - k <= leading_tokens
            compressed = boundaries is not None and k < t and bool(boundaries[k])
            mask[t, k] = in_window or compressed
    return mask


def qkv(seq_len: int, dtype=torch.float32, seed: int = 0, batch: int = 2, heads: int = 2, dim: int = 16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, seq_len, dim, generator=gen, dtype=dtype).requires_grad_() for _ in range(3)]


def outputs_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype).to(out.device)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_matches(fast, reference, tol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, reference):
        assert_close(name, b, a, tol, measure="elem")


SEQ_LENS = (1, 63, 64, 257)
CHUNKS = (1, 3, 8, 64)
STRATEGIES = ("uniform", "cyclic", "random")


def leading_values(seq_len):
    return (0, 1, 7, seq_len + 3)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize("seq_len", SEQ_LENS)
def test_blocked_matches_naive_float32(seq_len, chunk_size, strategy):
    boundaries = make_boundaries(strategy, seq_len, chunk_size)
    for leading in leading_values(seq_len):
        q, k, v = qkv(seq_len, seed=leading)
        fast = outputs_and_grads(lambda *x: blocked_attention(*x, boundaries, leading), q, k, v)
        ref = outputs_and_grads(lambda *x: naive_attention(*x, boundaries, leading), q, k, v)
        assert_matches(fast, ref, 1e-5)


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("leading", (None, 0, 1, 7, 300))
def test_window_only_baselines_match_naive(seq_len, leading):
    """boundaries=None: sliding window of leading+1 keys, or full causal; blocked and auto both."""
    q, k, v = qkv(seq_len, seed=3)
    ref = outputs_and_grads(lambda *x: naive_attention(*x, None, leading), q, k, v)
    for backend in ("blocked", "auto"):
        fast = outputs_and_grads(
            lambda *x: attention(*x, boundaries=None, leading_tokens=leading, backend=backend), q, k, v
        )
        assert_matches(fast, ref, 1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("chunk_size,leading", [(3, 7), (8, 1), (1, 0), (64, 7)])
def test_blocked_matches_einsum_float64(chunk_size, leading, strategy):
    seq_len = 257
    boundaries = make_boundaries(strategy, seq_len, chunk_size)
    q, k, v = qkv(seq_len, dtype=torch.float64, seed=11)
    fast = outputs_and_grads(lambda *x: attention(*x, boundaries=boundaries, leading_tokens=leading), q, k, v)
    ref = outputs_and_grads(lambda *x: einsum_attention(*x, boundaries, leading), q, k, v)
    assert_matches(fast, ref, 1e-10)
    naive = outputs_and_grads(lambda *x: naive_attention(*x, boundaries, leading), q, k, v)
    assert_matches(naive, ref, 1e-10)


def test_blocked_forced_block_sizes_and_scale():
    """Every block size and a custom scale give the same exact result (padding and superblock edges).

    Blocks under BACKWARD_WINDOW_BLOCK also check the backward's window part on its larger blocks: rows of
    one backward block then split their keys between window and boundary part at different places.
    """
    seq_len, boundaries = 100, make_boundaries("random", 100, 3)
    q, k, v = qkv(seq_len, dtype=torch.float64, seed=5)
    ref = outputs_and_grads(lambda *x: einsum_attention(*x, boundaries, 5, scale=0.3), q, k, v)
    for block in (1, 4, 8, 64, 128):
        plan = make_plan(seq_len, boundaries, 5, torch.float64, torch.device("cpu"), block)
        assert plan.backward_window.block_size == max(block, BACKWARD_WINDOW_BLOCK)
        fast = outputs_and_grads(lambda *x: blocked_attention(*x, boundaries, 5, scale=0.3, block_size=block), q, k, v)
        assert_matches(fast, ref, 1e-10)


@pytest.mark.parametrize("seq_len", (1, 5, 20))
@pytest.mark.parametrize("strategy", ("uniform", "random", "none"))
@pytest.mark.parametrize("leading", (None, 0, 2, 30))
def test_mask_against_brute_force(seq_len, strategy, leading):
    boundaries = make_boundaries(strategy, seq_len, 3, seed=1)
    mask = attention_mask(seq_len, boundaries, leading, device="cpu")
    assert torch.equal(mask, brute_force_mask(seq_len, boundaries, leading))
    assert not torch.triu(mask, diagonal=1).any()  # causal
    assert mask.diagonal().all()  # every query sees itself, so no softmax row is empty
    assert torch.equal(visible_keys(seq_len, boundaries, leading), mask.sum(dim=1))


def test_visible_keys_counts_on_larger_sequences():
    for strategy, chunk_size, leading in itertools.product(STRATEGIES, (1, 8, 64), (0, 32, 5000)):
        boundaries = make_boundaries(strategy, 1000, chunk_size)
        mask = attention_mask(1000, boundaries, leading)
        assert torch.equal(visible_keys(1000, boundaries, leading), mask.sum(dim=1))


def counted_forward_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_counter_sees_the_fast_path_work():
    seq_len, chunk_size, leading, batch, heads, dim = 4096, 8, 32, 1, 2, 16
    boundaries = make_boundaries("uniform", seq_len, chunk_size)
    q, k, v = (x.detach() for x in qkv(seq_len, batch=batch, heads=heads, dim=dim))
    analytic = 4 * dim * heads * batch * int(visible_keys(seq_len, boundaries, leading).sum())
    fast = counted_forward_flops(lambda: attention(q, k, v, boundaries=boundaries, leading_tokens=leading))
    assert abs(fast - analytic) <= 0.10 * analytic, (fast, analytic)
    naive = counted_forward_flops(
        lambda: attention(q, k, v, boundaries=boundaries, leading_tokens=leading, backend="naive")
    )
    assert naive == 4 * dim * heads * batch * seq_len * seq_len


def test_flop_counter_causal_counts_visible_keys_and_backward():
    seq_len = 256
    q, k, v = qkv(seq_len, batch=1, heads=2, dim=16)
    forward = counted_forward_flops(lambda: attention(q, k, v))
    assert forward == 4 * 16 * 2 * seq_len * (seq_len + 1) // 2
    out = blocked_attention(q, k, v, make_boundaries("uniform", seq_len, 8), 7)
    with FlopCounterMode(display=False) as counter:
        out.sum().backward()
    assert counter.get_total_flops() > 0


def test_blocked_work_close_to_exact_for_realistic_sizes():
    for seq_len, chunk_size, leading in [(4096, 4, 8), (4096, 8, 32), (8192, 8, 32), (8192, 16, 128)]:
        boundaries = make_boundaries("uniform", seq_len, chunk_size)
        plan = make_plan(seq_len, boundaries, leading, torch.float32, torch.device("cpu"))
        assert plan.exact == int(visible_keys(seq_len, boundaries, leading).sum())
        assert plan.work <= 1.10 * plan.exact, (seq_len, chunk_size, leading, plan.work / plan.exact)


def test_auto_dispatch():
    cpu = torch.device("cpu")
    assert attn.resolve_backend(None, cpu, full_causal=True) == "causal"
    assert attn.resolve_backend(None, cpu, full_causal=False) == "blocked"
    assert attn.resolve_backend("naive", cpu, full_causal=True) == "naive"
    if attn._flex.AVAILABLE:
        assert attn.resolve_backend(None, torch.device("cuda"), full_causal=False) == "flex"


def test_unknown_backend_and_flex_on_cpu_are_refused():
    q, k, v = qkv(16)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention(q, k, v, backend="fast")
    if attn._flex.AVAILABLE:
        with pytest.raises(ValueError, match="CUDA"):
            attention(q, k, v, boundaries=make_boundaries("uniform", 16, 4), leading_tokens=2, backend="flex")


def test_environment_override_is_read_at_import(monkeypatch):
    try:
        monkeypatch.setenv(attn.ENV_VAR, "naive")
        module = importlib.reload(attn)
        assert module.resolve_backend(None, torch.device("cpu"), full_causal=False) == "naive"
        monkeypatch.setenv(attn.ENV_VAR, "quick")
        with pytest.raises(ValueError, match=attn.ENV_VAR):
            importlib.reload(attn)
    finally:
        monkeypatch.delenv(attn.ENV_VAR, raising=False)
        importlib.reload(attn)


def test_invalid_arguments_name_the_field():
    q, k, v = qkv(10)
    with pytest.raises(ValueError, match="leading_tokens must be >= 0"):
        attention(q, k, v, leading_tokens=-1)
    with pytest.raises(ValueError, match="dtype torch.bool"):
        attention(q, k, v, boundaries=torch.ones(10), leading_tokens=2)
    with pytest.raises(ValueError, match=r"shape \[T\] = \[10\]"):
        attention(q, k, v, boundaries=torch.ones(9, dtype=torch.bool), leading_tokens=2)
    with pytest.raises(ValueError, match="share the shape"):
        attention(q, k[:, :1], v)


def test_plan_cache_keys_on_the_boundary_pattern():
    from attamba.ops.attention.blocked import cached_plan

    cpu = torch.device("cpu")
    flags = make_boundaries("uniform", 200, 8)
    first = cached_plan(200, flags, 16, torch.float32, cpu)
    assert cached_plan(200, flags.clone(), 16, torch.float32, cpu) is first
    flags[100] = not bool(flags[100])  # the same tensor, changed in place: a new pattern, a new plan
    second = cached_plan(200, flags, 16, torch.float32, cpu)
    assert second is not first and second.exact != first.exact
    assert cached_plan(200, flags, 15, torch.float32, cpu) is not second


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestFlexOnCuda:
    @pytest.mark.parametrize("strategy", (*STRATEGIES, "none"))
    @pytest.mark.parametrize("seq_len", SEQ_LENS)
    def test_flex_matches_naive_on_cuda(self, seq_len, strategy):
        """FlexAttention (compiled, fp32) against the dense-mask reference on the CPU grid's P, L and T."""
        worst = 0.0
        for chunk_size, leading in itertools.product(CHUNKS, (*leading_values(seq_len), None)):
            if strategy == "none" and chunk_size > 1:
                continue  # no boundaries: the chunk size plays no part
            boundaries = make_boundaries(strategy, seq_len, chunk_size)
            boundaries = None if boundaries is None else boundaries.cuda()
            q, k, v = (x.detach().cuda().requires_grad_() for x in qkv(seq_len, seed=chunk_size, dim=16))
            fast = outputs_and_grads(
                lambda *x: attention(*x, boundaries=boundaries, leading_tokens=leading, backend="flex"), q, k, v
            )
            ref = outputs_and_grads(lambda *x: naive_attention(*x, boundaries, leading), q, k, v)
            assert_matches(fast, ref, 1e-5)
            worst = max(worst, *(errors(b, a)["abs"] for a, b in zip(fast, ref)))
        print(f"\nflex vs naive, T={seq_len}, {strategy}: max abs error {worst:.2e}")
