"""The Triton path: every view of every image in one packed pass through SAM, CLIP and the projector.

Views are packed token-major: one [T, C] buffer holds all views (global views first, then all crops), each a
row-major g x g grid at an offset. Token-wise ops (LayerNorm with the residual add fused in, the linears,
GELU) run once per layer over the whole buffer, whatever the number of images and crops; attention runs once
per layer over a segment table (every window, or every whole view); convolutions run once per view size.
The projector and the newline/separator layout are one kernel writing straight into the packed output.

The linears stay on torch (cuBLAS): at these shapes ([T, 768] x [768, 2304] and up) they run near the
tensor-core peak, and their bias/GELU epilogues are a few percent of the time.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from gundam.model import quick_gelu, resize_clip_pos, resize_rel_pos


def check_triton_available(device: torch.device):
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' on device {device.type!r} needs Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 in the environment before Python starts (or use backend='torch')")


def _kernels():
    # imported late: TRITON_INTERPRET must be set before triton is first imported
    from gundam.kernels import attention as attn
    from gundam.kernels import layernorm, layout
    return attn, layernorm.layer_norm, layout


def sam_packed(sam, groups):
    """groups: list of [B, 3, S, S] pixel batches (one per view size) -> list of [B, 1024, q, q]."""
    attn, layer_norm, _ = _kernels()
    cfg = sam.cfg
    C, nh = cfg.embed_dim, cfg.num_heads
    # patch embedding per size, then one token-major buffer [T, C]
    xs, views, shapes, off = [], [], [], 0
    for pixels in groups:
        x = sam.patch_embed(pixels)                                     # [B, g, g, C]
        B, g = x.shape[0], x.shape[1]
        xs.append((x + sam.pos_embed_for(g)).reshape(B * g * g, C))
        views += [(off + b * g * g, g, g) for b in range(B)]
        shapes.append((B, g))
        off += B * g * g
    x = torch.cat(xs)                                                   # [T, C]
    T, dev = x.shape[0], x.device
    seg_window = attn.build_segments(views, cfg.window_size, device=dev)
    seg_global = attn.build_segments(views, None, device=dev)

    mlp_out = None
    for blk in sam.blocks:
        a = blk.attn
        if mlp_out is None:
            h = layer_norm(x, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
        else:
            h, x = layer_norm(mlp_out, blk.norm1.weight, blk.norm1.bias, blk.norm1.eps, residual=x)
        qkv = F.linear(h, a.qkv.weight, a.qkv.bias).view(T, 3, nh, C // nh)
        if blk.window_size:
            seg = seg_window
            rh, rw = resize_rel_pos(a.rel_pos_h, blk.window_size), resize_rel_pos(a.rel_pos_w, blk.window_size)
        else:
            seg = seg_global
            rh = attn.pack_rel_pos([_rel(sam, a.rel_pos_h, s) for s in seg.rel_sizes_h], seg.rel_sizes_h)
            rw = attn.pack_rel_pos([_rel(sam, a.rel_pos_w, s) for s in seg.rel_sizes_w], seg.rel_sizes_w)
        o = attn.attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=a.qkv.bias)   # [T, C]
        o = F.linear(o, a.proj.weight, a.proj.bias)
        h, x = layer_norm(o, blk.norm2.weight, blk.norm2.bias, blk.norm2.eps, residual=x)
        # GELU in place: the [T, 4C] hidden state is the largest activation of the packed pass
        mlp_out = blk.mlp.lin2(torch.ops.aten.gelu_(blk.mlp.lin1(h)))
    x = x + mlp_out

    outs, off = [], 0
    for B, g in shapes:
        grid = x[off:off + B * g * g].view(B, g, g, C).permute(0, 3, 1, 2)   # [B, C, g, g]
        outs.append(sam.net_3(sam.net_2(sam.neck(grid))))                  # [B, 1024, g/4, g/4]
        off += B * g * g
    return outs


def _rel(sam, table, size):
    return sam._cache.get(table, ("packed", size), lambda: resize_rel_pos(table, size))


def clip_packed(clip, sam_outs):
    """list of SAM outputs [B, 1024, q, q] -> packed CLIP tokens [T, 1024] (per view: class token + q*q),
    and the per-view (offset, q, q)."""
    attn, layer_norm, _ = _kernels()
    cfg = clip.cfg
    nh, C = cfg.num_attention_heads, cfg.hidden_size
    xs, views, off = [], [], 0
    for s in sam_outs:
        x = clip.embeddings(s)                                          # [B, 1 + q*q, C]
        B, n = x.shape[:2]
        q = s.shape[-1]
        xs.append(x.reshape(B * n, C))
        views += [(off + b * n, q, q) for b in range(B)]
        off += B * n
    x = torch.cat(xs)                                                   # [T, C]
    T = x.shape[0]
    seg = attn.build_segments(views, class_token=True, device=x.device)
    x = layer_norm(x, clip.pre_layrnorm.weight, clip.pre_layrnorm.bias, clip.pre_layrnorm.eps)
    mlp_out = None
    for layer in clip.transformer.layers:
        ln1, ln2, sa = layer.layer_norm1, layer.layer_norm2, layer.self_attn
        if mlp_out is None:
            h = layer_norm(x, ln1.weight, ln1.bias, ln1.eps)
        else:
            h, x = layer_norm(mlp_out, ln1.weight, ln1.bias, ln1.eps, residual=x)
        qkv = F.linear(h, sa.qkv_proj.weight, sa.qkv_proj.bias).view(T, 3, nh, C // nh)
        o = F.linear(attn.attention(qkv, seg), sa.out_proj.weight, sa.out_proj.bias)
        h, x = layer_norm(o, ln2.weight, ln2.bias, ln2.eps, residual=x)
        mlp_out = layer.mlp.fc2(quick_gelu(layer.mlp.fc1(h)))
    return x + mlp_out, views


def encode_packed(enc, batch):
    """Batch -> (embeddings [total_tokens, n_embed], offsets [n_images + 1]) through the Triton kernels."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in enc.parameters()):
        raise RuntimeError("backend='triton' is inference-only (its kernels have no backward): call it under "
                           "torch.no_grad() or torch.inference_mode(), or use backend='torch' to train")
    _, _, layout = _kernels()
    dev, dt = enc.device, enc.dtype
    groups = [batch.global_views.to(dev, dt)]
    if batch.crops.shape[0]:
        groups.append(batch.crops.to(dev, dt))
    sam_outs = sam_packed(enc.sam_model, groups)
    clip_tok, clip_views = clip_packed(enc.vision_model, sam_outs)
    # SAM tokens token-major, views in the same order as CLIP's
    sam_tok = torch.cat([s.flatten(2).transpose(1, 2).reshape(-1, s.shape[1]) for s in sam_outs])  # [T, 1024]
    q = [v[1] for v in clip_views]
    sam_off = [0]
    for qv in q[:-1]:
        sam_off.append(sam_off[-1] + qv * qv)
    images, crop = [], batch.n_images                     # crops follow the global views in view order
    for i, lay in enumerate(batch.layouts):
        crops = tuple(range(crop, crop + lay.n_crops))
        crop += lay.n_crops
        images.append(layout.ImageViews(global_view=i, grid_w=lay.grid[0], grid_h=lay.grid[1], crop_views=crops))
    plan = layout.build_layout(images, sam_off, [v[0] for v in clip_views], q, device=dev)
    p = enc.projector.layers
    out = layout.project_and_layout(sam_tok, clip_tok, p.weight, p.bias, enc.image_newline.to(dt),
                                    enc.view_seperator.to(dt), plan)
    return out, plan.out_offsets.cpu()
