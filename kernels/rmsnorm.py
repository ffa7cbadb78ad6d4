"""Qwen2's RMSNorm over the last dim of a token-major [T, C] buffer, with an optional fused residual add, and its
backward (DeepSeek-OCR 2's encoder layers; the LayerNorm kernel's design, gundam.kernels.layernorm).

Rounding order is transformers' Qwen2RMSNorm's (gundam.model.RMSNorm): the statistics in fp32 (fp64 for fp64
inputs), the normalised row cast to the input dtype, then multiplied by the weight in that dtype:
y = w * round(h * rsqrt(mean(h^2) + eps)). With `residual` the kernel reads both inputs and writes the residual
stream h = x + residual (rounded to the dtype, as the torch path stores it) and y in one pass.

Backward (`RMSNormFunction`): one pass over the rows recomputes rstd from h (nothing else is saved), writes
dx = rstd (w dy - xhat mean(w dy xhat)) plus the gradient arriving on the residual stream (it is also the
residual's gradient), and accumulates dW = sum(dy xhat) per program; the per-program partials [programs, C] are
reduced in torch (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, acc_dtype, check_tensor, resolve_config, tl_acc_dtype
from gundam.kernels.tiling import rms_norm_config


@triton.jit
def _rms_norm_kernel(
    x_ptr,          # [T, C] input (rows may be strided)
    r_ptr,          # [T, C] residual (HAS_RESIDUAL)
    w_ptr,          # [C] weight
    y_ptr,          # [T, C] out: w * round(h * rstd)
    h_ptr,          # [T, C] out: h = x + r (HAS_RESIDUAL)
    C,              # channels
    eps,
    stride_xm, stride_rm, stride_ym, stride_hm,     # row strides of x, r, y, h
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,      # power of two >= C: a whole row per program
    ACC: tl.constexpr,          # statistics dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    # One program per row, as the LayerNorm kernel: thousands of rows fill the GPU, a row fits in registers.
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    x = tl.load(x_ptr + row * stride_xm + offs_n, mask=mask_n, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + offs_n, mask=mask_n, other=0.0).to(ACC)
        h = (x + r).to(h_ptr.dtype.element_ty)      # the stored residual stream is what gets normalised
        tl.store(h_ptr + row * stride_hm + offs_n, h, mask=mask_n)
        x = h.to(ACC)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / C + eps)
    normed = (x * rstd).to(y_ptr.dtype.element_ty).to(ACC)       # cast before the weight, as Qwen2RMSNorm
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    tl.store(y_ptr + row * stride_ym + offs_n, (w * normed).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _rms_norm_bwd_kernel(
    dy_ptr,             # [T, C] gradient of y
    dh_ptr,             # [T, C] gradient arriving on the residual stream h (HAS_DH)
    h_ptr,              # [T, C] what was normalised (h, or x without residual)
    w_ptr,              # [C]
    dx_ptr,             # [T, C] out: gradient of x (= of the residual)
    dw_ptr,             # [programs, C] out, ACC dtype: this program's partial sums of dW
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
            xhat = h * rstd
            wdy = w * dy
            dx = (wdy - xhat * (tl.sum(wdy * xhat, axis=0) / C)) * rstd
            if HAS_DH:
                dx += tl.load(dh_ptr + row64 * stride_dhm + offs_n, mask=mask_n, other=0.0).to(ACC)
            tl.store(dx_ptr + row64 * stride_dxm + offs_n, dx.to(dx_ptr.dtype.element_ty), mask=mask_n)
            dw += dy * xhat
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
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"{fn}: eps={eps!r}, expected a positive finite float")
    if triton.next_power_of_2(C) > 16384:
        raise ValueError(f"{fn}: x has C={C} channels, expected C <= 16384 (one row per program)")


def _forward(x, weight, eps, residual, num_warps):
    T, C = x.shape
    weight = weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else x
    r = residual if residual is not None else x
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
    """(dx [T, C], dw [C]) for y = w * RMSNorm(h), with dh the gradient arriving on h (or None)."""
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
            HAS_DH=dh is not None, BLOCK_N=triton.next_power_of_2(C), ACC=tl_acc_dtype(h.dtype), num_warps=num_warps,
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
        # h = x + residual: both get dh_total
        return dx, dw, None, dx if ctx.has_residual else None, None


def rms_norm(x, weight, eps, residual=None, *, config=None):
    """weight * RMSNorm(x) over the last dim of x [T, C] (Qwen2's rounding order); returns y [T, C] in x's dtype.

    With residual [T, C]: h = x + residual, returns (weight * RMSNorm(h), h).
    Rows may be strided (e.g. a column slice of a wider buffer); C must be contiguous. Differentiable (in x,
    weight and residual) when autograd records.
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
    """The torch path (gundam.model.RMSNorm's formula): the residual add in x's dtype, fp32 statistics (fp64 for
    fp64), the normalised row cast back before the weight multiply."""
    h = x if residual is None else x + residual
    f = h.to(torch.promote_types(h.dtype, torch.float32))
    y = weight * (f * torch.rsqrt(f.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype)
    return y if residual is None else (y, h)
