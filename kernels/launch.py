"""What every launcher in `gundam.kernels` shares: argument checks with one convention, and block-size overrides.

Convention, for every launcher:
- a wrong type or dtype raises TypeError; a wrong shape, stride, device or value raises ValueError;
- messages are one line: "<launcher>: <argument> <what it is>, expected <what it should be>";
- `config=` (a dict) overrides the launcher's heuristic block sizes / warps; unknown keys are an error.
"""
import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GRAD_DTYPES = (*FLOAT_DTYPES, torch.float64)   # kernels with a backward also take fp64: gradient checks


def acc_dtype(dtype):
    """Accumulator / scratch dtype of a kernel reading `dtype`: fp64 for fp64 inputs (gradient checks in
    Triton's interpreter), else fp32. Returns the torch dtype; `tl_acc_dtype` the Triton one."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc_dtype(dtype):
    import triton.language as tl    # here, not at the top: the planning modules use this file without Triton
    return tl.float64 if dtype == torch.float64 else tl.float32


def check_tensor(fn, name, t, *, ndim=None, shape=None, dtype=None, dtypes=None, device=None, unit_stride=False):
    """Check one tensor argument of launcher `fn`. `shape` may hold None for any size; `unit_stride`: the
    last dim is contiguous (row strides are free)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}: {name} is a {type(t).__name__}, expected a torch.Tensor")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected {dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        raise TypeError(f"{fn}: {name} has dtype {t.dtype}, expected one of {', '.join(map(str, dtypes))}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {ndim} dims")
    if shape is not None and (t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape))):
        want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {want}")
    if device is not None and t.device != device:
        raise ValueError(f"{fn}: {name} is on {t.device}, expected {device}")
    if unit_stride and t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{fn}: {name} has strides {t.stride()}, expected a contiguous last dim")
    return t


def resolve_config(fn, defaults: dict, config: dict | None, pow2=(), minimum=1) -> dict:
    """The heuristic `defaults` with the caller's `config` overrides applied and checked."""
    cfg = dict(defaults)
    if config is not None:
        unknown = set(config) - set(cfg)
        if unknown:
            raise ValueError(f"{fn}: config keys {sorted(unknown)} unknown, expected some of {sorted(cfg)}")
        cfg.update(config)
    for k in pow2:
        v = cfg[k]
        if not isinstance(v, int) or v < minimum or v & (v - 1):
            raise ValueError(f"{fn}: config {k}={v!r}, expected a power of two >= {minimum}")
    return cfg


def check_scale(fn, scale, head_dim) -> float:
    """An attention launcher's logit scale: head_dim ** -0.5 by default, else a positive number."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{fn}: scale={scale!r}, expected a positive float")
    return float(scale)


def check_eps(fn, eps) -> float:
    """A normalisation launcher's eps: a positive finite real number (not a bool or a tensor)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{fn}: eps is a {type(eps).__name__}, expected a float")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"{fn}: eps={eps}, expected a positive finite float")
    return float(eps)


def dot_precision(dtype):
    """tl.dot's input_precision for inputs of `dtype`: exact fp32 products for fp32/fp64 (checks against the
    references); "tf32" is ignored for 16-bit inputs."""
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"
