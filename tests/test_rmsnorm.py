"""The RMSNorm kernel (Triton's interpreter on CPU) against its torch reference in float64, and its backward."""
import pytest
import torch

from gundam.kernels.rmsnorm import rms_norm, rms_norm_reference

from testutils import DTYPES, assert_close


def _inputs(T, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean and a spread of scales, so the mean square is not the variance
    x = (torch.randn(T, C, generator=g) * 3 + 1.5).to(dtype)
    r = (torch.randn(T, C, generator=g) * 2 - 0.5).to(dtype)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(dtype)
    return x, r, w


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T, C, eps", [(7, 40, 1e-6), (5, 100, 1e-5), (3, 896, 1e-6)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_float64(dtype, atol, rtol, T, C, eps, residual):
    x, r, w = _inputs(T, C, dtype, seed=C + T + residual)
    if residual:
        y, h = rms_norm(x, w, eps, residual=r)
        # the residual stream is the dtype's own sum, bit for bit (what the torch path stores)
        assert torch.equal(h, x + r), f"h: max abs err {(h.double() - (x + r).double()).abs().max().item():.3e}"
        src = h
    else:
        y = rms_norm(x, w, eps)
        src = x
    assert y.dtype == dtype and y.shape == (T, C)
    assert_close(y, rms_norm_reference(src.double(), w.double(), eps), atol, rtol, f"y {dtype} C={C}")


def test_rms_norm_equals_the_torch_path_in_fp32():
    # the same rounding order as gundam.model.RMSNorm: fp32 statistics, the cast, then the weight
    from gundam.model import RMSNorm
    x, r, w = _inputs(6, 896, torch.float32, seed=3)
    norm = RMSNorm(896, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(x + r)
    y, _ = rms_norm(x, w, 1e-6, residual=r)
    assert_close(y, want, 2e-6 * want.abs().max().item(), 0, "y vs RMSNorm")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rms_norm_strided_rows(dtype, atol, rtol):
    T, C, eps = 6, 40, 1e-6
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, C + 24, generator=g).to(dtype)[:, 8:8 + C]    # row stride 64, not C
    r = torch.randn(T, 2 * C, generator=g).to(dtype)[:, C:]          # row stride 80
    w = torch.randn(C, generator=g).to(dtype)
    y, h = rms_norm(x, w, eps, residual=r)
    assert torch.equal(h, x + r)
    assert_close(y, rms_norm_reference(h.double(), w.double(), eps), atol, rtol, "strided y")


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("T, C", [(5, 48), (9, 100)])
def test_rms_norm_backward_float64(residual, T, C):
    # dx, dw (and the residual's gradient), with a gradient arriving on h too, against autograd through the
    # reference; 9 rows over 9 programs and 5 over 5 (per-program partials summed in torch)
    x, r, w = (t.double().requires_grad_() for t in _inputs(T, C, torch.float32, seed=T))
    g = torch.Generator().manual_seed(2)
    dy, dh = torch.randn(T, C, generator=g, dtype=torch.float64), torch.randn(T, C, generator=g, dtype=torch.float64)

    def grads(fn):
        out = fn(x, w, 1e-6, residual=r) if residual else fn(x, w, 1e-6)
        loss = (out[0] * dy).sum() + (out[1] * dh).sum() if residual else (out * dy).sum()
        inputs = (x, w, r) if residual else (x, w)
        return torch.autograd.grad(loss, inputs)

    for got, want, name in zip(grads(rms_norm), grads(rms_norm_reference), ("dx", "dw", "dresidual")):
        assert_close(got, want, 1e-12 * want.abs().max().item(), 0, name)


def test_rms_norm_gradcheck():
    x, r, w = (t.double().requires_grad_() for t in _inputs(3, 20, torch.float32, seed=5))
    assert torch.autograd.gradcheck(lambda x, w, r: rms_norm(x, w, 1e-5, residual=r), (x, w, r))


def test_rms_norm_empty():
    x, r, w = _inputs(0, 48, torch.float32, seed=0)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    assert y.shape == (0, 48) and h.shape == (0, 48)


def test_rms_norm_bad_inputs():
    x, r, w = _inputs(4, 48, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"rms_norm: x has shape \(48,\), expected 2 dims"):
        rms_norm(x[0], w, 1e-6)
    with pytest.raises(TypeError, match=r"rms_norm: x has dtype torch.int32, expected one of"):
        rms_norm(x.to(torch.int32), w, 1e-6)
    with pytest.raises(ValueError, match=r"weight has shape \(47,\), expected \(48\)"):
        rms_norm(x, w[:47], 1e-6)
    with pytest.raises(TypeError, match=r"weight has dtype torch.float16, expected torch.float32"):
        rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 48\), expected \(4, 48\)"):
        rms_norm(x, w, 1e-6, residual=r[:3])
    with pytest.raises(ValueError, match=r"x has strides \(1, 4\), expected a contiguous last dim"):
        rms_norm(torch.randn(48, 4).t(), w, 1e-6)
    for eps in (0, -1e-6, float("inf"), float("nan"), "1e-6", True):
        with pytest.raises(ValueError, match=r"rms_norm: eps=.*, expected a positive finite float"):
            rms_norm(x, w, eps)
    with pytest.raises(ValueError, match=r"config num_warps=3, expected a power of two"):
        rms_norm(x, w, 1e-6, config=dict(num_warps=3))
