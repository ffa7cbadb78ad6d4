"""Projector + layout in one kernel: every output row of the packed encoder output is written once, in place.

An output row is either a projected token, y = cat(clip_token, sam_token) @ W^T + b (read from the two
halves directly, no concatenated copy), or the `image_newline` / `view_seperator` embedding. Which one, and
from which source rows, is given by a host-built `RowMap`: the kernel knows nothing of images (the encoder
builds the map from the image layout, `gundam.layout`; RowMap lives in `segments`, with the other host-built
tables).
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, check_tensor, resolve_config, tl_acc_dtype
from gundam.kernels.segments import NEWLINE, SEPARATOR, RowMap
from gundam.kernels.tiling import project_layout_config

_NEWLINE, _SEPARATOR = tl.constexpr(NEWLINE), tl.constexpr(SEPARATOR)  # the row-map codes, visible to the kernel


@triton.jit
def _project_layout_kernel(
    sam_ptr,            # [T_sam, K_SAM] SAM tokens (rows may be strided)
    clip_ptr,           # [T_clip, K_CLIP] CLIP tokens (rows may be strided)
    w_ptr,              # [N, K_CLIP + K_SAM] projector weight (nn.Linear: CLIP columns first)
    b_ptr,              # [N] projector bias
    newline_ptr,        # [N] image_newline
    sep_ptr,            # [N] view_seperator
    map_ptr,            # int32 [T_out, 2] row map: (CLIP row, SAM row), or (NEWLINE | SEPARATOR, -1)
    out_ptr,            # out [T_out, N] (rows may be strided)
    T_out,              # output rows
    stride_sm, stride_cm, stride_wn, stride_om,     # row strides of sam, clip, w, out
    N: tl.constexpr,            # output features
    K_CLIP: tl.constexpr,       # CLIP features
    K_SAM: tl.constexpr,        # SAM features
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,   # output rows x features, K step
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 / fp64 inputs (exact dots), "tf32" (ignored) for 16-bit
    ACC: tl.constexpr,          # accumulator dtype: tl.float32 (tl.float64 for fp64 inputs)
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
        sam_ptr=sam, clip_ptr=clip, w_ptr=weight, b_ptr=bias, newline_ptr=newline, sep_ptr=separator,
        map_ptr=row_map.rows, out_ptr=out,
        T_out=T_out, stride_sm=sam.stride(0), stride_cm=clip.stride(0), stride_wn=weight.stride(0),
        stride_om=out.stride(0),
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
    config: overrides of tiling.project_layout_config (BLOCK_M, BLOCK_N, BLOCK_K, num_warps), e.g. small blocks
    for the interpreter. Differentiable in every tensor argument when autograd records.
    """
    fn = "project_and_layout"
    _check(fn, sam, clip, weight, bias, newline, separator, row_map, out)
    cfg = resolve_config(fn, project_layout_config(row_map.rows.shape[0]), config,
                         pow2=("BLOCK_M", "BLOCK_N", "BLOCK_K"), minimum=16)
    inputs = (sam, clip, weight, bias, newline, separator)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        if out is not None:
            raise ValueError(f"{fn}: out= given while autograd records, expected out=None (a new output)")
        return ProjectLayoutFunction.apply(*inputs, row_map, cfg)
    return _forward(*inputs, row_map, out, cfg)
