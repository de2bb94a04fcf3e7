"""ops.matvec (decoding's weight products) against F.linear: outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from attamba.ops.matvec import matvec, matvec_naive
from tests.helpers import assert_close


@pytest.mark.parametrize("shape", [(1, 64), (64,), (1, 1, 63)])
@pytest.mark.parametrize("out", [1, 5, 130])
def test_one_row_matches_linear_with_grads(shape, out):
    gen = torch.Generator().manual_seed(out)
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(out, shape[-1], generator=gen, dtype=torch.float64, requires_grad=True)
    y, y_ref = matvec(x, w), matvec_naive(x, w)
    assert y.shape == y_ref.shape == (*shape[:-1], out)
    assert_close("y", y_ref, y, 1e-12)
    g = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(y, (x, w), g)
    grads_ref = torch.autograd.grad(y_ref, (x, w), g)
    for name, a, b in zip(("dx", "dw"), grads, grads_ref):
        assert_close(name, b, a, 1e-12)


@torch.no_grad()
def test_one_row_without_grad_through_the_scratch_buffer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 512, generator=gen)
    w = torch.randn(600, 1024, generator=gen)[:, ::2]  # not contiguous
    assert_close("strided weight", F.linear(x, w), matvec(x, w), 1e-5, measure="elem")
    w = w.contiguous()
    y, plain = matvec(x, w), (x.unsqueeze(-2) * w).sum(-1)
    # the fast form ran, no silent fallback: its sums are the plain form's, bit for bit, and not the GEMM's
    assert torch.equal(y, plain) and not torch.equal(F.linear(x, w), plain)
    # the scratch is reused across shapes and dtypes without leaking one product into the next
    for out, n, dtype in ((3, 7, torch.float64), (700, 512, torch.float32), (2, 5, torch.float32)):
        a = torch.randn(n, generator=gen, dtype=dtype)
        b = torch.randn(out, n, generator=gen, dtype=dtype)
        assert_close(f"{out} x {n} {dtype}", F.linear(a, b), matvec(a, b), 1e-4)
        assert matvec(a, b).shape == (out,)


@torch.no_grad()
def test_weights_over_the_scratch_limit_are_linear(monkeypatch):
    from attamba.ops.matvec import fast

    monkeypatch.setattr(fast, "SCRATCH_LIMIT", 100)
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(1, 11, generator=gen), torch.randn(10, 11, generator=gen)
    assert torch.equal(matvec(x, w), F.linear(x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_more_rows_and_half_types_are_linear(dtype):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(40, 32, generator=gen).to(dtype)
    for x in (torch.randn(3, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)):
        x = x.to(dtype)
        assert torch.equal(matvec(x, w), F.linear(x, w))
    if dtype == torch.bfloat16:  # one row in a half type rounds each product: F.linear instead
        x = torch.randn(1, 32, generator=gen).to(dtype)
        assert torch.equal(matvec(x, w), F.linear(x, w))
