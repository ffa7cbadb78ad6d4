"""Projector + layout in one kernel: every output row of the packed encoder output is written once, in place.

An output row is either a projected token, y = cat(clip_token, sam_token) @ W^T + b (read from the two
halves directly, no concatenated copy), or the `image_newline` / `view_seperator` embedding. Which one, and
from which source rows, is given by a host-built `RowMap`: the kernel knows nothing of images (the encoder
builds the map from the image layout, `gundam.layout`).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, check_tensor, resolve_config, tl_acc_dtype

NEWLINE = -1    # row-map code in the CLIP column: write image_newline
SEPARATOR = -2  # row-map code in the CLIP column: write view_seperator
_NEWLINE, _SEPARATOR = tl.constexpr(NEWLINE), tl.constexpr(SEPARATOR)  # the same codes, visible to the kernel


@dataclass(frozen=True)
class RowMap:
    """Where each output row comes from: rows[r] = (CLIP row, SAM row) of a projected token, or
    (NEWLINE | SEPARATOR, -1). The bounds and the backward's index lists are made on the host, so neither
    the launcher nor the backward waits for the device."""
    rows: torch.Tensor            # int32 [T_out, 2], contiguous
    clip_rows: int                # 1 + largest CLIP row read
    sam_rows: int                 # 1 + largest SAM row read
    token_rows: torch.Tensor      # int64 [n_tok]: output rows that are projected tokens
    token_clip: torch.Tensor      # int64 [n_tok]: their CLIP rows
    token_sam: torch.Tensor       # int64 [n_tok]: their SAM rows
    newline_rows: torch.Tensor    # int64 [n_newline]
    separator_rows: torch.Tensor  # int64 [n_images]

    @staticmethod
    def from_host(rows: torch.Tensor, device=None) -> "RowMap":
        """From an integer CPU tensor [T_out, 2] (e.g. built with the codes above)."""
        check_tensor("RowMap", "rows", rows, ndim=2, shape=(None, 2), device=torch.device("cpu"))
        if rows.is_floating_point():
            raise TypeError(f"RowMap: rows has dtype {rows.dtype}, expected an integer dtype")
        top = int(rows.max()) if rows.numel() else -1
        if top >= 2**31:
            raise ValueError(f"RowMap: source row {top} does not fit int32")
        rows = rows.long()
        token = (rows[:, 0] >= 0).nonzero().flatten()
        on = lambda t: t.contiguous().to(device)   # noqa: E731
        return RowMap(
            rows=on(rows.to(torch.int32)),
            clip_rows=int(rows[:, 0].max()) + 1 if rows.numel() else 0,
            sam_rows=int(rows[:, 1].max()) + 1 if rows.numel() else 0,
            token_rows=on(token), token_clip=on(rows[token, 0]), token_sam=on(rows[token, 1]),
            newline_rows=on((rows[:, 0] == NEWLINE).nonzero().flatten()),
            separator_rows=on((rows[:, 0] == SEPARATOR).nonzero().flatten()),
        )


@triton.jit
def _project_layout_kernel(
    sam_ptr, clip_ptr, w_ptr, b_ptr, newline_ptr, sep_ptr, map_ptr, out_ptr,
    T_out, stride_sm, stride_cm, stride_wn, stride_om,
    N: tl.constexpr, K_CLIP: tl.constexpr, K_SAM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < T_out
    mask_n = offs_n < N
    clip_row = tl.load(map_ptr + offs_m * 2, mask=mask_m, other=_SEPARATOR)
    sam_row = tl.load(map_ptr + offs_m * 2 + 1, mask=mask_m, other=-1)
    is_token = clip_row >= 0
    # Newline/separator rows gather nothing (masked loads give zeros); their GEMM result is discarded below.
    clip_ptrs = clip_ptr + clip_row.to(tl.int64)[:, None] * stride_cm
    sam_ptrs = sam_ptr + sam_row.to(tl.int64)[:, None] * stride_sm
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn  # W^T tile [BLOCK_K, BLOCK_N]: K is W's contiguous dim

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    # cat(clip, sam) @ W^T = clip @ W[:, :K_CLIP]^T + sam @ W[:, K_CLIP:]^T
    for k in range(0, K_CLIP, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K_CLIP
        a = tl.load(clip_ptrs + offs_k[None, :], mask=is_token[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    for k in range(0, K_SAM, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K_SAM
        a = tl.load(sam_ptrs + offs_k[None, :], mask=is_token[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs + K_CLIP + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)[None, :]

    # Embedding rows: an exact round trip through the accumulator dtype, so they are stored bit for bit.
    newline = tl.load(newline_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    sep = tl.load(sep_ptr + offs_n, mask=mask_n, other=0.0).to(ACC)
    emb = tl.where((clip_row == _NEWLINE)[:, None], newline[None, :], sep[None, :])
    out = tl.where(is_token[:, None], acc, emb)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def default_config(T_out):
    # N = 1280 gives only 10 column tiles and a batch has hundreds to a few thousand output rows, so small
    # row tiles keep the SMs busy; big batches take 128-row tiles for twice the reuse of each weight tile.
    # BLOCK_K = 64 keeps the 3-stage pipeline's smem at 48-96 KB (fits sm_80 and sm_90); 8 warps keep the
    # gathered-row pointers and the fp32 accumulator under ~210 registers (4 warps spill at 128 rows).
    return dict(BLOCK_M=128 if T_out >= 4096 else 64, BLOCK_N=128, BLOCK_K=64, num_warps=8)


def _check(fn, sam, clip, weight, bias, newline, separator, row_map, out):
    if not isinstance(row_map, RowMap):
        raise TypeError(f"{fn}: row_map is a {type(row_map).__name__}, expected a RowMap")
    check_tensor(fn, "sam", sam, ndim=2, dtypes=GRAD_DTYPES, unit_stride=True)
    like = dict(dtype=sam.dtype, device=sam.device)
    check_tensor(fn, "clip", clip, ndim=2, unit_stride=True, **like)
    check_tensor(fn, "weight", weight, shape=(None, clip.shape[1] + sam.shape[1]), unit_stride=True, **like)
    N = weight.shape[0]
    for name, t in (("bias", bias), ("newline", newline), ("separator", separator)):
        check_tensor(fn, name, t, shape=(N,), **like)
    check_tensor(fn, "row_map.rows", row_map.rows, shape=(None, 2), dtype=torch.int32, device=sam.device)
    if not row_map.rows.is_contiguous():
        raise ValueError(f"{fn}: row_map.rows has strides {row_map.rows.stride()}, expected contiguous")
    if row_map.clip_rows > clip.shape[0]:
        raise ValueError(f"{fn}: row_map reads CLIP rows up to {row_map.clip_rows - 1}, expected fewer than "
                         f"clip's {clip.shape[0]} rows")
    if row_map.sam_rows > sam.shape[0]:
        raise ValueError(f"{fn}: row_map reads SAM rows up to {row_map.sam_rows - 1}, expected fewer than "
                         f"sam's {sam.shape[0]} rows")
    if out is not None:
        check_tensor(fn, "out", out, shape=(row_map.rows.shape[0], N), unit_stride=True, **like)


def _forward(sam, clip, weight, bias, newline, separator, row_map, out, cfg):
    T_out, N = row_map.rows.shape[0], weight.shape[0]
    if out is None:
        out = torch.empty((T_out, N), dtype=sam.dtype, device=sam.device)
    if T_out == 0:
        return out
    bias, newline, separator = bias.contiguous(), newline.contiguous(), separator.contiguous()
    grid = (triton.cdiv(T_out, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]))
    _project_layout_kernel[grid](
        sam, clip, weight, bias, newline, separator, row_map.rows, out,
        T_out, sam.stride(0), clip.stride(0), weight.stride(0), out.stride(0),
        N=N, K_CLIP=clip.shape[1], K_SAM=sam.shape[1],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        # fp32/fp64 inputs: exact products, not TF32 (fp16/bf16 ignore it).
        INPUT_PRECISION="tf32" if sam.dtype in (torch.float16, torch.bfloat16) else "ieee", ACC=tl_acc_dtype(sam.dtype),
        num_warps=cfg["num_warps"],
    )
    return out


class ProjectLayoutFunction(torch.autograd.Function):
    """project_and_layout with a backward. Every source row feeds exactly one output row, so the gradients of
    the CLIP and SAM halves are written by index (no accumulation); dW, dB are two GEMMs and a sum over the
    token rows; image_newline and view_seperator get the sums of their rows' gradients."""

    @staticmethod
    def forward(ctx, sam, clip, weight, bias, newline, separator, row_map, cfg):
        ctx.save_for_backward(sam, clip, weight)
        ctx.row_map = row_map
        return _forward(sam, clip, weight, bias, newline, separator, row_map, None, cfg)

    @staticmethod
    def backward(ctx, dout):
        sam, clip, weight = ctx.saved_tensors
        rm, K_clip = ctx.row_map, clip.shape[1]
        d_tok = dout[rm.token_rows]                                               # [n_tok, N]
        d_weight = torch.cat([d_tok.T @ clip[rm.token_clip], d_tok.T @ sam[rm.token_sam]], dim=1)
        d_clip = torch.zeros_like(clip).index_copy_(0, rm.token_clip, d_tok @ weight[:, :K_clip])
        d_sam = torch.zeros_like(sam).index_copy_(0, rm.token_sam, d_tok @ weight[:, K_clip:])
        return (d_sam, d_clip, d_weight, d_tok.sum(0), dout[rm.newline_rows].sum(0),
                dout[rm.separator_rows].sum(0), None, None)


def project_and_layout(sam, clip, weight, bias, newline, separator, row_map, *, out=None, config=None):
    """out [T_out, N]: projected tokens and newline/separator rows placed by `row_map` (a RowMap).

    sam [T_sam, K_sam], clip [T_clip, K_clip] (packed token-major, rows may be strided), weight [N, K_clip+K_sam]
    (nn.Linear weight: CLIP columns first), bias / newline / separator [N]; all one dtype and device.
    out: optional preallocated [T_out, N] output (rows may be strided; not with autograd).
    config: overrides of default_config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), e.g. small blocks for the
    interpreter. Differentiable in every tensor argument when autograd records.
    """
    fn = "project_and_layout"
    _check(fn, sam, clip, weight, bias, newline, separator, row_map, out)
    cfg = resolve_config(fn, default_config(row_map.rows.shape[0]), config, pow2=("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                         minimum=16)
    inputs = (sam, clip, weight, bias, newline, separator)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        if out is not None:
            raise ValueError(f"{fn}: out= given while autograd records, expected out=None (a new output)")
        return ProjectLayoutFunction.apply(*inputs, row_map, cfg)
    return _forward(*inputs, row_map, out, cfg)


def _config(dtype, T_out):
    cfg = default_config(T_out)
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["num_warps"]
    p = f"*{dtype}"
    return dict(
        kernel=_project_layout_kernel,
        signature=dict(sam_ptr=p, clip_ptr=p, w_ptr=p, b_ptr=p, newline_ptr=p, sep_ptr=p, map_ptr="*i32", out_ptr=p,
                       T_out="i32", stride_sm="i32", stride_cm="i32", stride_wn="i32", stride_om="i32",
                       N="constexpr", K_CLIP="constexpr", K_SAM="constexpr", BLOCK_M="constexpr",
                       BLOCK_N="constexpr", BLOCK_K="constexpr", INPUT_PRECISION="constexpr", ACC="constexpr"),
        constexprs=dict(N=1280, K_CLIP=1024, K_SAM=1024, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                        INPUT_PRECISION="tf32", ACC=tl.float32),
        # What the JIT specializes for 16-byte aligned tensors with row strides that are multiples of 16.
        attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(_project_layout_kernel.arg_names)
               if name.endswith("_ptr") or name.startswith("stride_")},
        num_warps=num_warps,
        name=f"project_and_layout_{dtype}_M{BLOCK_M}",
    )


# Production configs: the real projector (2048 -> 1280) at both row-tile sizes of the heuristic.
COMPILE_CONFIGS = [_config(dt, T_out) for dt in ("bf16", "fp16") for T_out in (893, 8192)]
