"""CLIP's quick_gelu, x * sigmoid(1.702 x), as one in-place pass over a [T, N] buffer.

Eager torch runs it as three kernels (scale, sigmoid, multiply), each reading and writing the whole [T, 4C]
hidden state of the MLP; this kernel reads and writes it once. fp32 math, one rounding at the store.
"""
import triton
import triton.language as tl

from gundam.kernels.launch import FLOAT_DTYPES, check_tensor, resolve_config
from gundam.kernels.tiling import quick_gelu_config


@triton.jit
def _quick_gelu_kernel(
    x_ptr,                      # [n] elements, contiguous; overwritten with the result
    n,                          # number of elements
    BLOCK: tl.constexpr,        # elements per program
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.sigmoid(1.702 * x)
    tl.store(x_ptr + offs, y.to(x_ptr.dtype.element_ty), mask=mask)


def quick_gelu_(x, *, config=None):
    """x * sigmoid(1.702 * x), in place on a contiguous tensor; returns x (reference: gundam.model.quick_gelu)."""
    fn = "quick_gelu_"
    check_tensor(fn, "x", x, dtypes=FLOAT_DTYPES)
    if not x.is_contiguous():
        raise ValueError(f"{fn}: x has strides {x.stride()}, expected a contiguous tensor")
    cfg = resolve_config(fn, quick_gelu_config(), config, pow2=("BLOCK", "num_warps"))
    n = x.numel()
    if n:
        _quick_gelu_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](x, n, BLOCK=cfg["BLOCK"], num_warps=cfg["num_warps"])
    return x
