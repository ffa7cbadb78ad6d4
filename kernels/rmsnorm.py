"""RMSNorm (Qwen2's) over the last dim of a token-major [T, C] buffer, with an optional fused residual add, and
its backward: the normalisation of DeepSeek-OCR 2's Qwen2 encoder layers.

Rounding order is transformers' Qwen2RMSNorm (gundam.model.RMSNorm): statistics in fp32 (fp64 for fp64 inputs,
so gradients can be checked to ~1e-10 in the interpreter), the normalised row cast to the input dtype, then
multiplied by the weight, the product rounded to the input dtype:
    y = round(w * round(h * rsqrt(mean(h^2) + eps))).
With `residual` the kernel reads x and the residual, writes the residual stream h = x + residual (rounded to
the dtype: bit-equal to torch's add) and y = RMSNorm(h) in one pass, as `layernorm.layer_norm` does for the
pre-LN blocks.

Backward (`RMSNormFunction`), the LayerNorm kernel's design: one pass over the rows recomputes rstd from h
(nothing but h and the weight is saved), writes dx = rstd * (w dy - n * mean(w dy n)) with n = h * rstd, plus
the gradient arriving on h (dx is also the residual's gradient), and accumulates dW = sum over rows of
dy * round(n) per program; the per-program partials [programs, C] are reduced in torch (deterministic, no
atomics). The rounding of n is a straight-through step for dx, as autograd treats the reference's cast.
"""

import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, acc_dtype, check_eps, check_tensor, resolve_config, tl_acc_dtype
from gundam.kernels.layernorm import _residual_row
from gundam.kernels.tiling import rms_norm_config


@triton.jit
def _rms_norm_kernel(
    x_ptr,          # [T, C] input (rows may be strided)
    r_ptr,          # [T, C] residual (HAS_RESIDUAL; rows may be strided)
    w_ptr,          # [C] weight, contiguous
    y_ptr,          # [T, C] out: round(w * round(h * rstd))
    h_ptr,          # [T, C] out: h = x + r (HAS_RESIDUAL)
    C,              # channels
    eps,
    stride_xm, stride_rm, stride_ym, stride_hm,     # row strides of x, r, y, h
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,      # power of two >= C: a whole row per program
    ACC: tl.constexpr,          # statistics dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    # One program per row, as LayerNorm's: thousands of rows fill the GPU and a row (C = 896) sits in
    # registers, so x and r are read once and y and h written once.
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    x = _residual_row(x_ptr, r_ptr, h_ptr, row, offs_n, mask_n, stride_xm, stride_rm, stride_hm, HAS_RESIDUAL, ACC)
    # masked lanes are 0: they add nothing to the sum of squares
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    n = (x * rstd).to(y_ptr.dtype.element_ty)             # the reference's cast before the weight multiply
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    y = n.to(ACC) * w
    tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,             # [T, C] gradient of y (rows may be strided)
    dh_ptr,             # [T, C] gradient arriving on the residual stream h (HAS_DH; rows may be strided)
    h_ptr,              # [T, C] what was normalised (h, or x without residual)
    w_ptr,              # [C] weight, contiguous
    dx_ptr,             # [T, C] out, contiguous: gradient of x (= of the residual)
    dw_ptr,             # [programs, C] out, ACC dtype: this program's partial sum of dW
    T, C,               # rows, channels
    eps,
    rows_per_program,   # consecutive rows of each program
    stride_dym, stride_dhm, stride_hm, stride_dxm,  # row strides of dy, dh, h, dx
    HAS_DH: tl.constexpr,
    BLOCK_N: tl.constexpr,      # power of two >= C: a whole row per step
    ACC: tl.constexpr,          # statistics and partials dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    pid = tl.program_id(0)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    dw = tl.zeros([BLOCK_N], dtype=ACC)
    row0 = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row0 + i
        if row < T:
            row64 = row.to(tl.int64)
            h = tl.load(h_ptr + row64 * stride_hm + offs_n, mask=mask_n, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + row64 * stride_dym + offs_n, mask=mask_n, other=0.0).to(ACC)
            rstd = tl.rsqrt(tl.sum(h * h, axis=0) / C + eps)
            n = h * rstd
            wdy = w * dy                                   # gradient of n (masked lanes 0)
            dx = (wdy - n * (tl.sum(wdy * n, axis=0) / C)) * rstd
            if HAS_DH:
                dx += tl.load(dh_ptr + row64 * stride_dhm + offs_n, mask=mask_n, other=0.0).to(ACC)
            tl.store(dx_ptr + row64 * stride_dxm + offs_n, dx.to(dx_ptr.dtype.element_ty), mask=mask_n)
            # y = w * round(n): dW sees the rounded value the forward multiplied
            dw += dy * n.to(dx_ptr.dtype.element_ty).to(ACC)
    tl.store(dw_ptr + pid * C + offs_n, dw, mask=mask_n)


def _check(fn, x, weight, eps, residual):
    check_tensor(fn, "x", x, ndim=2, dtypes=GRAD_DTYPES, unit_stride=True)
    T, C = x.shape
    if C == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}, expected C >= 1 channels")
    like = dict(dtype=x.dtype, device=x.device)
    if residual is not None:
        check_tensor(fn, "residual", residual, shape=(T, C), unit_stride=True, **like)
    check_tensor(fn, "weight", weight, shape=(C,), **like)
    check_eps(fn, eps)
    if triton.next_power_of_2(C) > 16384:
        raise ValueError(f"{fn}: x has C={C} channels, expected C <= 16384 (one row per program)")


def _forward(x, weight, eps, residual, num_warps):
    T, C = x.shape
    weight = weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else x
    r = residual if residual is not None else x          # unread without HAS_RESIDUAL
    if T > 0:
        _rms_norm_kernel[(T,)](
            x_ptr=x, r_ptr=r, w_ptr=weight, y_ptr=y, h_ptr=h,
            C=C, eps=float(eps),
            stride_xm=x.stride(0), stride_rm=r.stride(0), stride_ym=y.stride(0), stride_hm=h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=triton.next_power_of_2(C), ACC=tl_acc_dtype(x.dtype),
            num_warps=num_warps,
        )
    return y, h


def _backward(dy, dh, h, weight, eps, num_warps):
    """(dx [T, C], dw [C]) for y = w * round(RMSNorm(h)), with dh the gradient arriving on h (or None)."""
    T, C = h.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dh = dh if dh is None or dh.stride(-1) == 1 else dh.contiguous()
    dx = torch.empty_like(h, memory_format=torch.contiguous_format)
    programs = max(1, min(T, 512))                       # enough programs to fill a GPU; partials stay small
    dw = torch.zeros(programs, C, dtype=acc_dtype(h.dtype), device=h.device)
    if T > 0:
        _rms_norm_bwd_kernel[(programs,)](
            dy_ptr=dy, dh_ptr=dh if dh is not None else dy, h_ptr=h, w_ptr=weight.contiguous(), dx_ptr=dx,
            dw_ptr=dw,
            T=T, C=C, eps=float(eps), rows_per_program=triton.cdiv(T, programs),
            stride_dym=dy.stride(0), stride_dhm=dh.stride(0) if dh is not None else 0, stride_hm=h.stride(0),
            stride_dxm=dx.stride(0),
            HAS_DH=dh is not None, BLOCK_N=triton.next_power_of_2(C), ACC=tl_acc_dtype(h.dtype),
            num_warps=num_warps,
        )
    return dx, dw.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    """rms_norm with a backward: saves only what was normalised (h, or x) and the weight."""

    @staticmethod
    def forward(ctx, x, weight, eps, residual, num_warps):
        y, h = _forward(x, weight, eps, residual, num_warps)
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.num_warps, ctx.has_residual = eps, num_warps, residual is not None
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight = ctx.saved_tensors     # autograd passes zeros for an unused output (materialize_grads)
        dx, dw = _backward(dy, dh, h, weight, ctx.eps, ctx.num_warps)
        # h = x + residual: both get the total gradient on h
        return dx, dw, None, dx if ctx.has_residual else None, None


def rms_norm(x, weight, eps, residual=None, *, config=None):
    """Qwen2's RMSNorm of x [T, C] over its last dim: round(weight * round(x * rsqrt(mean(x^2) + eps))), in x's
    dtype (statistics in fp32, fp64 for fp64). Returns y [T, C].

    With residual [T, C]: h = x + residual (in x's dtype, as torch adds), returns (RMSNorm(h), h).
    Rows may be strided (e.g. a column slice of a wider buffer); C must be contiguous; weight [C] has x's dtype
    and device. Differentiable (in x, weight and residual) when autograd records.
    config: overrides of tiling.rms_norm_config (num_warps).
    """
    fn = "rms_norm"
    _check(fn, x, weight, eps, residual)
    num_warps = resolve_config(fn, rms_norm_config(x.shape[1]), config, pow2=("num_warps",))["num_warps"]
    inputs = (x, weight) if residual is None else (x, weight, residual)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return RMSNormFunction.apply(x, weight, eps, residual, num_warps)
    y, h = _forward(x, weight, eps, residual, num_warps)
    return (y, h) if residual is not None else y


def rms_norm_reference(x, weight, eps, residual=None):
    """The torch path (gundam.model.RMSNorm, transformers' Qwen2RMSNorm): the residual add in x's dtype,
    statistics in fp32, the normalised value cast to x's dtype before the weight multiply. fp64 inputs keep fp64
    statistics (the oracle of the kernels' fp64 runs; RMSNorm itself computes them in fp32)."""
    h = x if residual is None else x + residual
    s = h.to(acc_dtype(h.dtype))
    y = weight * (s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y if residual is None else (y, h)
