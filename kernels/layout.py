"""Projector + layout in one kernel: every output row of the packed encoder output is written once, in place.

An output row is either a projected token, y = cat(clip_token, sam_token) @ W^T + b (read from the two
halves directly, no concatenated copy), or the `image_newline` / `view_seperator` embedding. Which one, and
from which source rows, is given by a host-built row map (`build_layout`).

Per image: the local grid if it has crops (gh*qi rows of gw*qi tokens, crops placed by tile, each row followed
by a newline), then qb global rows of qb tokens (each followed by a newline), then one separator.
"""
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

NEWLINE = -1    # row-map code in the CLIP column: write image_newline
SEPARATOR = -2  # row-map code in the CLIP column: write view_seperator
_NEWLINE, _SEPARATOR = tl.constexpr(NEWLINE), tl.constexpr(SEPARATOR)  # the same codes, visible to the kernel


@dataclass(frozen=True)
class ImageViews:
    """One image's views, as indices into the per-view arrays (sam_off, clip_off, q) given to build_layout."""
    global_view: int
    grid_w: int = 1                     # crop tiles wide
    grid_h: int = 1                     # crop tiles high
    crop_views: tuple[int, ...] = ()    # grid_w*grid_h views in tile order c = ty*grid_w + tx; () = no crops


@dataclass(frozen=True)
class Layout:
    row_map: torch.Tensor      # int32 [T_out, 2]: (CLIP row, SAM row) of a token, else (NEWLINE | SEPARATOR, -1)
    out_offsets: torch.Tensor  # int64 [n_images + 1]: image i is out[out_offsets[i]:out_offsets[i + 1]]
    clip_rows: int             # 1 + largest CLIP row read (bounds are checked without a device sync)
    sam_rows: int              # 1 + largest SAM row read


def build_layout(images, sam_off, clip_off, q, device="cpu"):
    """Row map of the packed output for `images` (list of ImageViews).

    Per view v: sam_off[v] = first row of its q[v]*q[v] tokens in the packed SAM output (row-major);
    clip_off[v] = first row of its 1 + q[v]*q[v] tokens in the packed CLIP output (class token first).
    """
    sam_off, clip_off, q = (list(map(int, a.tolist() if torch.is_tensor(a) else a)) for a in (sam_off, clip_off, q))
    n_views = len(q)
    if len(sam_off) != n_views or len(clip_off) != n_views:
        raise ValueError(f"build_layout: sam_off, clip_off, q have lengths {len(sam_off)}, {len(clip_off)}, "
                         f"{n_views}, expected one entry per view each")
    for v in range(n_views):
        if q[v] < 1 or sam_off[v] < 0 or clip_off[v] < 0:
            raise ValueError(f"build_layout: view {v} has q={q[v]}, sam_off={sam_off[v]}, clip_off={clip_off[v]}, "
                             f"expected q >= 1 and offsets >= 0")

    # Host-side index math in numpy: no torch ops, so the op count of a forward does not grow with images.
    def view_tokens(v):  # (clip rows, sam rows) of view v's tokens, each [q, q]
        t = np.arange(q[v] * q[v], dtype=np.int64).reshape(q[v], q[v])
        return clip_off[v] + 1 + t, sam_off[v] + t

    def with_newlines(clip_rows, sam_rows):  # [R, W] grids -> [R * (W + 1), 2] with a newline ending each row
        R = clip_rows.shape[0]
        grid = np.stack([clip_rows, sam_rows], axis=-1)                          # [R, W, 2]
        nl = np.broadcast_to(np.array([NEWLINE, -1], dtype=np.int64), (R, 1, 2))  # [R, 1, 2]
        return np.concatenate([grid, nl], axis=1).reshape(-1, 2)                 # [R * (W + 1), 2]

    parts, offsets = [], [0]
    for i, im in enumerate(images):
        views = (im.global_view, *im.crop_views)
        if any(not 0 <= v < n_views for v in views):
            raise ValueError(f"build_layout: image {i} uses views {views}, expected indices in [0, {n_views})")
        if im.grid_w < 1 or im.grid_h < 1:
            raise ValueError(f"build_layout: image {i} has grid {im.grid_w}x{im.grid_h}, expected >= 1x1")
        n_crops = im.grid_w * im.grid_h
        if im.crop_views and (len(im.crop_views) != n_crops or n_crops == 1):
            raise ValueError(f"build_layout: image {i} has {len(im.crop_views)} crop views for a "
                             f"{im.grid_w}x{im.grid_h} grid, expected {n_crops} (and no crops for a 1x1 grid)")
        if not im.crop_views and n_crops != 1:
            raise ValueError(f"build_layout: image {i} has a {im.grid_w}x{im.grid_h} grid but no crop views")
        rows = []
        if im.crop_views:
            qi = q[im.crop_views[0]]
            if any(q[v] != qi for v in im.crop_views):
                raise ValueError(f"build_layout: image {i} crops have q={[q[v] for v in im.crop_views]}, "
                                 f"expected one size")
            tiles = [view_tokens(v) for v in im.crop_views]
            # Tile c = ty*gw + tx; a grid row is the concatenation of its tiles' rows.
            clip_grid = np.concatenate([np.concatenate([tiles[ty * im.grid_w + tx][0] for tx in range(im.grid_w)],
                                                       axis=1) for ty in range(im.grid_h)], axis=0)  # [gh*qi, gw*qi]
            sam_grid = np.concatenate([np.concatenate([tiles[ty * im.grid_w + tx][1] for tx in range(im.grid_w)],
                                                      axis=1) for ty in range(im.grid_h)], axis=0)   # [gh*qi, gw*qi]
            rows.append(with_newlines(clip_grid, sam_grid))
        rows.append(with_newlines(*view_tokens(im.global_view)))
        rows.append(np.array([[SEPARATOR, -1]], dtype=np.int64))
        rows = np.concatenate(rows)
        parts.append(rows)
        offsets.append(offsets[-1] + rows.shape[0])

    row_map = np.concatenate(parts) if parts else np.empty((0, 2), dtype=np.int64)
    if row_map.size and row_map.max() >= 2**31:
        raise ValueError(f"build_layout: source row {int(row_map.max())} does not fit int32")
    return Layout(
        row_map=torch.from_numpy(row_map.astype(np.int32)).to(device),
        out_offsets=torch.tensor(offsets, dtype=torch.int64, device=device),
        clip_rows=int(row_map[:, 0].max()) + 1 if row_map.size else 0,
        sam_rows=int(row_map[:, 1].max()) + 1 if row_map.size else 0,
    )


@triton.jit
def _project_layout_kernel(
    sam_ptr, clip_ptr, w_ptr, b_ptr, newline_ptr, sep_ptr, map_ptr, out_ptr,
    T_out, stride_sm, stride_cm, stride_wn, stride_om,
    N: tl.constexpr, K_CLIP: tl.constexpr, K_SAM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
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
    acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]

    # Embedding rows: an exact round trip through fp32, so they are stored bit for bit.
    newline = tl.load(newline_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    sep = tl.load(sep_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    emb = tl.where((clip_row == _NEWLINE)[:, None], newline[None, :], sep[None, :])
    out = tl.where(is_token[:, None], acc, emb)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _blocks(T_out):
    # N = 1280 gives only 10 column tiles and a batch has hundreds to a few thousand output rows, so small
    # row tiles keep the SMs busy; big batches take 128-row tiles for twice the reuse of each weight tile.
    # BLOCK_K = 64 keeps the 3-stage pipeline's smem at 48-96 KB (fits sm_80 and sm_90); 8 warps keep the
    # gathered-row pointers and the fp32 accumulator under ~210 registers (4 warps spill at 128 rows).
    BLOCK_M = 128 if T_out >= 4096 else 64
    return BLOCK_M, 128, 64, 8


def project_and_layout(sam, clip, weight, bias, newline, separator, layout, out=None, blocks=None):
    """out [T_out, N]: projected tokens and newline/separator rows placed by `layout` (from build_layout).

    sam [T_sam, K_sam], clip [T_clip, K_clip] (packed token-major, rows may be strided), weight [N, K_clip+K_sam]
    (nn.Linear weight: CLIP columns first), bias / newline / separator [N]; all one dtype and device.
    `out`: optional preallocated [T_out, N] output (rows may be strided).
    `blocks` = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) overrides the heuristic (small blocks for the interpreter).
    """
    if not isinstance(layout, Layout):
        raise ValueError(f"project_and_layout: layout must be a Layout from build_layout, got {type(layout)}")
    for name, t in (("sam", sam), ("clip", clip), ("weight", weight)):
        if t.dim() != 2:
            raise ValueError(f"project_and_layout: {name} must be 2-D, got shape {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"project_and_layout: {name} must be contiguous along its last dim (row stride is "
                             f"fine), got strides {t.stride()}")
    dtype, device = sam.dtype, sam.device
    if dtype not in _DTYPES:
        raise ValueError(f"project_and_layout: sam has dtype {dtype}, expected one of {_DTYPES}")
    N, K = weight.shape
    K_clip, K_sam = clip.shape[1], sam.shape[1]
    if K != K_clip + K_sam:
        raise ValueError(f"project_and_layout: weight has {K} input features, expected {K_clip} (clip) + "
                         f"{K_sam} (sam) = {K_clip + K_sam}")
    for name, t in (("bias", bias), ("newline", newline), ("separator", separator)):
        if t.shape != (N,):
            raise ValueError(f"project_and_layout: {name} has shape {tuple(t.shape)}, expected ({N},)")
    for name, t in (("clip", clip), ("weight", weight), ("bias", bias), ("newline", newline),
                    ("separator", separator)):
        if t.dtype != dtype:
            raise ValueError(f"project_and_layout: {name} has dtype {t.dtype}, expected {dtype} (the dtype of sam)")
    for name, t in (("clip", clip), ("weight", weight), ("bias", bias), ("newline", newline),
                    ("separator", separator), ("layout.row_map", layout.row_map)):
        if t.device != device:
            raise ValueError(f"project_and_layout: {name} is on {t.device}, expected {device} (the device of sam)")
    row_map = layout.row_map
    if row_map.dtype != torch.int32 or row_map.dim() != 2 or row_map.shape[1] != 2 or not row_map.is_contiguous():
        raise ValueError(f"project_and_layout: layout.row_map must be contiguous int32 [T_out, 2], got "
                         f"{row_map.dtype} {tuple(row_map.shape)}")
    if layout.clip_rows > clip.shape[0]:
        raise ValueError(f"project_and_layout: layout reads CLIP rows up to {layout.clip_rows - 1}, clip has "
                         f"{clip.shape[0]} rows")
    if layout.sam_rows > sam.shape[0]:
        raise ValueError(f"project_and_layout: layout reads SAM rows up to {layout.sam_rows - 1}, sam has "
                         f"{sam.shape[0]} rows")
    bias, newline, separator = bias.contiguous(), newline.contiguous(), separator.contiguous()

    T_out = row_map.shape[0]
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps = blocks or _blocks(T_out)
    if any(b < 16 or b & (b - 1) for b in (BLOCK_M, BLOCK_N, BLOCK_K)):
        raise ValueError(f"project_and_layout: blocks {(BLOCK_M, BLOCK_N, BLOCK_K)}, expected powers of two >= 16 "
                         f"(tl.dot's minimum)")
    if out is None:
        out = torch.empty((T_out, N), dtype=dtype, device=device)
    elif out.shape != (T_out, N) or out.dtype != dtype or out.device != device or (N > 1 and out.stride(1) != 1):
        raise ValueError(f"project_and_layout: out is {out.dtype} {tuple(out.shape)} on {out.device} with strides "
                         f"{out.stride()}, expected {dtype} ({T_out}, {N}) on {device} with unit column stride")
    if T_out == 0:
        return out
    grid = (triton.cdiv(T_out, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _project_layout_kernel[grid](
        sam, clip, weight, bias, newline, separator, row_map, out,
        T_out, sam.stride(0), clip.stride(0), weight.stride(0), out.stride(0),
        N=N, K_CLIP=K_clip, K_SAM=K_sam, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        # fp32 inputs: exact products, not TF32 (fp16/bf16 ignore it).
        INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32", num_warps=num_warps,
    )
    return out


def project_and_layout_reference(sam, clip, weight, bias, newline, separator, images, sam_off, clip_off, q):
    """The torch path: per view, cat + linear, then the vendor's grid assembly with newlines and separators."""
    def project(v):  # [q, q, N]
        n = q[v] * q[v]
        clip_tokens = clip[clip_off[v] + 1: clip_off[v] + 1 + n]   # skip the class token
        sam_tokens = sam[sam_off[v]: sam_off[v] + n]
        y = torch.nn.functional.linear(torch.cat([clip_tokens, sam_tokens], dim=-1), weight, bias)
        return y.view(q[v], q[v], -1)

    def add_newlines(grid):  # [R, W, N] -> [R * (W + 1), N]
        R, _, N = grid.shape
        return torch.cat([grid, newline.view(1, 1, N).expand(R, 1, N)], dim=1).view(-1, N)

    out = []
    for im in images:
        if im.crop_views:
            crops = torch.stack([project(v) for v in im.crop_views])           # [gh*gw, qi, qi, N]
            _, qi, _, N = crops.shape
            crops = crops.view(im.grid_h, im.grid_w, qi, qi, N)
            local = crops.permute(0, 2, 1, 3, 4).reshape(im.grid_h * qi, im.grid_w * qi, N)
            out.append(add_newlines(local))
        out.append(add_newlines(project(im.global_view)))
        out.append(separator.view(1, -1))
    return torch.cat(out)


def _config(dtype, T_out):
    BLOCK_M, BLOCK_N, BLOCK_K, num_warps = _blocks(T_out)
    p = f"*{dtype}"
    return dict(
        kernel=_project_layout_kernel,
        signature=dict(sam_ptr=p, clip_ptr=p, w_ptr=p, b_ptr=p, newline_ptr=p, sep_ptr=p, map_ptr="*i32", out_ptr=p,
                       T_out="i32", stride_sm="i32", stride_cm="i32", stride_wn="i32", stride_om="i32",
                       N="constexpr", K_CLIP="constexpr", K_SAM="constexpr", BLOCK_M="constexpr",
                       BLOCK_N="constexpr", BLOCK_K="constexpr", INPUT_PRECISION="constexpr"),
        constexprs=dict(N=1280, K_CLIP=1024, K_SAM=1024, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                        INPUT_PRECISION="tf32"),
        # What the JIT specializes for 16-byte aligned tensors with row strides that are multiples of 16.
        attrs={(i,): [["tt.divisibility", 16]] for i, name in enumerate(_project_layout_kernel.arg_names)
               if name.endswith("_ptr") or name.startswith("stride_")},
        num_warps=num_warps,
        name=f"project_and_layout_{dtype}_M{BLOCK_M}",
    )


# Production configs: the real projector (2048 -> 1280) at both row-tile sizes of the heuristic.
COMPILE_CONFIGS = [_config(dt, T_out) for dt in ("bf16", "fp16") for T_out in (893, 8192)]
