"""LayerNorm over the last dim of a token-major [T, C] buffer, with an optional fused residual add, and its
backward.

Pre-LN blocks do `h = shortcut + attn_out; y = norm2(h)`: with `residual` the kernel reads both, writes the
residual stream h and LN(h) in one pass. Statistics are torch's: mean, biased variance, rsqrt(var + eps), in
fp32 (fp64 for fp64 inputs, so gradients can be checked to ~1e-10 in the interpreter).

Backward (`LayerNormFunction`): one pass over the rows recomputes the row's statistics from h (already loaded,
so nothing is saved but h), writes dx = dh_total (the LN gradient plus the gradient arriving on the residual
stream; it is also the residual's gradient), and accumulates dW, dB per program in registers; the per-program
partials [programs, C] are reduced in torch (deterministic, no atomics).
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, acc_dtype, check_eps, check_tensor, resolve_config, tl_acc_dtype
from gundam.kernels.tiling import layer_norm_config


@triton.jit
def _residual_row(x_ptr, r_ptr, h_ptr, row, offs_n, mask_n, stride_xm, stride_rm, stride_hm,
                  HAS_RESIDUAL: tl.constexpr, ACC: tl.constexpr):
    """A norm kernel's row in ACC: x, or with HAS_RESIDUAL the residual stream h = x + r, stored first in the
    activation dtype and normalised as that rounded value, as the torch path does (fp32 sum of two 16-bit values
    rounded once: torch's own add; a no-op in fp32). Shared by LayerNorm and RMSNorm (rmsnorm.py)."""
    x = tl.load(x_ptr + row * stride_xm + offs_n, mask=mask_n, other=0.0).to(ACC)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + offs_n, mask=mask_n, other=0.0).to(ACC)
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_hm + offs_n, h, mask=mask_n)
        x = h.to(ACC)
    return x


@triton.jit
def _layer_norm_kernel(
    x_ptr,          # [T, C] input (rows may be strided)
    r_ptr,          # [T, C] residual (HAS_RESIDUAL)
    w_ptr, b_ptr,   # [C]
    y_ptr,          # [T, C] out: LN(h) * w + b
    h_ptr,          # [T, C] out: h = x + r (HAS_RESIDUAL)
    C,              # channels
    eps,
    stride_xm, stride_rm, stride_ym, stride_hm,     # row strides of x, r, y, h
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,      # power of two >= C: a whole row per program
    ACC: tl.constexpr,          # statistics dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    # One program per row: T is thousands to tens of thousands of rows, so this already fills the GPU, and a
    # whole row (C <= 1024) fits in registers, so x and r are read once and y and h written once.
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    x = _residual_row(x_ptr, r_ptr, h_ptr, row, offs_n, mask_n, stride_xm, stride_rm, stride_hm, HAS_RESIDUAL, ACC)
    mean = tl.sum(x, axis=0) / C
    # Two-pass variance on the register-resident row: no E[x^2] - E[x]^2 cancellation.
    xc = tl.where(mask_n, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    y = xc * rstd * w + b
    tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,             # [T, C] gradient of y
    dh_ptr,             # [T, C] gradient arriving on the residual stream h (HAS_DH)
    h_ptr,              # [T, C] what was normalised (h, or x without residual)
    w_ptr,              # [C]
    dx_ptr,             # [T, C] out: gradient of x (= of the residual)
    dw_ptr, db_ptr,     # [programs, C] out, ACC dtype: this program's partial sums of dW, dB
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
    db = tl.zeros([BLOCK_N], dtype=ACC)
    row0 = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = row0 + i
        if row < T:
            row64 = row.to(tl.int64)
            h = tl.load(h_ptr + row64 * stride_hm + offs_n, mask=mask_n, other=0.0).to(ACC)
            dy = tl.load(dy_ptr + row64 * stride_dym + offs_n, mask=mask_n, other=0.0).to(ACC)
            mean = tl.sum(h, axis=0) / C
            hc = tl.where(mask_n, h - mean, 0.0)
            rstd = tl.rsqrt(tl.sum(hc * hc, axis=0) / C + eps)
            xhat = hc * rstd
            wdy = w * dy
            c1 = tl.sum(xhat * wdy, axis=0) / C
            c2 = tl.sum(wdy, axis=0) / C
            dx = (wdy - (xhat * c1 + c2)) * rstd
            if HAS_DH:
                dx += tl.load(dh_ptr + row64 * stride_dhm + offs_n, mask=mask_n, other=0.0).to(ACC)
            tl.store(dx_ptr + row64 * stride_dxm + offs_n, dx.to(dx_ptr.dtype.element_ty), mask=mask_n)
            dw += dy * xhat
            db += dy
    tl.store(dw_ptr + pid * C + offs_n, dw, mask=mask_n)
    tl.store(db_ptr + pid * C + offs_n, db, mask=mask_n)


def _check(fn, x, weight, bias, eps, residual):
    check_tensor(fn, "x", x, ndim=2, dtypes=GRAD_DTYPES, unit_stride=True)
    T, C = x.shape
    if C == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}, expected C >= 1 channels")
    like = dict(dtype=x.dtype, device=x.device)
    if residual is not None:
        check_tensor(fn, "residual", residual, shape=(T, C), unit_stride=True, **like)
    check_tensor(fn, "weight", weight, shape=(C,), **like)
    check_tensor(fn, "bias", bias, shape=(C,), **like)
    check_eps(fn, eps)
    if triton.next_power_of_2(C) > 16384:
        raise ValueError(f"{fn}: x has C={C} channels, expected C <= 16384 (one row per program)")


def _forward(x, weight, bias, eps, residual, num_warps):
    T, C = x.shape
    weight, bias = weight.contiguous(), bias.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    h = torch.empty_like(y) if residual is not None else x
    r = residual if residual is not None else x
    if T > 0:
        _layer_norm_kernel[(T,)](
            x_ptr=x, r_ptr=r, w_ptr=weight, b_ptr=bias, y_ptr=y, h_ptr=h,
            C=C, eps=float(eps),
            stride_xm=x.stride(0), stride_rm=r.stride(0), stride_ym=y.stride(0), stride_hm=h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=triton.next_power_of_2(C), ACC=tl_acc_dtype(x.dtype),
            num_warps=num_warps,
        )
    return y, h


def _backward(dy, dh, h, weight, eps, num_warps):
    """(dx [T, C], dw [C], db [C]) for y = LN(h) * w + b, with dh the gradient arriving on h (or None)."""
    T, C = h.shape
    dy = dy if dy.stride(-1) == 1 else dy.contiguous()
    dh = dh if dh is None or dh.stride(-1) == 1 else dh.contiguous()
    dx = torch.empty_like(h, memory_format=torch.contiguous_format)
    programs = max(1, min(T, 512))                       # enough programs to fill a GPU; partials stay small
    acc = acc_dtype(h.dtype)
    dw = torch.zeros(programs, C, dtype=acc, device=h.device)
    db = torch.zeros(programs, C, dtype=acc, device=h.device)
    if T > 0:
        _layer_norm_bwd_kernel[(programs,)](
            dy_ptr=dy, dh_ptr=dh if dh is not None else dy, h_ptr=h, w_ptr=weight.contiguous(), dx_ptr=dx,
            dw_ptr=dw, db_ptr=db,
            T=T, C=C, eps=float(eps), rows_per_program=triton.cdiv(T, programs),
            stride_dym=dy.stride(0), stride_dhm=dh.stride(0) if dh is not None else 0, stride_hm=h.stride(0),
            stride_dxm=dx.stride(0),
            HAS_DH=dh is not None, BLOCK_N=triton.next_power_of_2(C), ACC=tl_acc_dtype(h.dtype), num_warps=num_warps,
        )
    return dx, dw.sum(0).to(weight.dtype), db.sum(0).to(weight.dtype)


class LayerNormFunction(torch.autograd.Function):
    """layer_norm with a backward: saves only what was normalised (h, or x) and the weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, residual, num_warps):
        y, h = _forward(x, weight, bias, eps, residual, num_warps)
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.num_warps, ctx.has_residual = eps, num_warps, residual is not None
        return (y, h) if residual is not None else y

    @staticmethod
    def backward(ctx, dy, dh=None):
        h, weight = ctx.saved_tensors     # autograd passes zeros for an unused output (materialize_grads)
        dx, dw, db = _backward(dy, dh, h, weight, ctx.eps, ctx.num_warps)
        # h = x + residual: both get dh_total
        return dx, dw, db, None, dx if ctx.has_residual else None, None


def layer_norm(x, weight, bias, eps, residual=None, *, config=None):
    """LN(x) * weight + bias over the last dim of x [T, C]; returns y [T, C] in x's dtype.

    With residual [T, C]: h = x + residual, returns (LN(h) * weight + bias, h).
    Rows may be strided (e.g. a column slice of a wider buffer); C must be contiguous. Differentiable (in x,
    weight, bias and residual) when autograd records.
    config: overrides of tiling.layer_norm_config (num_warps).
    """
    fn = "layer_norm"
    _check(fn, x, weight, bias, eps, residual)
    num_warps = resolve_config(fn, layer_norm_config(x.shape[1]), config, pow2=("num_warps",))["num_warps"]
    inputs = (x, weight, bias) if residual is None else (x, weight, bias, residual)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return LayerNormFunction.apply(x, weight, bias, eps, residual, num_warps)
    y, h = _forward(x, weight, bias, eps, residual, num_warps)
    return (y, h) if residual is not None else y


def layer_norm_reference(x, weight, bias, eps, residual=None):
    """The torch path: the residual add in x's dtype, then F.layer_norm."""
    if residual is None:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x + residual
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps), h
