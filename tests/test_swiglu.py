"""The SiLU-and-multiply kernel (Triton's interpreter on CPU) against its torch reference in float64, and its
backward."""
import pytest
import torch

from gundam.kernels.swiglu import silu_mul, silu_mul_reference

from testutils import DTYPES, assert_close


def _inputs(T, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, I, generator=g) * 3).to(dtype), torch.randn(T, I, generator=g).to(dtype)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T, I", [(7, 40), (5, 100), (3, 2100)])   # 2100: three column blocks, the last partial
def test_silu_mul_matches_float64(dtype, atol, rtol, T, I):
    gate, up = _inputs(T, I, dtype, seed=T + I)
    y = silu_mul(gate, up)
    assert y.dtype == dtype and y.shape == (T, I) and y.is_contiguous()
    assert_close(y, silu_mul_reference(gate.double(), up.double()), atol, rtol, f"y {dtype} I={I}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_silu_mul_halves_of_one_buffer(dtype, atol, rtol):
    # gate and up as the two column halves of one [T, 2I] GEMM output: row stride 2I
    both = torch.randn(6, 2 * 72, generator=torch.Generator().manual_seed(1)).to(dtype)
    gate, up = both[:, :72], both[:, 72:]
    assert_close(silu_mul(gate, up), silu_mul_reference(gate.double(), up.double()), atol, rtol, "halves")


@pytest.mark.parametrize("T, I", [(5, 48), (4, 1100)])
def test_silu_mul_backward_float64(T, I):
    gate, up = (t.double().requires_grad_() for t in _inputs(T, I, torch.float32, seed=I))
    dy = torch.randn(T, I, generator=torch.Generator().manual_seed(3), dtype=torch.float64)[:, :]
    got = torch.autograd.grad((silu_mul(gate, up) * dy).sum(), (gate, up))
    want = torch.autograd.grad((silu_mul_reference(gate, up) * dy).sum(), (gate, up))
    for a, b, name in zip(got, want, ("dgate", "dup")):
        assert_close(a, b, 1e-13 * b.abs().max().item(), 0, name)


def test_silu_mul_gradcheck_strided():
    both = torch.randn(3, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(4)).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: silu_mul(t[:, :20], t[:, 20:]), (both,))


def test_silu_mul_empty():
    gate, up = _inputs(0, 48, torch.float32, seed=0)
    assert silu_mul(gate, up).shape == (0, 48)


def test_silu_mul_bad_inputs():
    gate, up = _inputs(4, 48, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"silu_mul: gate has shape \(48,\), expected 2 dims"):
        silu_mul(gate[0], up[0])
    with pytest.raises(TypeError, match=r"silu_mul: gate has dtype torch.int64, expected one of"):
        silu_mul(gate.long(), up)
    with pytest.raises(ValueError, match=r"silu_mul: up has shape \(4, 47\), expected \(4, 48\)"):
        silu_mul(gate, up[:, :47])
    with pytest.raises(TypeError, match=r"silu_mul: up has dtype torch.float16, expected torch.float32"):
        silu_mul(gate, up.half())
    with pytest.raises(ValueError, match=r"silu_mul: up has strides \(1, 4\), expected a contiguous last dim"):
        silu_mul(gate, torch.randn(48, 4).t())
    with pytest.raises(ValueError, match=r"config BLOCK=100, expected a power of two"):
        silu_mul(gate, up, config=dict(BLOCK=100))
