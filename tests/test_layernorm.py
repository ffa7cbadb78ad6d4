import math

import pytest
import torch

from gundam.kernels.layernorm import layer_norm, layer_norm_reference

from testutils import DTYPES, assert_close


def _inputs(T, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # A non-zero mean and a spread of scales, so centring and the variance both matter.
    x = (torch.randn(T, C, generator=g) * 3 + 1.5).to(dtype)
    r = (torch.randn(T, C, generator=g) * 2 - 0.5).to(dtype)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(dtype)
    b = torch.randn(C, generator=g).to(dtype)
    return x, r, w, b


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T, C, eps", [(7, 48, 1e-6), (5, 100, 1e-5), (3, 768, 1e-6), (2, 1024, 1e-5)])
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_matches_float64(dtype, atol, rtol, T, C, eps, residual):
    x, r, w, b = _inputs(T, C, dtype, seed=C + T + residual)
    if residual:
        y, h = layer_norm(x, w, b, eps, residual=r)
        # The residual stream is the dtype's own sum, bit for bit (what the torch path stores).
        assert torch.equal(h, x + r), f"h: max abs err {(h.double() - (x + r).double()).abs().max().item():.3e}"
        src = h
    else:
        y = layer_norm(x, w, b, eps)
        src = x
    assert y.dtype == dtype and y.shape == (T, C)
    want = layer_norm_reference(src.double(), w.double(), b.double(), eps)
    assert_close(y, want, atol, rtol, f"y {dtype} C={C} residual={residual}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm_strided_rows(dtype, atol, rtol):
    T, C, eps = 6, 40, 1e-6
    g = torch.Generator().manual_seed(1)
    big_x = torch.randn(T, C + 24, generator=g).to(dtype)
    big_r = torch.randn(T, 2 * C, generator=g).to(dtype)
    x, r = big_x[:, 8:8 + C], big_r[:, C:]   # row strides 64 and 80, not C
    w, b = torch.randn(C, generator=g).to(dtype), torch.randn(C, generator=g).to(dtype)
    y, h = layer_norm(x, w, b, eps, residual=r)
    assert torch.equal(h, x + r)
    assert_close(y, layer_norm_reference(h.double(), w.double(), b.double(), eps), atol, rtol, "strided y")
    assert_close(layer_norm(x, w, b, eps), layer_norm_reference(x.double(), w.double(), b.double(), eps),
                  atol, rtol, "strided y without residual")


def test_layer_norm_empty():
    x, r, w, b = _inputs(0, 48, torch.float32, seed=0)
    y, h = layer_norm(x, w, b, 1e-6, residual=r)
    assert y.shape == (0, 48) and h.shape == (0, 48)


def test_layer_norm_bad_inputs():
    x, r, w, b = _inputs(4, 48, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"layer_norm: x has shape \(48,\), expected 2 dims"):
        layer_norm(x[0], w, b, 1e-6)
    with pytest.raises(TypeError, match=r"layer_norm: x has dtype torch.int32, expected one of"):
        layer_norm(x.to(torch.int32), w, b, 1e-6)
    with pytest.raises(ValueError, match=r"weight has shape \(47,\), expected \(48\)"):
        layer_norm(x, w[:47], b, 1e-6)
    with pytest.raises(TypeError, match=r"bias has dtype torch.float16, expected torch.float32"):
        layer_norm(x, w, b.half(), 1e-6)
    with pytest.raises(ValueError, match=r"residual has shape \(3, 48\), expected \(4, 48\)"):
        layer_norm(x, w, b, 1e-6, residual=r[:3])
    with pytest.raises(ValueError, match=r"residual has shape \(4, 40\), expected \(4, 48\)"):
        layer_norm(x, w, b, 1e-6, residual=r[:, :40])
    with pytest.raises(TypeError, match=r"residual has dtype torch.float16"):
        layer_norm(x, w, b, 1e-6, residual=r.half())
    with pytest.raises(ValueError, match=r"x has strides \(1, 4\), expected a contiguous last dim"):
        layer_norm(torch.randn(48, 4).t(), w, b, 1e-6)
    for eps in (0, -1e-6, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"^layer_norm: eps={eps}, expected a positive finite float$"):
            layer_norm(x, w, b, eps)
    with pytest.raises(TypeError, match=r"^layer_norm: eps is a bool, expected a float$"):
        layer_norm(x, w, b, True)
    with pytest.raises(ValueError, match=r"config num_warps=3, expected a power of two"):
        layer_norm(x, w, b, 1e-6, config=dict(num_warps=3))


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("T, C", [(7, 48), (13, 100)])
def test_layer_norm_backward_float64(T, C, residual):
    # the kernels run in fp64 here: gradients equal autograd through the torch reference to ~1e-10, including
    # the gradient arriving on the residual stream h
    x, r, w, b = (t.double().requires_grad_() for t in _inputs(T, C, torch.float64, seed=T * C + residual))
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(T, C, generator=g, dtype=torch.float64), torch.randn(T, C, generator=g, dtype=torch.float64)
    grads = []
    for fn in (layer_norm, layer_norm_reference):
        if residual:
            y, h = fn(x, w, b, 1e-5, residual=r)
            loss = (y * dy).sum() + (h * dh).sum()
            grads.append(torch.autograd.grad(loss, (x, w, b, r)))
        else:
            loss = (fn(x, w, b, 1e-5) * dy).sum()
            grads.append(torch.autograd.grad(loss, (x, w, b)))
    for name, got, want in zip("xwbr", *grads):
        assert_close(got, want, 1e-10, 1e-10, f"d{name}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_layer_norm_backward_against_float64(dtype, atol, rtol):
    T, C = 37, 96
    x, r, w, b = _inputs(T, C, dtype, seed=5)
    dy = torch.randn(T, C, generator=torch.Generator().manual_seed(2)).to(dtype)
    xs = [t.clone().requires_grad_() for t in (x, w, b)]
    got = torch.autograd.grad((layer_norm(*xs, 1e-6) * dy).sum(), xs)
    xd = [t.double().requires_grad_() for t in (x, w, b)]
    want = torch.autograd.grad((layer_norm_reference(*xd, 1e-6) * dy.double()).sum(), xd)
    scale = max(1.0, C ** 0.5)          # dW and dB sum over T rows
    for name, g_, w_ in zip("xwb", got, want):
        assert g_.dtype == dtype
        assert_close(g_, w_, atol * scale, rtol, f"d{name} {dtype}")


def test_layer_norm_backward_many_rows_per_program():
    # T > 512 puts several rows in each backward program (their dW/dB partials accumulate in registers)
    x, r, w, b = (t.double().requires_grad_() for t in _inputs(1030, 16, torch.float64, seed=9))
    dy = torch.randn(1030, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = torch.autograd.grad((layer_norm(x, w, b, 1e-6, residual=r)[0] * dy).sum(), (x, w, b, r))
    want = torch.autograd.grad((layer_norm_reference(x, w, b, 1e-6, residual=r)[0] * dy).sum(), (x, w, b, r))
    for name, g_, w_ in zip("xwbr", got, want):
        assert_close(g_, w_, 1e-10, 1e-10, f"d{name}")
