"""The shared comparison: each measure bounds what it says, and bad tensors fail whatever the tolerance."""

import pytest
import torch

from tests.helpers import assert_close, errors


def test_each_measure_bounds_its_error():
    ref = torch.tensor([100.0, 1.0, 0.0], dtype=torch.float64)
    out = ref + torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    err = errors(ref, out)
    assert err["abs"] == 0.5 and err["rel"] == 0.005 and err["elem"] == 0.25
    assert err["norm"] == pytest.approx((0.5 / 10001) ** 0.5)
    for measure, value in err.items():
        assert_close("x", ref, out, value * 1.01, measure=measure)
        with pytest.raises(AssertionError, match=rf"x: max abs error 0.5, max rel error 0.005.*on the {measure} error"):
            assert_close("x", ref, out, value, measure=measure)


def test_zero_tolerance_is_bit_equality():
    ref = torch.linspace(0, 1, 7)
    assert_close("same", ref, ref.clone(), 0)
    with pytest.raises(AssertionError, match="same: max abs error"):
        assert_close("same", ref, torch.nextafter(ref, ref + 1), 0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_fail_in_either_tensor(bad):
    ref, out = torch.zeros(4), torch.zeros(4)
    out[2] = bad
    with pytest.raises(AssertionError, match="y: the result holds 1 NaN or inf"):
        assert_close("y", ref, out, float("inf"))
    with pytest.raises(AssertionError, match="y: the reference holds 1 NaN or inf"):
        assert_close("y", out, ref, float("inf"))


def test_shape_dtype_and_measure_are_checked():
    ref = torch.zeros(2, 3)
    for out in (torch.zeros(3, 2), torch.zeros(1, 2, 3), torch.zeros(2, 3, dtype=torch.float64)):
        with pytest.raises(AssertionError, match="z: result is"):
            assert_close("z", ref, out, 1.0)
    with pytest.raises(ValueError, match="measure must be one of"):
        assert_close("z", ref, ref, 1.0, measure="max")
    assert errors(torch.zeros(0), torch.zeros(0)) == dict(abs=0.0, rel=0.0, elem=0.0, norm=0.0)
