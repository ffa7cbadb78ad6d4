"""LayerNorm over the last dim of a token-major [T, C] buffer, with an optional fused residual add.

Pre-LN blocks do `h = shortcut + attn_out; y = norm2(h)`: with `residual` the kernel reads both, writes the
residual stream h and LN(h) in one pass. Statistics are torch's: fp32 mean, biased variance, rsqrt(var + eps).
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import FLOAT_DTYPES, check_tensor, resolve_config


@triton.jit
def _layer_norm_kernel(
    x_ptr, r_ptr, w_ptr, b_ptr, y_ptr, h_ptr,
    C, eps,
    stride_xm, stride_rm, stride_ym, stride_hm,
    HAS_RESIDUAL: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per row: T is thousands to tens of thousands of rows, so this already fills the GPU, and a
    # whole row (C <= 1024) fits in registers, so x and r are read once and y and h written once.
    row = tl.program_id(0).to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    x = tl.load(x_ptr + row * stride_xm + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_rm + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        # The residual stream is stored in the activation dtype; normalise exactly that rounded value, as the
        # torch path does (a no-op in fp32).
        h = (x + r).to(h_ptr.dtype.element_ty)
        tl.store(h_ptr + row * stride_hm + offs_n, h, mask=mask_n)
        x = h.to(tl.float32)
    mean = tl.sum(x, axis=0) / C
    # Two-pass variance on the register-resident row: no E[x^2] - E[x]^2 cancellation.
    xc = tl.where(mask_n, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / C
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    y = xc * rstd * w + b
    tl.store(y_ptr + row * stride_ym + offs_n, y.to(y_ptr.dtype.element_ty), mask=mask_n)


def default_config(C):
    # ~8 elements per thread: 16-byte vector loads for 16-bit dtypes and no register pressure.
    return dict(num_warps=min(max(triton.next_power_of_2(C) // 256, 1), 8))


def layer_norm(x, weight, bias, eps, residual=None, *, config=None):
    """LN(x) * weight + bias over the last dim of x [T, C]; returns y [T, C] in x's dtype.

    With residual [T, C]: h = x + residual, returns (LN(h) * weight + bias, h).
    Rows may be strided (e.g. a column slice of a wider buffer); C must be contiguous.
    config: overrides of default_config (num_warps).
    """
    fn = "layer_norm"
    check_tensor(fn, "x", x, ndim=2, dtypes=FLOAT_DTYPES, unit_stride=True)
    T, C = x.shape
    if C == 0:
        raise ValueError(f"{fn}: x has shape {tuple(x.shape)}, expected C >= 1 channels")
    like = dict(dtype=x.dtype, device=x.device)
    if residual is not None:
        check_tensor(fn, "residual", residual, shape=(T, C), unit_stride=True, **like)
    check_tensor(fn, "weight", weight, shape=(C,), **like)
    check_tensor(fn, "bias", bias, shape=(C,), **like)
    if not eps > 0:
        raise ValueError(f"{fn}: eps={eps}, expected a positive float")
    BLOCK_N = triton.next_power_of_2(C)
    if BLOCK_N > 16384:
        raise ValueError(f"{fn}: x has C={C} channels, expected C <= 16384 (one row per program)")
    cfg = resolve_config(fn, default_config(C), config, pow2=("num_warps",))
    weight, bias = weight.contiguous(), bias.contiguous()
    y = torch.empty((T, C), **like)
    h = torch.empty((T, C), **like) if residual is not None else y
    r = residual if residual is not None else x
    if T > 0:
        _layer_norm_kernel[(T,)](
            x, r, weight, bias, y, h,
            C, float(eps),
            x.stride(0), r.stride(0), y.stride(0), h.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_N=BLOCK_N, num_warps=cfg["num_warps"],
        )
    return (y, h) if residual is not None else y


def layer_norm_reference(x, weight, bias, eps, residual=None):
    """The torch path: the residual add in x's dtype, then F.layer_norm."""
    if residual is None:
        return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)
    h = x + residual
    return torch.nn.functional.layer_norm(h, (h.shape[-1],), weight, bias, eps), h


def _config(dtype, C, has_residual):
    BLOCK_N = triton.next_power_of_2(C)
    p = f"*{dtype}"
    return dict(
        kernel=_layer_norm_kernel,
        signature=dict(x_ptr=p, r_ptr=p, w_ptr=p, b_ptr=p, y_ptr=p, h_ptr=p, C="i32", eps="fp32",
                       stride_xm="i32", stride_rm="i32", stride_ym="i32", stride_hm="i32",
                       HAS_RESIDUAL="constexpr", BLOCK_N="constexpr"),
        constexprs=dict(HAS_RESIDUAL=has_residual, BLOCK_N=BLOCK_N),
        # What the JIT specializes for 16-byte aligned tensors with C and row strides multiples of 16.
        attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(_layer_norm_kernel.arg_names)
               if name.endswith("_ptr") or name.startswith("stride_") or name == "C"},
        num_warps=default_config(C)["num_warps"],
        name=f"layer_norm_{dtype}_C{C}{'_residual' if has_residual else ''}",
    )


# Production configs: SAM (C=768) and CLIP (C=1024), with and without the fused residual.
COMPILE_CONFIGS = [_config(dt, C, res) for dt in ("bf16", "fp16") for C in (768, 1024) for res in (False, True)]
