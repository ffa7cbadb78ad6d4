"""Qwen2's SwiGLU activation, silu(gate) * up, in one pass over two [T, I] buffers, and its backward.

Eager torch runs it as two kernels (SiLU, then the multiply), writing and reading the [T, I] SiLU output in
between; this reads gate and up once and writes the product once (fp32 math, fp64 for fp64 inputs, one rounding
at the store). gate and up are two GEMM outputs: the host model's gate_proj and up_proj are two parameters, and
one GEMM of x against their concatenation would need a copy of both [I, C] weights per call (or a cached copy:
twice the MLP's weight memory, and no longer the host's parameters). Since either input may be a column slice
of a wider buffer (row strides free), the two halves of such a GEMM's output work as well.

Backward (`SiluMulFunction`): one pass writes both gradients, dgate = dy up s (1 + g (1 - s)) with s =
sigmoid(g), and dup = dy g s; gate and up are saved, not the product.
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, check_tensor, resolve_config, tl_acc_dtype
from gundam.kernels.tiling import silu_mul_config


@triton.jit
def _silu_mul_kernel(
    g_ptr,              # [T, I] gate (rows may be strided)
    u_ptr,              # [T, I] up (rows may be strided)
    y_ptr,              # [T, I] out, contiguous: silu(gate) * up
    I,                  # columns
    stride_gm, stride_um,       # row strides of gate and up
    BLOCK: tl.constexpr,        # columns per program
    ACC: tl.constexpr,          # math dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    # grid (rows, column blocks): a row's columns are contiguous in all three buffers, whatever the row strides
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(g_ptr + row * stride_gm + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + row * stride_um + offs, mask=mask, other=0.0).to(ACC)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * I + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    dy_ptr,             # [T, I] gradient of the product (rows may be strided)
    g_ptr, u_ptr,       # [T, I] the forward's inputs (rows may be strided)
    dg_ptr, du_ptr,     # [T, I] out, contiguous: gradients of gate and up
    I,
    stride_dym, stride_gm, stride_um,   # row strides of dy, gate, up
    BLOCK: tl.constexpr,
    ACC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    dy = tl.load(dy_ptr + row * stride_dym + offs, mask=mask, other=0.0).to(ACC)
    g = tl.load(g_ptr + row * stride_gm + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + row * stride_um + offs, mask=mask, other=0.0).to(ACC)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + row * I + offs, (dy * u * s * (1 + g * (1 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * I + offs, (dy * g * s).to(du_ptr.dtype.element_ty), mask=mask)


def _check(fn, gate, up):
    check_tensor(fn, "gate", gate, ndim=2, dtypes=GRAD_DTYPES, unit_stride=True)
    check_tensor(fn, "up", up, shape=tuple(gate.shape), dtype=gate.dtype, device=gate.device, unit_stride=True)


def _grid(T, I, cfg):
    return (T, triton.cdiv(I, cfg["BLOCK"]))


def _forward(gate, up, cfg):
    T, I = gate.shape
    y = torch.empty(T, I, dtype=gate.dtype, device=gate.device)
    if T and I:
        _silu_mul_kernel[_grid(T, I, cfg)](
            g_ptr=gate, u_ptr=up, y_ptr=y, I=I, stride_gm=gate.stride(0), stride_um=up.stride(0),
            BLOCK=cfg["BLOCK"], ACC=tl_acc_dtype(gate.dtype), num_warps=cfg["num_warps"])
    return y


def _backward(dy, gate, up, cfg):
    T, I = gate.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dg = torch.empty(T, I, dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    if T and I:
        _silu_mul_bwd_kernel[_grid(T, I, cfg)](
            dy_ptr=dy, g_ptr=gate, u_ptr=up, dg_ptr=dg, du_ptr=du, I=I,
            stride_dym=dy.stride(0), stride_gm=gate.stride(0), stride_um=up.stride(0),
            BLOCK=cfg["BLOCK"], ACC=tl_acc_dtype(gate.dtype), num_warps=cfg["num_warps"])
    return dg, du


class SiluMulFunction(torch.autograd.Function):
    """silu_mul with a backward: saves gate and up."""

    @staticmethod
    def forward(ctx, gate, up, cfg):
        ctx.save_for_backward(gate, up)
        ctx.cfg = cfg
        return _forward(gate, up, cfg)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        dg, du = _backward(dy, gate, up, ctx.cfg)
        return dg, du, None


def silu_mul(gate, up, *, config=None):
    """silu(gate) * up for gate, up [T, I] (rows may be strided, columns contiguous; one dtype and device):
    a new contiguous [T, I] in their dtype. Differentiable in both when autograd records.
    config: overrides of tiling.silu_mul_config (BLOCK, num_warps)."""
    fn = "silu_mul"
    _check(fn, gate, up)
    cfg = resolve_config(fn, silu_mul_config(gate.shape[1]), config, pow2=("BLOCK", "num_warps"))
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMulFunction.apply(gate, up, cfg)
    return _forward(gate, up, cfg)


def silu_mul_reference(gate, up):
    """The torch path (gundam.model.Qwen2MLP): F.silu(gate) * up."""
    return torch.nn.functional.silu(gate) * up
