"""The SiLU-and-multiply kernels (Triton's interpreter) against the torch path, F.silu(gate) * up: forward, both
gradients, inputs that are column slices of wider buffers, and the launcher's checks."""
import pytest
import torch

from gundam.kernels.swiglu import silu_mul, silu_mul_reference
from gundam.kernels.tiling import silu_mul_config
from testutils import DTYPES, assert_close, log_launches


def _inputs(T, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(T, I, generator=g) * 4).to(dtype)      # both tails of the sigmoid
    up = (torch.randn(T, I, generator=g) * 2 + 0.3).to(dtype)
    return gate, up


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("T, I, config", [(7, 40, None), (5, 100, None), (3, 4864, None), (4, 1, None),
                                          (0, 16, None), (3, 40, dict(BLOCK=16, num_warps=1))])
def test_silu_mul_matches_float64(dtype, atol, rtol, T, I, config):
    gate, up = _inputs(T, I, dtype, seed=T + I)
    y = silu_mul(gate, up, config=config)
    assert y.dtype == dtype and y.shape == (T, I) and y.is_contiguous()
    assert_close(y, silu_mul_reference(gate.double(), up.double()), atol, rtol, f"y {dtype} {T}x{I} {config}")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_silu_mul_column_slices(dtype, atol, rtol):
    # the two halves of one [T, 2I] GEMM output (row stride 2I), and slices of two unrelated buffers
    T, I = 5, 100
    g = torch.Generator().manual_seed(2)
    both = (torch.randn(T, 2 * I, generator=g) * 3).to(dtype)
    gate, up = both[:, :I], both[:, I:]
    y = silu_mul(gate, up)
    assert y.is_contiguous()
    assert_close(y, silu_mul_reference(gate.double(), up.double()), atol, rtol, "halves of one buffer")
    gate = (torch.randn(T, I + 12, generator=g) * 3).to(dtype)[:, 12:]
    up = torch.randn(T, I + 36, generator=g).to(dtype)[:, 4:4 + I]
    assert_close(silu_mul(gate, up), silu_mul_reference(gate.double(), up.double()), atol, rtol, "two slices")


def test_silu_mul_config():
    # rows x column blocks; Qwen2's I = 4864 is 5 blocks of 1024 per row
    assert silu_mul_config(4864) == dict(BLOCK=1024, num_warps=4)
    assert silu_mul_config(100) == dict(BLOCK=128, num_warps=1)


def test_silu_mul_launch_grid(monkeypatch):
    from gundam.kernels import swiglu
    log = []
    log_launches(monkeypatch, log, [swiglu])
    gate, up = _inputs(3, 40, torch.float32, seed=0)
    silu_mul(gate, up, config=dict(BLOCK=16))
    assert log == [("_silu_mul_kernel", (3, 3))]


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")   # numpy's, in the interpreter
def test_silu_mul_extreme_gates():
    # |gate| up to 1e4: exp(-g) overflows to inf on one side; values and gradients stay finite and exact
    gate = torch.tensor([[-1e4, -200.0, -88.0, -30.0, 0.0, 30.0, 88.0, 200.0, 1e4]], dtype=torch.float64)
    up = torch.linspace(-2, 2, gate.shape[1], dtype=torch.float64)[None]
    for dtype in (torch.float32, torch.float64):
        g_, u_ = gate.to(dtype).requires_grad_(), up.to(dtype).requires_grad_()
        y = silu_mul(g_, u_)
        dg, du = torch.autograd.grad(y.sum(), (g_, u_))
        gr, ur = gate.clone().requires_grad_(), up.clone().requires_grad_()
        want = silu_mul_reference(gr, ur)
        dgr, dur = torch.autograd.grad(want.sum(), (gr, ur))
        for name, got, ref in (("y", y, want), ("dgate", dg, dgr), ("dup", du, dur)):
            assert torch.isfinite(got).all(), f"{name} {dtype}: {got}"
            assert_close(got, ref, 1e-6, 1e-6, f"{name} {dtype}")


def _grads(fn, gate, up, dy):
    return torch.autograd.grad((fn(gate, up) * dy).sum(), (gate, up))


@pytest.mark.parametrize("T, I", [(7, 40), (5, 100), (2, 4864)])
def test_silu_mul_backward_float64(T, I):
    # the kernels run in fp64 here: both gradients equal autograd through the torch reference to ~1e-10
    gate, up = (t.requires_grad_() for t in _inputs(T, I, torch.float64, seed=T * I))
    dy = torch.randn(T, I, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got, want = _grads(silu_mul, gate, up, dy), _grads(silu_mul_reference, gate, up, dy)
    for name, g_, w_ in zip(["dgate", "dup"], got, want):
        assert g_.is_contiguous()
        assert_close(g_, w_, 1e-10, 1e-10, name)


def test_silu_mul_backward_halves_and_strided_dy():
    # gate and up as halves of one buffer: their gradients land in the two halves of its gradient; dy arriving
    # transposed (strides (1, T)) is made contiguous first
    T, I = 6, 40
    g = torch.Generator().manual_seed(3)
    both = (torch.randn(T, 2 * I, generator=g, dtype=torch.float64) * 3).requires_grad_()
    dyt = torch.randn(I, T, generator=g, dtype=torch.float64)
    grads = [torch.autograd.grad((fn(both[:, :I], both[:, I:]).t() * dyt).sum(), both)[0]
             for fn in (silu_mul, silu_mul_reference)]
    assert_close(grads[0], grads[1], 1e-10, 1e-10, "d[gate | up]")


def test_silu_mul_backward_of_a_sum():
    # y.sum() sends dy as a broadcast of one value (strides (0, 0)), which the backward makes contiguous
    gate, up = (t.requires_grad_() for t in _inputs(5, 40, torch.float64, seed=8))
    got = torch.autograd.grad(silu_mul(gate, up).sum(), (gate, up))
    want = torch.autograd.grad(silu_mul_reference(gate, up).sum(), (gate, up))
    for name, g_, w_ in zip(["dgate", "dup"], got, want):
        assert_close(g_, w_, 1e-10, 1e-10, name)


def test_silu_mul_gradcheck():
    gate, up = (t.requires_grad_() for t in _inputs(3, 5, torch.float64, seed=4))
    assert torch.autograd.gradcheck(silu_mul, (gate, up))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_silu_mul_backward_against_float64(dtype, atol, rtol):
    T, I = 9, 100
    gate, up = _inputs(T, I, dtype, seed=5)
    dy = torch.randn(T, I, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = _grads(silu_mul, gate.clone().requires_grad_(), up.clone().requires_grad_(), dy)
    want = _grads(silu_mul_reference, gate.double().requires_grad_(), up.double().requires_grad_(), dy.double())
    for name, g_, w_ in zip(["dgate", "dup"], got, want):
        assert g_.dtype == dtype
        assert_close(g_, w_, atol, rtol, f"{name} {dtype}")


def test_silu_mul_bad_inputs():
    gate, up = _inputs(4, 40, torch.float32, seed=0)
    with pytest.raises(TypeError, match=r"^silu_mul: gate is a list, expected a torch.Tensor$"):
        silu_mul(gate.tolist(), up)
    with pytest.raises(TypeError, match=r"^silu_mul: up is a NoneType, expected a torch.Tensor$"):
        silu_mul(gate, None)
    with pytest.raises(ValueError, match=r"^silu_mul: gate has shape \(40,\), expected 2 dims$"):
        silu_mul(gate[0], up[0])
    with pytest.raises(TypeError, match=r"^silu_mul: gate has dtype torch.int64, expected one of"):
        silu_mul(gate.long(), up.long())
    with pytest.raises(ValueError, match=r"^silu_mul: up has shape \(4, 39\), expected \(4, 40\)$"):
        silu_mul(gate, up[:, :39])
    with pytest.raises(ValueError, match=r"^silu_mul: up has shape \(3, 40\), expected \(4, 40\)$"):
        silu_mul(gate, up[:3])
    with pytest.raises(TypeError, match=r"^silu_mul: up has dtype torch.float16, expected torch.float32$"):
        silu_mul(gate, up.half())
    with pytest.raises(ValueError, match=r"^silu_mul: up is on meta, expected cpu$"):
        silu_mul(gate, up.to("meta"))
    with pytest.raises(ValueError, match=r"^silu_mul: gate has strides \(1, 4\), expected a contiguous last dim$"):
        silu_mul(torch.randn(40, 4).t(), up)
    with pytest.raises(ValueError, match=r"^silu_mul: up has strides \(1, 4\), expected a contiguous last dim$"):
        silu_mul(gate, torch.randn(40, 4).t())
    with pytest.raises(ValueError, match=r"^silu_mul: config BLOCK=100, expected a power of two"):
        silu_mul(gate, up, config=dict(BLOCK=100))
    with pytest.raises(ValueError, match=r"^silu_mul: config keys \['BLOCK_N'\] unknown"):
        silu_mul(gate, up, config=dict(BLOCK_N=64))
    wide = torch.empty(1, 16 * 65536)
    with pytest.raises(ValueError, match=r"^silu_mul: gate has I=1048576 columns, expected at most 65535 blocks of "
                                         r"BLOCK=16$"):
        silu_mul(wide, wide, config=dict(BLOCK=16))
