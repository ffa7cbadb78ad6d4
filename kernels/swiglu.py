"""Qwen2's SwiGLU activation, silu(gate) * up over two [T, I] buffers in one pass, and its backward.

Eager torch runs `F.silu(gate) * up` as two kernels and writes, then reads back, the [T, I] SiLU output in
between; this kernel reads gate and up once and writes the product once. fp32 math (fp64 for fp64 inputs, so
gradients can be checked to ~1e-10 in the interpreter), one rounding at the store: the reference also rounds
silu(gate) to the dtype before the multiply, so the kernel is the closer of the two to the exact value.

Two strided inputs, not one [T, 2I] buffer: the host model's gate_proj and up_proj are separate parameters.
Each input only needs a contiguous last dim, so the kernel takes either
- two GEMM outputs, gate_proj(x) and up_proj(x): the host's parameters as they are; x [T, C] is read twice;
- the two halves of one GEMM against the concatenated weight [2I, C], y[:, :I] and y[:, I:]: x is read once
  and one larger GEMM runs, but the concatenated weight is a copy of both [I, C] weights (2 x 4864 x 896 per
  layer), either rebuilt per call (a weight-sized copy each forward, and its gradient split back in the
  backward) or cached (twice the MLP's weight memory, stale once the host's parameters change under training).
The model should use two GEMMs. Reading x twice is one more read of T x 896 elements per layer, under 10% of
the T x 2 x 4864 elements the GEMMs write, and each GEMM is already large (N = 4864), so one merged GEMM gains
little; a per-call weight copy reads and writes 2 x 4864 x 896 elements per layer (17 MB each way in bf16),
more traffic than the second read of x (1.8 MB per 1000 tokens in bf16) below ~19,000 tokens, a cache doubles
the MLP weights, and the encoder shares the host's parameters without copies (gundam.patch).

Backward (`SiluMulFunction`): with s = sigmoid(g), one pass writes both gradients,
dgate = dy * up * s * (1 + g * (1 - s)) and dup = dy * g * s; gate and up are saved, not the output.
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, check_tensor, resolve_config, tl_acc_dtype
from gundam.kernels.tiling import silu_mul_config


@triton.jit
def _gate_and_up(g_ptr, u_ptr, I, stride_gm, stride_um, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """A program's row, columns, column mask, and its gate and up values in ACC. Grid (rows, column blocks): a
    program's columns are one contiguous run of each buffer's row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    g = tl.load(g_ptr + row * stride_gm + offs, mask=mask, other=0.0).to(ACC)
    u = tl.load(u_ptr + row * stride_um + offs, mask=mask, other=0.0).to(ACC)
    return row, offs, mask, g, u


@triton.jit
def _silu_mul_kernel(
    g_ptr,                  # [T, I] gate (rows may be strided)
    u_ptr,                  # [T, I] up (rows may be strided)
    y_ptr,                  # [T, I] out, contiguous: silu(gate) * up
    I,                      # columns
    stride_gm, stride_um,   # row strides of gate and up
    BLOCK: tl.constexpr,    # columns per program
    ACC: tl.constexpr,      # math dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    row, offs, mask, g, u = _gate_and_up(g_ptr, u_ptr, I, stride_gm, stride_um, BLOCK, ACC)
    y = g * tl.sigmoid(g) * u
    tl.store(y_ptr + row * I + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _silu_mul_bwd_kernel(
    dy_ptr,                 # [T, I] gradient of the output (rows may be strided)
    g_ptr,                  # [T, I] gate, as in the forward (rows may be strided)
    u_ptr,                  # [T, I] up, as in the forward (rows may be strided)
    dg_ptr,                 # [T, I] out, contiguous: gradient of gate
    du_ptr,                 # [T, I] out, contiguous: gradient of up
    I,                      # columns
    stride_dym, stride_gm, stride_um,   # row strides of dy, gate, up
    BLOCK: tl.constexpr,    # columns per program
    ACC: tl.constexpr,      # math dtype: tl.float32 (tl.float64 for fp64 inputs)
):
    row, offs, mask, g, u = _gate_and_up(g_ptr, u_ptr, I, stride_gm, stride_um, BLOCK, ACC)
    dy = tl.load(dy_ptr + row * stride_dym + offs, mask=mask, other=0.0).to(ACC)
    s = tl.sigmoid(g)
    # d silu(g) / dg = s + g s (1 - s) = s (1 + g (1 - s)): finite for any finite g (s -> 0 for g -> -inf)
    dg = dy * u * s * (1 + g * (1 - s))
    du = dy * g * s
    tl.store(dg_ptr + row * I + offs, dg.to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + row * I + offs, du.to(du_ptr.dtype.element_ty), mask=mask)


def _check(fn, gate, up):
    check_tensor(fn, "gate", gate, ndim=2, dtypes=GRAD_DTYPES, unit_stride=True)
    check_tensor(fn, "up", up, shape=tuple(gate.shape), dtype=gate.dtype, device=gate.device, unit_stride=True)


def _grid(T, I, block):
    return (T, triton.cdiv(I, block))


def _forward(gate, up, cfg):
    T, I = gate.shape
    y = torch.empty(T, I, dtype=gate.dtype, device=gate.device)
    if y.numel():
        _silu_mul_kernel[_grid(T, I, cfg["BLOCK"])](
            g_ptr=gate, u_ptr=up, y_ptr=y, I=I, stride_gm=gate.stride(0), stride_um=up.stride(0),
            BLOCK=cfg["BLOCK"], ACC=tl_acc_dtype(gate.dtype), num_warps=cfg["num_warps"],
        )
    return y


def _backward(dy, gate, up, cfg):
    """(dgate, dup), each a new contiguous [T, I] in gate's dtype."""
    T, I = gate.shape
    dy = dy if dy.stride(-1) == 1 or I <= 1 else dy.contiguous()
    dg = torch.empty(T, I, dtype=gate.dtype, device=gate.device)
    du = torch.empty_like(dg)
    if dg.numel():
        _silu_mul_bwd_kernel[_grid(T, I, cfg["BLOCK"])](
            dy_ptr=dy, g_ptr=gate, u_ptr=up, dg_ptr=dg, du_ptr=du, I=I,
            stride_dym=dy.stride(0), stride_gm=gate.stride(0), stride_um=up.stride(0),
            BLOCK=cfg["BLOCK"], ACC=tl_acc_dtype(gate.dtype), num_warps=cfg["num_warps"],
        )
    return dg, du


class SiluMulFunction(torch.autograd.Function):
    """silu_mul with a backward: saves gate and up (the output is not needed)."""

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
    """silu(gate) * up for gate, up [T, I] -> a new contiguous [T, I] in their dtype (fp32 math, one rounding).

    Rows may be strided (e.g. the two halves of one [T, 2I] GEMM output); the last dim must be contiguous; gate
    and up share dtype and device. Differentiable (in gate and up) when autograd records.
    config: overrides of tiling.silu_mul_config (BLOCK, num_warps).
    """
    fn = "silu_mul"
    _check(fn, gate, up)
    cfg = resolve_config(fn, silu_mul_config(gate.shape[1]), config, pow2=("BLOCK", "num_warps"))
    if triton.cdiv(gate.shape[1], cfg["BLOCK"]) > 65535:       # CUDA's limit on the grid's second dim
        raise ValueError(f"{fn}: gate has I={gate.shape[1]} columns, expected at most 65535 blocks of "
                         f"BLOCK={cfg['BLOCK']}")
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMulFunction.apply(gate, up, cfg)
    return _forward(gate, up, cfg)


def silu_mul_reference(gate, up):
    """The torch path (gundam.model.Qwen2MLP): F.silu(gate) * up, each op rounded to the dtype."""
    return torch.nn.functional.silu(gate) * up
