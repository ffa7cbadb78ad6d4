"""The quick_gelu kernel (Triton's interpreter) against the torch path's quick_gelu."""
import pytest
import torch

from gundam.kernels.activation import quick_gelu_
from gundam.model import quick_gelu
from testutils import DTYPES, assert_close


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("shape", [(7, 96), (3, 4096 + 5), (0, 16)])
def test_quick_gelu_matches_float64(dtype, atol, rtol, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)    # both tails of the sigmoid
    want = quick_gelu(x.double())
    got = quick_gelu_(x.clone())
    assert got.dtype == dtype and got.shape == x.shape
    assert_close(got, want, atol, rtol, f"quick_gelu {dtype} {shape}")


def test_quick_gelu_in_place_and_bad_inputs():
    x = torch.randn(5, 33)
    assert quick_gelu_(x) is x
    with pytest.raises(TypeError, match=r"quick_gelu_: x has dtype torch.int64, expected one of"):
        quick_gelu_(torch.ones(3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x has strides \(1, 3\), expected a contiguous tensor"):
        quick_gelu_(torch.randn(4, 3).t())
    with pytest.raises(ValueError, match="config BLOCK=100, expected a power of two"):
        quick_gelu_(x, config=dict(BLOCK=100))
