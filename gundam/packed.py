"""The Triton path's planning and top level: every view of every image in one packed pass.

Views are packed token-major: one [T, C] buffer holds all views (global views first, then all crops), each a
row-major g x g grid at an offset. Token-wise ops (LayerNorm or RMSNorm with the residual add fused in, the
linears, GELU or SiLU-and-multiply) run once per layer over the whole buffer, whatever the number of images and
crops; attention runs once per layer over a segment table (every window, or every whole view); convolutions
run once per view size. The projector and the layout (newline and separator rows) are one kernel writing
straight into the packed output. Each block's packed forward sits beside its torch forward in gundam.model
(`forward_packed`); this module holds the plan and `encode_packed`, the counterpart of gundam.model's `encode`.

Both families share SAM's plan. DeepSeek-OCR's CLIP buffer holds per view its class token then the q x q grid;
DeepSeek-OCR 2's Qwen2 buffer holds per view its m = q*q visual tokens then m learned queries (a prefix-segment
table), and only the query rows reach the projector.

Everything the pass needs to know about the batch's shape (view offsets, segment tables, the output row map)
is a function of its signature (each image's grid and the view sizes) and is built once per signature.

The linears stay on torch (cuBLAS): at these shapes ([T, 768] x [768, 2304] and up) they run near the
tensor-core peak, and their bias/GELU epilogues are a few percent of the time.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from gundam.config import PATCH_SIZE
from gundam.kernels import prefix_segments, segments
from gundam.layout import ImageLayout, grid_layout, layout_batch


@dataclass(frozen=True)
class Plan:
    """Host-built facts of one packed pass; views are in pass order (global views, then crops)."""
    seg_window: object          # SegmentTable: every window of every view (SAM window blocks)
    seg_global: object          # SegmentTable: every whole view (SAM global blocks)
    row_map: object             # RowMap of the output rows: (CLIP or query row, SAM row) per token
    seg_clip: object = None     # SegmentTable: every view with its class token (CLIP; DeepSeek-OCR)
    seg_prefix: object = None   # PrefixSegments: every view's visual tokens and queries (Qwen2; DeepSeek-OCR 2)
    query_rows: object = None   # int64 [sum of m] on the device: the Qwen2 buffer's query rows, view by view


@functools.lru_cache(maxsize=64)
def make_plan(layouts: tuple[ImageLayout, ...], window: int, device: torch.device) -> Plan:
    mode = layouts[0].mode
    # (patch grid, output grid) per view: global views first, then every crop in image and tile order
    sizes = [(mode.base_size // PATCH_SIZE, layouts[0].qb)] * len(layouts)
    sizes += [(mode.image_size // PATCH_SIZE, layouts[0].qi)] * sum(l.n_crops for l in layouts)

    def pack(sides, extra=0, per_token=1):  # square views one after another: extra + per_token * n * n tokens each
        offsets = itertools.accumulate([extra + per_token * n * n for n in sides], initial=0)
        return [segments.View(off, n, n) for off, n in zip(offsets, sides)]

    sam_views = pack([g for g, _ in sizes])                 # SAM blocks' token grids
    out_views = pack([q for _, q in sizes])                 # SAM's output grids, token-major
    ocr2 = mode.family == "deepseek-ocr2"
    # the projector's first source: CLIP's buffer (class token, then the q x q grid) or the query rows that
    # Qwen2 keeps (m = q*q per view, packed view after view: out_views' offsets)
    src_views = out_views if ocr2 else pack([q for _, q in sizes], extra=1)
    src_first = 0 if ocr2 else 1

    # Row map: the one torch layout, run on (source row, SAM row) index pairs instead of embeddings.
    def index_rows(v):  # [q*q, 2]
        t = torch.arange(out_views[v].h * out_views[v].w)
        return torch.stack([src_views[v].offset + src_first + t, out_views[v].offset + t], dim=1)

    n, crops = len(layouts), len(sizes) - len(layouts)
    glob = torch.stack([index_rows(v) for v in range(n)])                             # [n, qb*qb, 2]
    local = torch.stack([index_rows(v) for v in range(n, n + crops)]) if crops else None
    rows = layout_batch(layouts, glob, local, torch.tensor([segments.NEWLINE, -1]),
                        torch.tensor([segments.SEPARATOR, -1]))
    common = dict(seg_window=segments.build_segments(sam_views, window, device=device),
                  seg_global=segments.build_segments(sam_views, None, device=device),
                  row_map=segments.RowMap.from_host(rows, device=device))
    if not ocr2:
        return Plan(seg_clip=segments.build_segments(src_views, class_token=True, device=device), **common)
    m = [q * q for _, q in sizes]
    seg = prefix_segments.build_prefix_segments(m, device=device)
    query_rows = torch.cat([torch.arange(off + mv, off + 2 * mv) for off, mv in zip(seg.offsets, m)])
    return Plan(seg_prefix=seg, query_rows=query_rows.to(device), **common)


def signature(batch) -> tuple[ImageLayout, ...]:
    """What the packed pass's shapes depend on: each image's layout, without the image's own size."""
    return tuple(grid_layout(lay.mode, lay.grid) for lay in batch.layouts)


def encode_packed(enc, batch, timer) -> torch.Tensor:
    """The Triton path: Batch -> embeddings [total_tokens, n_embed], every view of every image in one packed
    pass through SAM and CLIP or Qwen2 (each block's `forward_packed`, gundam.model), then the projector writing
    every output row in place from the plan's row map (built by `layout_batch`, as the torch path lays out)."""
    plan = make_plan(signature(batch), enc.config.sam.window_size, enc.device)
    groups = enc.pixel_groups(batch)                         # global views [n, 3, B, B], then crops if any
    sam_out = enc.sam_model.forward_packed(groups, plan)      # [B, C, q, q] per group
    timer.mark("sam")
    dt = enc.dtype
    if enc.family == "deepseek-ocr2":
        queries = enc.qwen2_model.forward_packed(sam_out, plan)     # [sum of m, C]: the kept query rows
        timer.mark("qwen2")
        out = enc.projector.forward_packed(None, queries, None, enc.view_seperator.to(dt), plan.row_map)
    else:
        clip_tok = enc.vision_model.forward_packed(sam_out, plan)   # [T_clip, C]
        timer.mark("clip")
        # SAM tokens token-major, views in the same order as CLIP's
        sam_tok = torch.cat([s.flatten(2).transpose(1, 2).reshape(-1, s.shape[1]) for s in sam_out])  # [T, C]
        out = enc.projector.forward_packed(sam_tok, clip_tok, enc.image_newline.to(dt), enc.view_seperator.to(dt),
                                           plan.row_map)
    timer.mark("layout")
    return out
