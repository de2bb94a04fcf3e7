"""Causal depthwise conv: fast vs naive (outputs and every gradient), seq_idx rule, initial state, step."""

import pytest
import torch

from attamba.ops.conv import causal_conv1d, causal_conv1d_fast, causal_conv1d_naive, conv_step
from attamba.ops.conv.block import block_causal_conv1d
from tests.helpers import assert_close


def make_inputs(bt, t, cc, w, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(bt, t, cc, generator=gen, dtype=torch.float64)
    weight = torch.randn(cc, w, generator=gen, dtype=torch.float64)
    bias = torch.randn(cc, generator=gen, dtype=torch.float64)
    h0 = torch.randn(bt, cc, w - 1, generator=gen, dtype=torch.float64)
    return x, weight, bias, h0


def seq_ids(kind, bt, t, seed):
    if kind is None:
        return None
    if kind == "offset":
        return (torch.arange(t) % 3).expand(bt, t)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.rand(bt, t, generator=gen) < 0.3
    starts[:, 0] = False
    return torch.cumsum(starts.long(), 1)


def run(fn, leaves, **kw):
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in leaves.items()}
    y, final = fn(**leaves, return_final_state=True, **kw)
    gen = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=gen, dtype=y.dtype)).sum()
    if final.numel():
        loss = loss + (final * torch.randn(final.shape, generator=gen, dtype=final.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return [y, final] + [g if g is not None else torch.zeros_like(v) for g, v in zip(grads, leaves.values())]


@pytest.mark.parametrize("t", [1, 5, 37])
@pytest.mark.parametrize("w", [1, 2, 4])
@pytest.mark.parametrize("ids", [None, "chunk", "offset"])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_state", [False, True])
def test_fast_matches_naive(t, w, ids, activation, with_state):
    x, weight, bias, h0 = make_inputs(2, t, 6, w, seed=t + w)
    leaves = dict(x=x, weight=weight, bias=bias)
    if with_state:
        leaves["initial_state"] = h0
    kw = dict(seq_idx=seq_ids(ids, 2, t, seed=t), activation=activation)
    names = ["y", "final state", *(f"d{k}" for k in leaves)]
    for name, got, ref in zip(names, run(causal_conv1d_fast, leaves, **kw), run(causal_conv1d_naive, leaves, **kw)):
        assert_close(name, ref, got, 1e-12)


def test_window_never_crosses_a_segment_start():
    x, weight, _, _ = make_inputs(1, 12, 1, 4)
    seq_idx = (torch.arange(12) // 5)[None]                                # segments [0,5), [5,10), [10,12)
    x = x.requires_grad_(True)
    y = causal_conv1d(x, weight, seq_idx=seq_idx)
    (grad,) = torch.autograd.grad(y[0, 6, 0], x)
    assert torch.equal(grad[0, :, 0] != 0, torch.isin(torch.arange(12), torch.tensor([5, 6])))
    # Without seq_idx the same output reads the full window of 4.
    (grad,) = torch.autograd.grad(causal_conv1d(x, weight)[0, 6, 0], x)
    assert torch.equal(grad[0, :, 0] != 0, torch.isin(torch.arange(12), torch.tensor([3, 4, 5, 6])))


def test_matches_torch_conv1d_without_seq_idx():
    x, weight, bias, _ = make_inputs(2, 20, 6, 4, seed=3)
    ref = torch.nn.functional.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=3, groups=6)[..., :20]
    assert_close("y", ref.transpose(1, 2), causal_conv1d(x, weight, bias), 1e-7)


def test_final_state_is_last_inputs_before_activation():
    x, weight, bias, h0 = make_inputs(2, 2, 6, 4, seed=4)
    _, final = causal_conv1d(x, weight, bias, initial_state=h0, activation="silu", return_final_state=True)
    assert_close("final state", torch.cat([h0[..., 2:], x.transpose(1, 2)], dim=-1), final, 1e-7)


@pytest.mark.parametrize("activation", [None, "silu"])
def test_step_chained_equals_parallel_with_resets(activation):
    t = 30
    x, weight, bias, h0 = make_inputs(2, t, 6, 4, seed=5)
    seq_idx = seq_ids("chunk", 2, t, seed=6)
    y_ref, final_ref = causal_conv1d(x, weight, bias, seq_idx=seq_idx, initial_state=h0, activation=activation,
                                     return_final_state=True)
    state, ys = h0.clone(), []
    for i in range(t):
        if i > 0:
            state = state * (seq_idx[:, i] == seq_idx[:, i - 1]).double()[:, None, None]
        y_t, state = conv_step(x[:, i], state, weight, bias, activation)
        ys.append(y_t)
    assert_close("y", y_ref, torch.stack(ys, 1), 1e-7)
    # The conv state carries raw inputs even across a reset; only the parallel op's masking differs.
    assert_close("final state", final_ref * (seq_idx[:, -3:] == seq_idx[:, -1:]).double()[:, None], state, 1e-7)


def test_validation_names_the_field():
    x, weight, bias, _ = make_inputs(1, 5, 6, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, weight, bias, activation="gelu")
    with pytest.raises(ValueError, match="initial_state"):
        causal_conv1d(x, weight, bias, initial_state=torch.zeros(1, 6, 4))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, weight[:3], bias)


@pytest.mark.parametrize("q", [1, 2, 3, 8])
@pytest.mark.parametrize("w", [1, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_block_conv_matches_naive_with_a_reset_per_block(q, w, activation, with_bias):
    """block_causal_conv1d = causal_conv1d with a new segment at every block start, outputs and grads."""
    nb = 5
    x, weight, bias, _ = make_inputs(2, nb * q, 6, w, seed=q + w)
    bias = bias if with_bias else None
    seq_idx = (torch.arange(nb * q) // q).expand(2, nb * q)
    leaves = [x.clone().requires_grad_(), weight.clone().requires_grad_()] + ([bias.clone().requires_grad_()] if with_bias else [])
    got = block_causal_conv1d(leaves[0].view(2, nb, q, 6), leaves[1], leaves[2] if with_bias else None,
                              activation=activation).reshape(2, nb * q, 6)
    ref = causal_conv1d_naive(leaves[0], leaves[1], leaves[2] if with_bias else None, seq_idx=seq_idx,
                              activation=activation)
    assert_close("y", ref, got, 1e-12)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=ref.dtype)
    for name, g, r in zip(("dx", "dweight", "dbias"), torch.autograd.grad(got, leaves, cot),
                          torch.autograd.grad(ref, leaves, cot)):
        assert_close(name, r, g, 1e-12)


def test_block_conv_reads_strided_views():
    """The SSM hands the conv a column slice of its projections: a non-contiguous view."""
    x, weight, bias, _ = make_inputs(1, 16, 10, 4, seed=9)
    wide = x.view(1, 4, 4, 10)
    got = block_causal_conv1d(wide[..., 2:8], weight[2:8], bias[2:8], activation="silu")
    ref = block_causal_conv1d(wide[..., 2:8].contiguous(), weight[2:8], bias[2:8], activation="silu")
    assert_close("y", ref, got, 0)
