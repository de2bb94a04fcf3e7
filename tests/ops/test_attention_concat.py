"""The concatenated-keys formulation ([window keys ; gathered boundary keys] under one mask): its dense
SDPA reference against the naive mask (outputs and every gradient), the CUDA path's block tables against
that mask, and on a GPU the FlexAttention path against the reference."""

from __future__ import annotations

import itertools

import pytest
import torch

import attamba.ops.attention as attn
from attamba import boundaries as bnd
from attamba.ops.attention import concat_attention, naive_attention
from attamba.ops.attention import flex
from attamba.ops.attention.concat import concat_layout
from tests.helpers import assert_close, errors

N_LAYERS = 4
# (strategy, layer): every strategy, and layers whose offsets differ (cyclic at P=3: 0 and 2; at P=8: 0 and 6).
STRATEGY_LAYERS = (("none", 0), ("uniform", 0), ("cyclic", 0), ("cyclic", 3), ("cyclic_released", 3),
                   ("random", 0), ("random", 3))


def layer_boundaries(strategy: str, seq_len: int, chunk_size: int, layer: int, seed: int = 5):
    """Visible boundaries [T] of one layer as the model draws them, or None (the window-only baselines)."""
    if strategy == "none":
        return None
    pos = torch.arange(seq_len)
    ends = bnd.chunk_ends(strategy, chunk_size, layer, N_LAYERS, pos, seed)
    return bnd.visible_boundaries(ends, pos)


def qkv(seq_len: int, dtype=torch.float64, seed: int = 0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 2, seq_len, 8, generator=gen, dtype=dtype).to(device).requires_grad_() for _ in range(3)]


def outputs_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype).to(out.device)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


def assert_matches(fast, reference, tol, where):
    for name, a, b in zip(("out", "dq", "dk", "dv"), fast, reference):
        assert_close(f"{name} at {where}", b, a, tol, measure="elem")


def leading_values(seq_len):
    return (0, 1, 7, seq_len + 3)


@pytest.mark.parametrize("seq_len", (1, 63, 257))
@pytest.mark.parametrize("chunk_size", (1, 3, 8, 64))
def test_concat_reference_matches_naive_float64(seq_len, chunk_size):
    """Outputs and dq, dk, dv in float64, unpadded and padded as the CUDA path lays keys out."""
    for (strategy, layer), leading, pad in itertools.product(STRATEGY_LAYERS, leading_values(seq_len), (1, 16)):
        boundaries = layer_boundaries(strategy, seq_len, chunk_size, layer)
        q, k, v = qkv(seq_len, seed=chunk_size + layer)
        fast = outputs_and_grads(lambda *x: concat_attention(*x, boundaries, leading, pad=pad), q, k, v)
        ref = outputs_and_grads(lambda *x: naive_attention(*x, boundaries, leading), q, k, v)
        assert_matches(fast, ref, 1e-12, (strategy, layer, leading, pad))


def test_concat_backend_through_the_dispatcher_with_scale():
    boundaries = layer_boundaries("cyclic", 100, 8, 2)
    q, k, v = qkv(100)
    fast = outputs_and_grads(
        lambda *x: attn.attention(*x, boundaries=boundaries, leading_tokens=5, scale=0.3, backend="concat"), q, k, v
    )
    ref = outputs_and_grads(lambda *x: naive_attention(*x, boundaries, 5, scale=0.3), q, k, v)
    assert_matches(fast, ref, 1e-12, "dispatcher")


def test_layout_counts_each_visible_key_once():
    """The compressed part holds exactly the boundaries some query sees outside its window, and every row of
    the dense mask sees as many keys as visible_keys counts (no key in both parts)."""
    seq_len, leading = 257, 7
    boundaries = layer_boundaries("random", seq_len, 3, 1)
    layout = concat_layout(seq_len, boundaries, leading, torch.device("cpu"), pad=16)
    expected = torch.nonzero(boundaries[: seq_len - 1 - leading])[:, 0]
    assert torch.equal(layout.gather_index[: layout.num_compressed], expected)
    assert layout.window_len % 16 == 0 and layout.compressed_len % 16 == 0
    blocks = layout.compressed_len // 16
    assert blocks & (blocks - 1) == 0  # a power of two: few distinct lengths for a compiled kernel
    counts = layout.dense_mask()[:seq_len].sum(-1)
    assert torch.equal(counts, attn.visible_keys(seq_len, boundaries, leading))


def dense_block_grids(layout, block):
    dense = layout.dense_mask()
    rows, cols = dense.shape
    tiles = dense.view(rows // block, block, cols // block, block)
    return tiles.any(3).any(1), tiles.all(3).all(1)


@pytest.mark.parametrize("seq_len", (1, 63, 257, 700))
@pytest.mark.parametrize("chunk_size", (1, 3, 8, 64))
def test_block_grids_match_the_dense_mask(seq_len, chunk_size):
    """The CUDA path's block tables list exactly the blocks holding a visible pair, and as full exactly
    those where every pair is visible (window blocks become full once L spans them)."""
    block = 16
    for (strategy, layer), leading in itertools.product(STRATEGY_LAYERS, (*leading_values(seq_len), 40, None)):
        boundaries = layer_boundaries(strategy, seq_len, chunk_size, layer)
        layout = concat_layout(seq_len, boundaries, leading, torch.device("cpu"), pad=block)
        any_visible, full = flex.block_grids(layout, block)
        dense_any, dense_all = dense_block_grids(layout, block)
        where = (strategy, layer, leading)
        assert torch.equal(any_visible, dense_any), where
        assert torch.equal(full, dense_all), where


def test_block_work_follows_visible_keys():
    """At T=4096, P=8, L=32 the listed blocks add at most about three blocks per row to the visible pairs
    (a band of two window blocks where 33 keys are needed, a part-filled last compressed block): well
    below causal work. Smaller window blocks would cut this waste (measured on a GPU first)."""
    seq_len, leading = 4096, 32
    boundaries = layer_boundaries("cyclic", seq_len, 8, 1)
    layout = concat_layout(seq_len, boundaries, leading, torch.device("cpu"), pad=flex.BLOCK_SIZE)
    any_visible, _ = flex.block_grids(layout, flex.BLOCK_SIZE)
    work = int(any_visible.sum()) * flex.BLOCK_SIZE**2
    exact = int(attn.visible_keys(seq_len, boundaries, leading).sum())
    causal = seq_len * (seq_len + 1) // 2
    print(f"\nblock work / visible pairs {work / exact:.2f}, / causal pairs {work / causal:.3f}")
    assert work <= exact + seq_len * 3 * flex.BLOCK_SIZE
    assert work < 0.3 * causal


@pytest.mark.skipif(not flex.AVAILABLE, reason="torch without FlexAttention")
def test_block_mask_lists_the_grids():
    seq_len, leading = 1100, 300
    boundaries = layer_boundaries("random", seq_len, 2, 1)
    layout = concat_layout(seq_len, boundaries, leading, torch.device("cpu"), flex.BLOCK_SIZE)
    mask = flex.block_mask(layout)
    any_visible, full = flex.block_grids(layout, flex.BLOCK_SIZE)
    assert int(full.sum()) > 0 and int((any_visible & ~full).sum()) > 0
    assert torch.equal(mask.to_dense()[0, 0].bool(), any_visible)
    assert torch.equal(mask.full_kv_num_blocks[0, 0], full.sum(-1, dtype=torch.int32))
    assert mask.seq_lengths == (layout.window_len, layout.kv_len)


@pytest.mark.skipif(not flex.AVAILABLE, reason="torch without FlexAttention")
def test_block_mask_tables_in_the_compiled_kernel_on_cpu():
    """The compiled CPU FlexAttention kernel skips blocks as the CUDA one does (forward only on CPU): the
    BlockMask with its partial and full blocks gives the reference output. About 20 s of compiling."""
    seq_len, leading = 1100, 300
    boundaries = layer_boundaries("random", seq_len, 2, 1)
    q, k, v = (x.detach().float() for x in qkv(seq_len, seed=3))
    with torch.no_grad():
        out = flex.attend(q, k, v, boundaries, leading)
        ref = naive_attention(q, k, v, boundaries, leading)
    assert_close("flex forward on cpu", ref, out, 2e-6, measure="elem")


def test_random_boundaries_redrawn_fall_in_few_padded_lengths():
    """Redrawing random boundaries changes the layout, but its padded length (what a compiled kernel is
    specialised on) takes few values."""
    seq_len, lengths = 4096, set()
    for seed in range(20):
        boundaries = layer_boundaries("random", seq_len, 8, 0, seed=seed)
        lengths.add(concat_layout(seq_len, boundaries, 32, torch.device("cpu"), flex.BLOCK_SIZE).kv_len)
    assert len(lengths) <= 2, lengths


def test_flex_on_cpu_is_refused():
    q, k, v = qkv(16)
    if flex.AVAILABLE:
        with pytest.raises(ValueError, match="CUDA"):
            attn.attention(q, k, v, boundaries=layer_boundaries("uniform", 16, 4, 0), leading_tokens=2,
                           backend="flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
class TestFlexOnCuda:
    """FlexAttention over concatenated keys against the concatenated reference (and the naive mask)."""

    # Largest error relative to the tensor's largest entry. fp32: the bar of the earlier full-mask flex test
    # (1e-5); bf16: the kernel rounds probabilities and outputs to 8 mantissa bits (2^-8 = 4e-3 per rounding).
    TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

    @pytest.fixture(autouse=True)
    def _room_for_recompiles(self, monkeypatch):
        # Each (padded length, dtype) compiles a kernel; past the limit torch would run the unfused eager
        # version instead, and this test would no longer test the compiled kernel.
        name = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        monkeypatch.setattr(torch._dynamo.config, name, 64)

    def test_auto_picks_flex(self):
        assert attn.resolve_backend(None, torch.device("cuda"), full_causal=False) == "flex"

    @pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
    @pytest.mark.parametrize("seq_len", (1, 63, 257, 1000))
    def test_flex_matches_reference(self, seq_len, dtype):
        worst = 0.0
        for (strategy, layer), chunk_size, leading in itertools.product(
            STRATEGY_LAYERS, (1, 3, 8, 64), (*leading_values(seq_len), None)
        ):
            boundaries = layer_boundaries(strategy, seq_len, chunk_size, layer)
            boundaries = None if boundaries is None else boundaries.cuda()
            q, k, v = (x.detach().to("cuda", dtype).requires_grad_() for x in qkv(seq_len, seed=chunk_size))
            fast = outputs_and_grads(
                lambda *x: attn.attention(*x, boundaries=boundaries, leading_tokens=leading, backend="flex"), q, k, v
            )
            # The reference in fp32 from the same (rounded) inputs.
            q32, k32, v32 = (x.detach().float().requires_grad_() for x in (q, k, v))
            ref = outputs_and_grads(lambda *x: concat_attention(*x, boundaries, leading), q32, k32, v32)
            for name, a, b in zip(("out", "dq", "dk", "dv"), fast, ref):
                worst = max(worst, errors(b, a.float())["rel"])
                assert_close(f"{name} {strategy} layer {layer} P={chunk_size} L={leading}", b, a.float(),
                             self.TOLERANCE[dtype], measure="rel")
        print(f"\nflex vs concat reference, T={seq_len}, {dtype}: worst relative error {worst:.2e}")
