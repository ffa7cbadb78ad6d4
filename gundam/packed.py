"""The Triton path: every view of every image in one packed pass through SAM, CLIP and the projector.

Views are packed token-major: one [T, C] buffer holds all views (global views first, then all crops), each a
row-major g x g grid at an offset. Token-wise ops (LayerNorm with the residual add fused in, the linears,
GELU) run once per layer over the whole buffer, whatever the number of images and crops; attention runs once
per layer over a segment table (every window, or every whole view); convolutions run once per view size.
The projector and the newline/separator layout are one kernel writing straight into the packed output.

Everything the pass needs to know about the batch's shape (view offsets, segment tables, the output row map)
is a function of its signature (each image's grid and the view sizes) and is built once per signature.

The linears stay on torch (cuBLAS): at these shapes ([T, 768] x [768, 2304] and up) they run near the
tensor-core peak, and their bias/GELU epilogues are a few percent of the time.
"""
from __future__ import annotations

import functools
import itertools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gundam.layout import ImageLayout, grid_layout, layout_tokens
from gundam.model import quick_gelu, run_block


def check_triton_available(device: torch.device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' on device {device.type!r} needs Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 in the environment before Python starts (or use backend='torch')")


def _kernels():
    """gundam.kernels with its modules loaded, imported late: TRITON_INTERPRET must be set before triton is
    first imported, and `import gundam` does not import triton."""
    import gundam.kernels.activation, gundam.kernels.attention, gundam.kernels.layernorm, gundam.kernels.layout  # noqa: E401,F401
    import gundam.kernels.segments  # noqa: F401
    return gundam.kernels


@dataclass(frozen=True)
class Plan:
    """Host-built facts of one packed pass; views are in pass order (global views, then crops)."""
    seg_window: object          # SegmentTable: every window of every view (SAM window blocks)
    seg_global: object          # SegmentTable: every whole view (SAM global blocks)
    seg_clip: object            # SegmentTable: every view with its class token (CLIP)
    row_map: object             # RowMap of the output rows


@functools.lru_cache(maxsize=64)
def make_plan(layouts: tuple[ImageLayout, ...], patch_size: int, window: int, device: torch.device) -> Plan:
    K = _kernels()
    mode = layouts[0].mode
    # (patch grid, output grid) per view: global views first, then every crop in image and tile order
    sizes = [(mode.base_size // patch_size, layouts[0].qb)] * len(layouts)
    sizes += [(mode.image_size // patch_size, layouts[0].qi)] * sum(l.n_crops for l in layouts)

    def pack(sides, class_token=0):  # square views one after another in a packed buffer
        offsets = itertools.accumulate([class_token + n * n for n in sides], initial=0)
        return [K.segments.View(off, n, n) for off, n in zip(offsets, sides)]

    sam_views = pack([g for g, _ in sizes])                 # SAM blocks' token grids
    clip_views = pack([q for _, q in sizes], class_token=1)  # CLIP: class token, then the q x q grid
    out_views = pack([q for _, q in sizes])                 # SAM's output grids, token-major

    # Row map: the one torch layout, run on (CLIP row, SAM row) index pairs instead of embeddings.
    def index_rows(v):  # [q*q, 2]
        t = torch.arange(out_views[v].h * out_views[v].w)
        return torch.stack([clip_views[v].offset + 1 + t, out_views[v].offset + t], dim=1)

    newline = torch.tensor([K.segments.NEWLINE, -1])
    separator = torch.tensor([K.segments.SEPARATOR, -1])
    rows, crop = [], len(layouts)
    for i, lay in enumerate(layouts):
        local = torch.stack([index_rows(v) for v in range(crop, crop + lay.n_crops)]) if lay.n_crops else None
        crop += lay.n_crops
        rows.append(layout_tokens(lay, index_rows(i), local, newline, separator))
    return Plan(
        seg_window=K.segments.build_segments(sam_views, window, device=device),
        seg_global=K.segments.build_segments(sam_views, None, device=device),
        seg_clip=K.segments.build_segments(clip_views, class_token=True, device=device),
        row_map=K.segments.RowMap.from_host(torch.cat(rows), device=device),
    )


def signature(batch) -> tuple[ImageLayout, ...]:
    """What the packed pass's shapes depend on: each image's layout, without the image's own size."""
    return tuple(grid_layout(lay.mode, lay.grid) for lay in batch.layouts)


def _add_norm(norm, x, y):
    """LayerNorm of the residual stream x + y, the add fused into the kernel: (normalised, x + y); y None (before
    the first block, whose stream is x alone): (normalised x, x)."""
    K = _kernels()
    if y is None:
        return K.layernorm.layer_norm(x, norm.weight, norm.bias, norm.eps), x
    return K.layernorm.layer_norm(y, norm.weight, norm.bias, norm.eps, residual=x)


def sam_block(blk, plan: Plan, x, mlp_out):
    """One SAM block on the packed stream: (x, mlp_out) -> (x, mlp_out), where the residual stream is x + mlp_out
    (the add is fused into the next LayerNorm); mlp_out is None before the first block."""
    K = _kernels()
    T, C = x.shape
    a = blk.attn
    nh = a.num_heads
    h, x = _add_norm(blk.norm1, x, mlp_out)
    qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(T, 3, nh, C // nh)
    seg = plan.seg_window if blk.window_size else plan.seg_global
    rh = K.segments.pack_rel_pos([a.rel_pos_h_for(s) for s in seg.rel_sizes_h], seg.rel_sizes_h)
    rw = K.segments.pack_rel_pos([a.rel_pos_w_for(s) for s in seg.rel_sizes_w], seg.rel_sizes_w)
    o = K.attention.attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=a.qkv.bias)   # [T, C]
    o = F.linear(o, a.proj.weight, a.proj.bias)
    h, x = _add_norm(blk.norm2, x, o)
    # GELU in place for inference: the [T, 4C] hidden state is the largest activation of the packed pass;
    # out of place while autograd records it (its backward needs the input)
    hidden = blk.mlp.lin1(h)
    hidden = F.gelu(hidden) if hidden.requires_grad else torch.ops.aten.gelu_(hidden)
    return x, blk.mlp.lin2(hidden)


def sam_packed(sam, groups, plan: Plan, timer):
    """groups: list of [B, 3, S, S] pixel batches (one per view size, in plan order) -> list of
    [B, net_3_chans, q, q]."""
    cfg = sam.cfg
    C = cfg.embed_dim
    # patch embedding per size, then one token-major buffer [T, C]
    xs = []
    for pixels in groups:
        x = sam.patch_embed(pixels)                                     # [B, g, g, C]
        B, g = x.shape[0], x.shape[1]
        xs.append((x + sam.pos_embed_for(g)).reshape(B * g * g, C))
    x = torch.cat(xs)                                                   # [T, C]

    mlp_out = None
    for blk in sam.blocks:
        x, mlp_out = run_block(functools.partial(sam_block, blk, plan), x, mlp_out,
                               checkpointing=sam.gradient_checkpointing)
    x = x + mlp_out

    outs, off = [], 0
    for pixels in groups:
        B, g = pixels.shape[0], pixels.shape[-1] // cfg.patch_size
        grid = x[off:off + B * g * g].view(B, g, g, C).permute(0, 3, 1, 2)   # [B, C, g, g]
        outs.append(sam.net_3(sam.net_2(sam.neck(grid))))                  # [B, net_3_chans, g/4, g/4]
        off += B * g * g
    timer.mark("sam")
    return outs


def clip_layer(layer, plan: Plan, x, mlp_out):
    """One CLIP layer on the packed stream, (x, mlp_out) -> (x, mlp_out) as `sam_block`."""
    K = _kernels()
    T, C = x.shape
    sa = layer.self_attn
    nh = sa.num_heads
    h, x = _add_norm(layer.layer_norm1, x, mlp_out)
    qkv = F.linear(h, sa.qkv_proj.weight, sa.qkv_proj.bias).view(T, 3, nh, C // nh)
    o = F.linear(K.attention.attention(qkv, plan.seg_clip), sa.out_proj.weight, sa.out_proj.bias)
    h, x = _add_norm(layer.layer_norm2, x, o)
    hidden = layer.mlp.fc1(h)
    # inference: one in-place pass, not three; while autograd records: the torch path's quick_gelu
    hidden = quick_gelu(hidden) if hidden.requires_grad else K.activation.quick_gelu_(hidden)
    return x, layer.mlp.fc2(hidden)


def clip_packed(clip, sam_outs, plan: Plan, timer):
    """list of SAM outputs [B, C, q, q] -> packed CLIP tokens [T, C] (per view: class token + q*q)."""
    K = _kernels()
    x = torch.cat([clip.embeddings(s).flatten(0, 1) for s in sam_outs])  # [B, 1 + q*q, C] each -> [T, C]
    x = K.layernorm.layer_norm(x, clip.pre_layrnorm.weight, clip.pre_layrnorm.bias, clip.pre_layrnorm.eps)
    mlp_out = None
    for layer in clip.transformer.layers:
        x, mlp_out = run_block(functools.partial(clip_layer, layer, plan), x, mlp_out,
                               checkpointing=clip.transformer.gradient_checkpointing)
    x = x + mlp_out
    timer.mark("clip")
    return x


def encode_packed(enc, batch, timer) -> torch.Tensor:
    """Batch -> embeddings [total_tokens, n_embed] through the Triton kernels."""
    K = _kernels()
    dev, dt = enc.device, enc.dtype
    plan = make_plan(signature(batch), enc.config.sam.patch_size, enc.config.sam.window_size, dev)
    groups = [enc.pixels(batch.global_views)]
    if batch.crops.shape[0]:
        groups.append(enc.pixels(batch.crops))
    sam_outs = sam_packed(enc.sam_model, groups, plan, timer)
    clip_tok = clip_packed(enc.vision_model, sam_outs, plan, timer)
    # SAM tokens token-major, views in the same order as CLIP's
    sam_tok = torch.cat([s.flatten(2).transpose(1, 2).reshape(-1, s.shape[1]) for s in sam_outs])  # [T, C]
    p = enc.projector.layers
    out = K.layout.project_and_layout(sam_tok, clip_tok, p.weight, p.bias, enc.image_newline.to(dt),
                                           enc.view_seperator.to(dt), plan.row_map)
    timer.mark("layout")
    return out
