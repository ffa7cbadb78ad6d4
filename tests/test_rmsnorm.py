"""The RMSNorm kernels (Triton's interpreter) against the torch path: forward with and without the fused residual,
the backward (dx, dW, the residual's gradient, the gradient arriving on h), and the launcher's checks."""
import math

import pytest
import torch

from gundam.kernels.rmsnorm import rms_norm, rms_norm_reference
from gundam.model import RMSNorm
from testutils import DTYPES, assert_close


def _inputs(T, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    # a non-zero mean and a spread of row scales: the mean square is not the variance, and rows differ
    x = ((torch.randn(T, C, generator=g) + 0.7) * torch.rand(T, 1, generator=g).mul(4).add(0.1)).to(dtype)
    r = (torch.randn(T, C, generator=g) * 2 - 0.5).to(dtype)
    w = (torch.randn(C, generator=g) * 0.5 + 1).to(dtype)
    return x, r, w


def _fp64(*ts):
    return [t.double() for t in ts]


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T, C, eps", [(7, 40, 1e-6), (5, 100, 1e-5), (3, 896, 1e-6), (2, 1024, 1e-6)])
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_matches_float64(dtype, atol, rtol, T, C, eps, residual):
    x, r, w = _inputs(T, C, dtype, seed=C + T + residual)
    if residual:
        y, h = rms_norm(x, w, eps, residual=r)
        # the residual stream is the dtype's own sum, bit for bit (what the torch path stores)
        assert h.dtype == dtype and torch.equal(h, x + r), \
            f"h: max abs err {(h.double() - (x + r).double()).abs().max().item():.3e}"
        src = h
    else:
        y = rms_norm(x, w, eps)
        src = x
    assert y.dtype == dtype and y.shape == (T, C) and y.is_contiguous()
    assert_close(y, rms_norm_reference(*_fp64(src, w), eps), atol, rtol, f"y {dtype} C={C} residual={residual}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_rounds_as_the_torch_path(dtype):
    # the normalised row is rounded to the dtype before the weight multiply (transformers' Qwen2RMSNorm): in fp16
    # nearly every element equals the torch path's bit for bit (only the fp32 sum's order differs), which one
    # rounding of w * n would not give (it differs in about a quarter of them); rms_norm_reference is
    # gundam.model.RMSNorm
    T, C, eps = 9, 896, 1e-6
    x, r, w = _inputs(T, C, dtype, seed=3)
    norm = RMSNorm(C, eps).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        want = norm(x)
    assert torch.equal(rms_norm_reference(x, w, eps), want)
    got = rms_norm(x, w, eps)
    assert_close(got, want, 1e-6, 2 ** -9 if dtype == torch.float16 else 1e-6, f"y {dtype} vs the torch path")
    if dtype == torch.float16:      # in fp32 the sum's order moves most values by an ulp
        same = (got == want).double().mean().item()
        assert same > 0.99, f"{dtype}: {same:.4f} of the elements equal the torch path's"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rms_norm_strided_rows(dtype, atol, rtol):
    T, C, eps = 6, 40, 1e-6
    g = torch.Generator().manual_seed(1)
    big_x = torch.randn(T, C + 24, generator=g).to(dtype)
    big_r = torch.randn(T, 2 * C, generator=g).to(dtype)
    x, r = big_x[:, 8:8 + C], big_r[:, C:]   # row strides 64 and 80, not C
    w = torch.randn(C, generator=g).to(dtype)
    y, h = rms_norm(x, w, eps, residual=r)
    assert torch.equal(h, x + r) and h.is_contiguous()
    assert_close(y, rms_norm_reference(*_fp64(h, w), eps), atol, rtol, "strided y")
    assert_close(rms_norm(x, w, eps), rms_norm_reference(*_fp64(x, w), eps), atol, rtol, "strided y, no residual")
    # a strided weight is taken as well (copied once)
    w2 = torch.randn(C, 2, generator=g).to(dtype)[:, 1]
    assert_close(rms_norm(x, w2, eps), rms_norm_reference(*_fp64(x, w2), eps), atol, rtol, "strided weight")


def test_rms_norm_empty_and_no_grad():
    x, r, w = _inputs(0, 40, torch.float32, seed=0)
    y, h = rms_norm(x, w, 1e-6, residual=r)
    assert y.shape == (0, 40) and h.shape == (0, 40)
    # without autograd recording, plain tensors come back (no graph)
    x, r, w = _inputs(3, 40, torch.float32, seed=0)
    w.requires_grad_()
    with torch.no_grad():
        y = rms_norm(x, w, 1e-6)
    assert y.grad_fn is None and not y.requires_grad
    assert rms_norm(x, w, 1e-6).grad_fn is not None


def test_rms_norm_bad_inputs():
    x, r, w = _inputs(4, 40, torch.float32, seed=0)
    with pytest.raises(TypeError, match=r"^rms_norm: x is a list, expected a torch.Tensor$"):
        rms_norm(x.tolist(), w, 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: x has shape \(40,\), expected 2 dims$"):
        rms_norm(x[0], w, 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: x has shape \(4, 0\), expected C >= 1 channels$"):
        rms_norm(x[:, :0], w[:0], 1e-6)
    with pytest.raises(TypeError, match=r"^rms_norm: x has dtype torch.int32, expected one of"):
        rms_norm(x.to(torch.int32), w, 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: weight has shape \(39,\), expected \(40\)$"):
        rms_norm(x, w[:39], 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: weight has shape \(1, 40\), expected \(40\)$"):
        rms_norm(x, w[None], 1e-6)
    with pytest.raises(TypeError, match=r"^rms_norm: weight has dtype torch.float16, expected torch.float32$"):
        rms_norm(x, w.half(), 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: weight is on meta, expected cpu$"):
        rms_norm(x, w.to("meta"), 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: residual has shape \(3, 40\), expected \(4, 40\)$"):
        rms_norm(x, w, 1e-6, residual=r[:3])
    with pytest.raises(ValueError, match=r"^rms_norm: residual has shape \(4, 32\), expected \(4, 40\)$"):
        rms_norm(x, w, 1e-6, residual=r[:, :32])
    with pytest.raises(TypeError, match=r"^rms_norm: residual has dtype torch.float16, expected torch.float32$"):
        rms_norm(x, w, 1e-6, residual=r.half())
    with pytest.raises(ValueError, match=r"^rms_norm: residual is on meta, expected cpu$"):
        rms_norm(x, w, 1e-6, residual=r.to("meta"))
    with pytest.raises(ValueError, match=r"^rms_norm: x has strides \(1, 4\), expected a contiguous last dim$"):
        rms_norm(torch.randn(40, 4).t(), w, 1e-6)
    with pytest.raises(ValueError, match=r"^rms_norm: residual has strides \(1, 4\), expected a contiguous last"):
        rms_norm(x, w, 1e-6, residual=torch.randn(40, 4).t())
    for eps in (0, -1e-6, math.inf, math.nan):
        with pytest.raises(ValueError, match=rf"^rms_norm: eps={eps}, expected a positive finite float$"):
            rms_norm(x, w, eps)
    with pytest.raises(TypeError, match=r"^rms_norm: eps is a str, expected a float$"):
        rms_norm(x, w, "1e-6")
    with pytest.raises(TypeError, match=r"^rms_norm: eps is a Tensor, expected a float$"):
        rms_norm(x, w, torch.tensor(1e-6))
    with pytest.raises(TypeError, match=r"^rms_norm: eps is a bool, expected a float$"):
        rms_norm(x, w, True)
    with pytest.raises(ValueError, match=r"^rms_norm: config num_warps=3, expected a power of two"):
        rms_norm(x, w, 1e-6, config=dict(num_warps=3))
    with pytest.raises(ValueError, match=r"^rms_norm: config keys \['BLOCK'\] unknown"):
        rms_norm(x, w, 1e-6, config=dict(BLOCK=256))


def _grads(fn, x, w, r, eps, dy, dh, use_y=True):
    """Gradients of sum(y * dy) (+ sum(h * dh) with a residual and dh) in (x, w[, r])."""
    if r is None:
        return torch.autograd.grad((fn(x, w, eps) * dy).sum(), (x, w))
    y, h = fn(x, w, eps, residual=r)
    loss = (y * dy).sum() if use_y else 0
    if dh is not None:
        loss = loss + (h * dh).sum()
    return torch.autograd.grad(loss, (x, w, r), allow_unused=True)


# "h": the gradient arriving on h goes through the kernel (HAS_DH); "zeros": h is unused, autograd passes zeros
@pytest.mark.parametrize("residual", ["none", "h", "zeros"])
@pytest.mark.parametrize("T, C", [(7, 40), (13, 100), (3, 896)])
def test_rms_norm_backward_float64(T, C, residual):
    # the kernels run in fp64 here: gradients equal autograd through the torch reference to ~1e-10
    x, r, w = (t.requires_grad_() for t in _inputs(T, C, torch.float64, seed=T * C))
    r = None if residual == "none" else r
    g = torch.Generator().manual_seed(1)
    dy, dh = torch.randn(T, C, generator=g, dtype=torch.float64), torch.randn(T, C, generator=g, dtype=torch.float64)
    dh = dh if residual == "h" else None
    got = _grads(rms_norm, x, w, r, 1e-5, dy, dh)
    want = _grads(rms_norm_reference, x, w, r, 1e-5, dy, dh)
    for name, g_, w_ in zip(["dx", "dw", "dresidual"], got, want):
        assert_close(g_, w_, 1e-10, 1e-10, f"{name} residual={residual}")
    if r is not None:
        assert torch.equal(got[0], got[2])       # h = x + r: both get the total gradient on h


def test_rms_norm_backward_only_h_used():
    # only h reaches the loss: dy arrives as zeros, dx = dresidual = dh, dW = 0
    x, r, w = (t.requires_grad_() for t in _inputs(5, 40, torch.float64, seed=2))
    dh = torch.randn(5, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    dx, dw, dr = _grads(rms_norm, x, w, r, 1e-6, None, dh, use_y=False)
    assert torch.equal(dx, dh) and torch.equal(dr, dh) and torch.equal(dw, torch.zeros_like(w))


def test_rms_norm_backward_of_a_sum():
    # y.sum() sends dy as a broadcast of one value (strides (0, 0)), which the backward makes contiguous
    x, r, w = (t.requires_grad_() for t in _inputs(5, 40, torch.float64, seed=8))
    got = torch.autograd.grad(rms_norm(x, w, 1e-6, residual=r)[0].sum(), (x, w, r))
    want = torch.autograd.grad(rms_norm_reference(x, w, 1e-6, residual=r)[0].sum(), (x, w, r))
    for name, g_, w_ in zip(["dx", "dw", "dresidual"], got, want):
        assert_close(g_, w_, 1e-10, 1e-10, name)


def test_rms_norm_gradcheck():
    x, r, w = (t.requires_grad_() for t in _inputs(3, 5, torch.float64, seed=6))
    assert torch.autograd.gradcheck(lambda x, w, r: rms_norm(x, w, 1e-5, residual=r), (x, w, r))
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_backward_against_float64(dtype, atol, rtol, residual):
    T, C = 37, 100
    x, r, w = _inputs(T, C, dtype, seed=5)
    g = torch.Generator().manual_seed(2)
    dy, dh = torch.randn(T, C, generator=g).to(dtype), torch.randn(T, C, generator=g).to(dtype)
    dh = dh if residual else None
    rs = r.clone().requires_grad_() if residual else None
    got = _grads(rms_norm, x.clone().requires_grad_(), w.clone().requires_grad_(), rs, 1e-6, dy, dh)
    rd = r.double().requires_grad_() if residual else None
    want = _grads(rms_norm_reference, x.double().requires_grad_(), w.double().requires_grad_(), rd, 1e-6,
                  dy.double(), None if dh is None else dh.double())
    scale = max(1.0, T ** 0.5)          # dW sums over T rows
    for name, g_, w_ in zip(["dx", "dw", "dresidual"], got, want):
        assert g_.dtype == dtype
        assert_close(g_, w_, atol * (scale if name == "dw" else 1), rtol, f"{name} {dtype} residual={residual}")


def test_rms_norm_backward_many_rows_per_program():
    # T > 512 puts several rows in each backward program (their dW partials accumulate in registers)
    x, r, w = (t.requires_grad_() for t in _inputs(1030, 16, torch.float64, seed=9))
    dy = torch.randn(1030, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = _grads(rms_norm, x, w, r, 1e-6, dy, None)
    want = _grads(rms_norm_reference, x, w, r, 1e-6, dy, None)
    for name, g_, w_ in zip(["dx", "dw", "dresidual"], got, want):
        assert_close(g_, w_, 1e-10, 1e-10, name)
