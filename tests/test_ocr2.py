"""DeepSeek-OCR 2's encoder (DeepEncoder V2, mode "ocr2", `Ocr2Config`), checked against independent
restatements of the vendor's rules (deepseek-ai/DeepSeek-OCR-2, DeepSeek-OCR2-master/DeepSeek-OCR2-vllm):

- crop grids and token counts: the vendor's closest-aspect-ratio rule restated with exact fractions (2..6
  tiles, 768 px crops, no crops when both sides are <= 768), on thousands of sizes and every tie midpoint;
- preprocessing: pixel-exact against views built here with PIL and numpy, in several PIL modes;
- the torch path: against a plain float64 reference of the Qwen2 encoder written here from the formula
  (explicit RoPE, an explicit [2m, 2m] additive mask, explicit kv-head repeat, softmax, RMSNorm with fp32
  statistics as transformers computes them), on top of the encoder's own SAM (shared with DeepSeek-OCR and
  verified there), and the output layout (crops' queries crop by crop, global queries, separator);
- the prefix mask's property: visual tokens never see the queries, query i never sees queries after it;
- checkpoints (OCR-2 keys, hostile ones), forward_vendor's two layouts, training.

The opt-in check against the vendor's own modules is tests/test_ocr2_vendor.py.
"""
import copy
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file

from gundam import MODES, GundamEncoder, Ocr2Config, count_image_tokens, crop_grid, preprocess
from gundam.config import Qwen2Config
from gundam.images import image_views, normalize
from gundam.layout import grid_layout, has_newlines, image_layout
from gundam import model as M
from gundam.model import Qwen2Stack, prefix_mask
from gundam.weights import checked_config, checkpoint_family
from testutils import (EDGE_SIZES, GRIDS, OCR2_TINY, OCR2_TINY_MODE, TINY, TINY_MODE, assert_close, in_mode,
                       midpoint_sizes, page, randomize)

OCR2 = MODES["ocr2"]


# ----------------------------------------------------------------------------------------------------------
# crop grids and token counts

def vendor_rule_grid(width, height, image_size=768, small_image=768):
    """The vendor's grid rule restated: no crops when both sides are <= 768; else the grid whose w/h is
    exactly nearest width/height. A point is equally near at most two grids (every allowed grid has its own
    ratio): then the vendor's loop, in order of tile count, keeps the one its floats find nearer, and on equal
    floats the later (more tiles) if width*height > 0.5 * image_size^2 * its tiles."""
    if width <= small_image and height <= small_image:
        return (1, 1)
    aspect = Fraction(width, height)
    dist = {g: abs(aspect - Fraction(g[0], g[1])) for g in GRIDS}
    best = min(dist.values())
    tied = sorted((g for g in GRIDS if dist[g] == best), key=lambda g: g[0] * g[1])
    if len(tied) == 1:
        return tied[0]
    assert len(tied) == 2 and tied[0][0] * tied[0][1] != tied[1][0] * tied[1][1], tied
    first, later = tied
    f_first = abs(width / height - first[0] / first[1])
    f_later = abs(width / height - later[0] / later[1])
    if f_later < f_first or (f_later == f_first and width * height > 0.5 * image_size ** 2 * later[0] * later[1]):
        return later
    return first





def test_crop_grid_follows_the_vendors_rule():
    rng = random.Random(20260)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(4000)]
    sizes += [(rng.randint(700, 2400), rng.randint(700, 2400)) for _ in range(2000)]
    sizes += EDGE_SIZES + midpoint_sizes()
    outcomes = {"ties to the earlier grid": 0, "ties to the later grid": 0}
    for w, h in sizes:
        got = crop_grid(w, h, "ocr2")
        assert got == vendor_rule_grid(w, h), (w, h, got)
        tokens = 257 if got == (1, 1) else 257 + 144 * got[0] * got[1]
        assert count_image_tokens(w, h, "ocr2") == tokens, (w, h)
        if got == (1, 1):
            continue
        # the exact-nearest property on its own, and which way exact ties went
        dist = {g: abs(Fraction(w, h) - Fraction(*g)) for g in GRIDS}
        assert dist[got] == min(dist.values()) and 2 <= got[0] * got[1] <= 6, (w, h, got)
        tied = [g for g in GRIDS if dist[g] == dist[got]]
        if len(tied) == 2:
            later = max(tied, key=lambda g: g[0] * g[1])
            outcomes["ties to the later grid" if got == later else "ties to the earlier grid"] += 1
    assert all(outcomes.values()), f"the sweep must exercise both tie outcomes: {outcomes}"


@pytest.mark.parametrize("size,grid", [
    ((768, 768), (1, 1)), ((769, 768), (2, 2)), ((768, 769), (2, 2)), ((1, 5000), (1, 6)), ((5000, 1), (6, 1)),
    ((1, 769), (1, 6)), ((1536, 768), (2, 1)), ((1000, 800), (2, 2)), ((800, 1600), (1, 2)),
    ((2480, 3508), (2, 3)), ((700, 300), (1, 1)),
    ((1250, 1000), (2, 2)),    # aspect 5/4, exactly between 1 and 3/2; area 1.25M < 0.5 * 768^2 * 6
    ((2500, 2000), (3, 2)),    # the same aspect, area 5M: the later grid
    ((1500, 1800), (2, 2)),    # 5/6, exactly between 2/3 and 1: the vendor's floats find 1 nearer
])
def test_crop_grid_known(size, grid):
    assert crop_grid(*size, "ocr2") == grid
    assert crop_grid(*size, OCR2) == grid


@pytest.mark.parametrize("grid", GRIDS)
def test_token_counts_every_grid(grid):
    w, h = grid
    for size in [(768 * w, 768 * h), (768 * w + 1, 768 * h + 1), (100 * w + 1000, 100 * h + 1000 * h // w)]:
        assert crop_grid(*size, "ocr2") == grid, size
        lay = image_layout(*size, "ocr2")
        assert (lay.grid, lay.n_crops, lay.qb, lay.qi) == (grid, w * h, 16, 12)
        assert (lay.global_tokens, lay.local_tokens) == (256, 144 * w * h)
        assert count_image_tokens(*size, "ocr2") == lay.tokens == 256 + 144 * w * h + 1
    # at the tiny test size: 4x4 global queries, 3x3 per crop
    assert grid_layout(OCR2_TINY_MODE, grid).tokens == 16 + 9 * w * h + 1


def test_token_counts_without_crops():
    assert not has_newlines(OCR2)
    for size in [(768, 768), (1, 1), (500, 768), (768, 3), (123, 457)]:
        lay = image_layout(*size, "ocr2")
        assert (lay.grid, lay.n_crops, lay.local_tokens, lay.tokens) == ((1, 1), 0, 0, 257)
    assert grid_layout(OCR2_TINY_MODE, (1, 1)).tokens == 17
    assert Ocr2Config().mode == OCR2 and OCR2_TINY.mode == OCR2_TINY_MODE


# ----------------------------------------------------------------------------------------------------------
# preprocessing, pixel-exact

def as_rgb(img: Image.Image) -> Image.Image:
    """What the encoder sees: the vendor's convert("RGB"), except 16-bit grey, which is scaled to 8 bits
    (round(v / 257)) where PIL would clip it (gundam.images documents the difference)."""
    if img.mode == "I;16":
        return Image.fromarray(np.rint(np.asarray(img, dtype=np.float64) / 257).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def normalized(arr_hwc: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W]: ToTensor (/255) then Normalize(0.5, 0.5), in float32."""
    x = (arr_hwc.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def independent_views(img: Image.Image, grid, base_size: int, image_size: int):
    """(global view, crops) as uint8 [H, W, 3] arrays: resize to the grid with PIL's default filter and cut
    row-major with numpy; the global view padded to a square with grey 127 by ImageOps.pad."""
    rgb = as_rgb(img)
    crops = []
    if grid != (1, 1):
        w, h = grid
        big = np.asarray(rgb.resize((image_size * w, image_size * h)))
        assert big.shape == (image_size * h, image_size * w, 3)
        for i in range(w * h):
            r, c = divmod(i, w)    # tile i: row i // w, column i % w
            crops.append(big[r * image_size:(r + 1) * image_size, c * image_size:(c + 1) * image_size])
    glob = np.asarray(ImageOps.pad(rgb, (base_size, base_size), color=(127, 127, 127)))
    return glob, crops


@pytest.mark.parametrize("pil_mode,size", [
    ("RGB", (1000, 700)), ("RGB", (1, 5000)), ("RGBA", (769, 768)), ("L", (700, 1500)), ("P", (1300, 900)),
    ("I;16", (1600, 900)), ("CMYK", (333, 2000)), ("RGB", (768, 768)), ("L", (500, 300)),
])
def test_preprocess_pixel_exact(pil_mode, size):
    img = in_mode(page(*size, seed=size[0] + 7 * size[1], cell=13), pil_mode, seed=size[0])
    grid = vendor_rule_grid(*size)
    batch = preprocess(img, mode="ocr2")
    assert batch.mode == OCR2 and batch.grids == [grid] and batch.sizes == [size]
    glob, crops = independent_views(img, grid, 1024, 768)
    assert batch.global_views.dtype == torch.float32 and batch.global_views.shape == (1, 3, 1024, 1024)
    assert batch.crops.shape == (len(crops), 3, 768, 768)
    assert torch.equal(batch.global_views[0], normalized(glob)), "global view"
    for i, crop in enumerate(crops):
        assert torch.equal(batch.crops[i], normalized(crop)), f"crop {i} of grid {grid}"
    # the uint8 route (what data loaders move) is the same pixels before normalising
    g8, c8, lay = image_views(img, OCR2)
    assert lay == batch.layouts[0] and lay.tokens == (257 if grid == (1, 1) else 257 + 144 * grid[0] * grid[1])
    assert torch.equal(g8, torch.from_numpy(glob.transpose(2, 0, 1).copy()))
    assert torch.equal(normalize(g8), batch.global_views[0]) and torch.equal(normalize(c8), batch.crops)


def test_preprocess_tiny_mode_and_encoder_preprocess():
    """The tiny test mode has the same rules at 256/192 px (crops above 768 px); an encoder preprocesses in its
    own mode and refuses another family's."""
    imgs = [page(1000, 700, 1), page(500, 300, 2), in_mode(page(800, 1700, 3), "L", 3)]
    with torch.device("meta"):
        enc = GundamEncoder(OCR2_TINY)
    batch = enc.preprocess(imgs)
    assert batch.mode == OCR2_TINY_MODE and batch.grids == [(3, 2), (1, 1), (1, 2)]
    assert batch.tokens == [16 + 54 + 1, 17, 16 + 18 + 1]
    start = 0
    for i, (img, lay) in enumerate(zip(imgs, batch.layouts)):
        glob, crops = independent_views(img, lay.grid, 256, 192)
        assert torch.equal(batch.global_views[i], normalized(glob))
        for c, crop in enumerate(crops):
            assert torch.equal(batch.crops[start + c], normalized(crop))
        start += len(crops)
    with pytest.raises(ValueError, match="views of a deepseek-ocr mode .* for a deepseek-ocr2 encoder"):
        enc.preprocess(imgs, mode="gundam")
    with pytest.raises(ValueError, match="base_size=1024: this DeepSeek-OCR 2 encoder takes base_size=256"):
        enc.preprocess(imgs, mode="ocr2")


# ----------------------------------------------------------------------------------------------------------
# the torch path against an independent float64 reference

def rms_norm(x, weight, eps):
    """transformers' Qwen2RMSNorm: statistics in float32 (float64 for float64), cast back before the weight
    multiply."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_qwen2(P, visual, queries, cfg: Qwen2Config, mask="prefix"):
    """One view through the Qwen2 encoder, written from the formula: visual [m, C] (row-major SAM tokens),
    queries [m, C] -> the queries' final states [m, C]. mask="causal" is the plain causal mask (what the
    vendor's code silently runs on transformers >= 4.53), to show the tests tell the two apart."""
    m, C = visual.shape
    n, nh, nkv, d = 2 * m, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    dtype = visual.dtype
    h = torch.cat([visual, queries])                                             # [2m, C]
    # RoPE over the whole head, positions 0..2m-1, angles in float32 then cast (transformers' default RoPE)
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    angles = torch.arange(n).float()[:, None] * inv_freq[None, :]                # [n, d/2]
    cos = torch.cat([angles, angles], dim=-1).cos().to(dtype)
    sin = torch.cat([angles, angles], dim=-1).sin().to(dtype)

    def rope(t):                                                                  # t [heads, n, d]
        rotated = torch.cat([-t[..., d // 2:], t[..., :d // 2]], dim=-1)
        return t * cos + rotated * sin

    if mask == "causal":
        allowed = [[c <= r for c in range(n)] for r in range(n)]
    else:   # visual tokens see all visual tokens; query r sees every visual token and the queries up to r
        allowed = [[c < m or (r >= m and c <= r) for c in range(n)] for r in range(n)]
    bias = torch.where(torch.tensor(allowed), 0.0, -math.inf).to(dtype)        # [2m, 2m] additive
    group = nh // nkv
    for layer in range(cfg.num_hidden_layers):
        p = lambda name: P[f"qwen2_model.model.model.layers.{layer}.{name}"]   # noqa: E731
        t = rms_norm(h, p("input_layernorm.weight"), cfg.rms_norm_eps)
        q = (t @ p("self_attn.q_proj.weight").T + p("self_attn.q_proj.bias")).view(n, nh, d).transpose(0, 1)
        k = (t @ p("self_attn.k_proj.weight").T + p("self_attn.k_proj.bias")).view(n, nkv, d).transpose(0, 1)
        v = (t @ p("self_attn.v_proj.weight").T + p("self_attn.v_proj.bias")).view(n, nkv, d).transpose(0, 1)
        q, k = rope(q), rope(k)
        k = torch.stack([k[head // group] for head in range(nh)])               # query head h reads kv h // group
        v = torch.stack([v[head // group] for head in range(nh)])
        att = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + bias, dim=-1)   # [nh, n, n]
        h = h + (att @ v).transpose(0, 1).reshape(n, nh * d) @ p("self_attn.o_proj.weight").T
        t = rms_norm(h, p("post_attention_layernorm.weight"), cfg.rms_norm_eps)
        gate, up = t @ p("mlp.gate_proj.weight").T, t @ p("mlp.up_proj.weight").T
        h = h + (gate * torch.sigmoid(gate) * up) @ p("mlp.down_proj.weight").T
    return rms_norm(h, P["qwen2_model.model.model.norm.weight"], cfg.rms_norm_eps)[m:]


def sam_features(enc, batch):
    """Per image: ([C, q, q] of each crop, [C, Q, Q] of the global view), each view alone through SAM."""
    one = lambda pixels: enc.sam_model(pixels[None].to(enc.dtype))[0]        # noqa: E731
    out, start = [], 0
    for i, lay in enumerate(batch.layouts):
        out.append(([one(batch.crops[start + c]) for c in range(lay.n_crops)], one(batch.global_views[i])))
        start += lay.n_crops
    return out


def reference_encode(enc, feats, mask="prefix"):
    """Per image: each crop's projected query outputs, crop by crop, then the global view's, then the
    separator: SAM features (`sam_features`) of each view through `reference_qwen2`, then the projector."""
    P = dict(enc.named_parameters())
    project = lambda y: y @ P["projector.layers.weight"].T + P["projector.layers.bias"]   # noqa: E731

    def view(f):                                                              # f [C, q, q]
        m = f.shape[1] * f.shape[2]
        table = P["qwen2_model.query_768.weight"] if f.shape[1] == enc.config.image_size // 64 else \
            P["qwen2_model.query_1024.weight"]
        assert table.shape[0] == m
        return project(reference_qwen2(P, f.flatten(1).T, table, enc.config.qwen2, mask))   # [m, n_embed]

    return [torch.cat([view(f) for f in crops] + [view(glob), P["view_seperator"][None]]) for crops, glob in feats]


PAGES = [(1000, 700, 31), (500, 333, 32), (810, 1700, 33)]    # (width, height, seed)


@pytest.fixture(scope="module")
def batch():
    """3x2 crops, none, 1x2 (non-power-of-two sizes; OCR2_TINY_MODE crops images above 768 px)."""
    return preprocess([page(*p) for p in PAGES], OCR2_TINY_MODE)


@pytest.fixture(scope="module")
def tiny():
    return randomize(GundamEncoder(OCR2_TINY, backend="torch"), seed=4).eval()


def test_torch_path_equals_reference_fp64_and_fp32(tiny, batch):
    assert batch.grids == [(3, 2), (1, 1), (1, 2)]
    enc64 = copy.deepcopy(tiny).double()
    with torch.no_grad():
        feats = sam_features(enc64, batch)
        want = reference_encode(enc64, feats)
        causal = reference_encode(enc64, feats, mask="causal")
        got64 = enc64(batch).split()
        got32 = tiny(batch).split()
    assert [t.shape[0] for t in want] == batch.tokens == [71, 17, 35]
    for i, (g64, g32, w, c) in enumerate(zip(got64, got32, want, causal, strict=True)):
        scale = w.abs().max().item()
        assert g64.dtype == torch.float64 and g32.dtype == torch.float32
        assert_close(g64, w, atol=1e-10 * scale, rtol=1e-10, what=f"fp64, image {i}")
        assert_close(g32, w, atol=1e-5 * scale, rtol=1e-5, what=f"fp32, image {i}")
        # with a plain causal mask the visual tokens would see the queries: far off, so the check has teeth
        assert (c - w)[:-1].abs().max() > 1e-3 * scale, f"image {i}: the causal mask is not told apart"


def test_output_layout(tiny, batch):
    """Crops' 9 query outputs crop by crop in row-major tile order, then the global view's 16, then the
    separator; no newline rows."""
    with torch.no_grad():
        out = tiny(batch)
        local = tiny.encode_views(batch.crops)                      # [all crops, 9, D]
        glob = tiny.encode_views(batch.global_views)                # [3, 16, D]
    assert not hasattr(tiny, "image_newline")
    assert out.offsets.tolist() == [0, 71, 88, 123] and out.embeddings.shape == (123, 80)
    assert set(out.timings) == {"sam", "qwen2", "layout"}
    start = 0
    for i, (rows, lay) in enumerate(zip(out.split(), batch.layouts)):
        for c in range(lay.n_crops):
            assert_close(rows[9 * c:9 * c + 9], local[start + c], 1e-6, 1e-6, f"image {i} crop {c}")
        g0 = 9 * lay.n_crops
        assert_close(rows[g0:g0 + 16], glob[i], 1e-6, 1e-6, f"image {i} global")
        assert torch.equal(rows[-1], tiny.view_seperator) and rows.shape[0] == g0 + 17
        start += lay.n_crops


def test_views_in_chunks_and_bf16(tiny, batch, monkeypatch):
    """Qwen2 runs views in chunks of CHUNK_TOKENS tokens: one view per chunk gives the same result; bfloat16
    runs and stays near float32."""
    calls = []
    hook = tiny.qwen2_model.model.model.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    with torch.no_grad():
        want = tiny(batch).embeddings
        monkeypatch.setattr(M, "CHUNK_TOKENS", 40)       # 2 crops (2 x 18 tokens), 1 global view (32) a chunk
        chunked = tiny(batch).embeddings
        monkeypatch.undo()
        hook.remove()
        half = copy.deepcopy(tiny).to(torch.bfloat16)(batch).embeddings
    assert calls == [3, 8] + [1, 1, 1] + [2, 2, 2, 2], calls    # views per Qwen2 call: globals, then crops
    assert_close(chunked, want, 1e-6, 1e-6, "one view per chunk")
    assert half.dtype == torch.bfloat16
    assert_close(half, want, atol=0.05 * want.abs().max().item(), rtol=0, what="bf16 vs fp32")


def test_real_size_keys_and_shapes():
    """The real encoder's state dict: the vendor's 473 tensors and 454,385,280 parameters."""
    with torch.device("meta"):
        enc = GundamEncoder(Ocr2Config())
    sd = enc.state_dict()
    assert len(sd) == 473 and sum(v.numel() for v in sd.values()) == 454_385_280
    shapes = {"sam_model.pos_embed": (1, 64, 64, 768), "sam_model.net_3.weight": (896, 512, 3, 3),
              "sam_model.blocks.0.attn.rel_pos_h": (27, 64), "sam_model.blocks.2.attn.rel_pos_w": (127, 64),
              "qwen2_model.model.model.layers.23.self_attn.k_proj.weight": (128, 896),
              "qwen2_model.model.model.layers.0.self_attn.k_proj.bias": (128,),
              "qwen2_model.model.model.layers.5.mlp.down_proj.weight": (896, 4864),
              "qwen2_model.model.model.norm.weight": (896,),
              "qwen2_model.query_768.weight": (144, 896), "qwen2_model.query_1024.weight": (256, 896),
              "projector.layers.weight": (1280, 896), "projector.layers.bias": (1280,), "view_seperator": (1280,)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert "qwen2_model.model.model.layers.0.self_attn.o_proj.bias" not in sd
    assert not [k for k in sd if "embed_tokens" in k or "image_newline" in k or "vision_model" in k]
    assert sum(k.startswith("sam_model.") for k in sd) == 179 and sum(k.startswith("qwen2_model.") for k in sd) == 291


# ----------------------------------------------------------------------------------------------------------
# the prefix mask

@pytest.mark.parametrize("m", [1, 2, 5, 9, 16, 144])
def test_prefix_mask_rule(m):
    mask = prefix_mask(m, "cpu")
    assert mask.dtype == torch.bool and mask.shape == (2 * m, 2 * m)
    want = torch.tensor([[c <= max(r, m - 1) for c in range(2 * m)] for r in range(2 * m)])
    assert torch.equal(mask, want)


def test_visual_tokens_never_see_the_queries(tiny, batch):
    """New query tables change nothing in the visual tokens' states after any layer, and change the output."""
    enc = copy.deepcopy(tiny)
    states = []
    for layer in enc.qwen2_model.model.model.layers:
        layer.register_forward_hook(lambda mod, args, out: states.append(out.detach().clone()))
    with torch.no_grad():
        before = enc(batch).embeddings
        first = states[:]
        states.clear()
        g = torch.Generator().manual_seed(8)
        for table in (enc.qwen2_model.query_768, enc.qwen2_model.query_1024):
            table.weight.copy_(torch.randn(table.weight.shape, generator=g))
        after = enc(batch).embeddings
    assert len(first) == len(states) == 2 * 2     # 2 layers x (global views, crops)
    for a, b in zip(first, states):
        m = a.shape[1] // 2
        assert m in (9, 16)
        assert torch.equal(a[:, :m], b[:, :m]), f"visual tokens ({m} per view) changed with the queries"
        assert not torch.allclose(a[:, m:], b[:, m:])
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("size,m", [(256, 16), (192, 9)])
def test_query_sees_only_earlier_queries(tiny, size, m):
    """Query i's output does not depend on queries after i (and does on query i)."""
    g = torch.Generator().manual_seed(size)
    enc = copy.deepcopy(tiny)
    pixels = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    table = enc.qwen2_model.query_1024 if m == 16 else enc.qwen2_model.query_768
    assert table.weight.shape[0] == m
    with torch.no_grad():
        feats = enc.sam_model(pixels)                                  # [2, C, q, q]
        before = enc.qwen2_model(feats)                                # [2, m, C]
        for i in sorted({0, m // 2, m - 2, int(torch.randint(0, m - 1, (1,), generator=g))}):
            saved = table.weight.clone()
            table.weight[i + 1:] = torch.randn(m - i - 1, table.weight.shape[1], generator=g)
            after = enc.qwen2_model(feats)
            table.weight.copy_(saved)
            assert torch.equal(after[:, :i + 1], before[:, :i + 1]), f"queries 0..{i} saw a later query"
            for j in range(i + 1, m):
                assert not torch.allclose(after[:, j], before[:, j]), f"query {j} did not see query {j}"


def test_qwen2_stack_direct(tiny):
    """Qwen2Stack on [visual, queries]: the visual half is the same whatever follows it."""
    stack: Qwen2Stack = tiny.qwen2_model.model.model
    g = torch.Generator().manual_seed(3)
    m, C = 9, OCR2_TINY.qwen2.hidden_size
    visual = torch.randn(2, m, C, generator=g)
    with torch.no_grad():
        a = stack(torch.cat([visual, torch.randn(2, m, C, generator=g)], dim=1), m)
        b = stack(torch.cat([visual, torch.randn(2, m, C, generator=g)], dim=1), m)
    assert a.shape == (2, 2 * m, C)
    assert torch.equal(a[:, :m], b[:, :m]) and not torch.allclose(a[:, m:], b[:, m:])


# ----------------------------------------------------------------------------------------------------------
# checkpoints

def ocr2_checkpoint(enc, prefix="model."):
    """The encoder's tensors under the vendor's names, beside stand-ins for the language model's (its
    `model.norm.weight` is not the encoder's final norm)."""
    sd = {prefix + k: v.clone().contiguous() for k, v in enc.state_dict().items()}
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 64)
    sd["model.norm.weight"] = torch.randn(64)
    sd["model.embed_tokens.weight"] = torch.randn(100, 64)
    sd["lm_head.weight"] = torch.randn(100, 64)
    return sd


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def assert_one_line_error(fn, match, kind=ValueError):
    with pytest.raises(kind, match=match) as info:
        fn()
    assert "\n" not in str(info.value), str(info.value)


@pytest.fixture(scope="module")
def ocr2_source():
    return randomize(GundamEncoder(OCR2_TINY), seed=12).eval()


@pytest.mark.parametrize("prefix", ["model.", ""])
def test_from_pretrained_file_and_directory(ocr2_source, batch, tmp_path, prefix):
    save_file(ocr2_checkpoint(ocr2_source, prefix), tmp_path / "model.safetensors")
    with torch.no_grad():
        want = ocr2_source(batch).embeddings
    for path in (tmp_path / "model.safetensors", tmp_path):
        assert checkpoint_family(path) == "deepseek-ocr2"
        assert checked_config(path) == Ocr2Config() and checked_config(path, OCR2_TINY) is OCR2_TINY
        enc = GundamEncoder.from_pretrained(path, config=OCR2_TINY)
        assert enc.family == "deepseek-ocr2" and enc.config == OCR2_TINY and enc.mode == OCR2_TINY_MODE
        assert_same_weights(enc, ocr2_source)
        with torch.no_grad():
            assert torch.equal(enc(batch).embeddings, want)


def test_from_pretrained_sharded(ocr2_source, tmp_path):
    sd = ocr2_checkpoint(ocr2_source)
    keys = sorted(sd)
    shards = {f"model-0000{i + 1}-of-00003.safetensors": keys[i::3] for i in range(3)}
    weight_map = {}
    for name, ks in shards.items():
        save_file({k: sd[k] for k in ks}, tmp_path / name)
        weight_map.update({k: name for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    enc = GundamEncoder.from_pretrained(tmp_path, config=OCR2_TINY, dtype=torch.bfloat16)
    assert enc.family == "deepseek-ocr2" and enc.dtype == torch.bfloat16
    for k, v in ocr2_source.state_dict().items():
        assert torch.equal(enc.state_dict()[k], v.to(torch.bfloat16)), k


def test_hostile_checkpoints(ocr2_source, tmp_path):
    v1 = randomize(GundamEncoder(TINY), seed=1)
    save_file({"model." + k: v.contiguous() for k, v in v1.state_dict().items()}, tmp_path / "v1.safetensors")
    save_file(ocr2_checkpoint(ocr2_source), tmp_path / "v2.safetensors")
    assert checkpoint_family(tmp_path / "v1.safetensors") == "deepseek-ocr"
    # a DeepSeek-OCR checkpoint for a DeepSeek-OCR 2 config, and the other way round
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(tmp_path / "v1.safetensors", config=OCR2_TINY),
                          r"holds a DeepSeek-OCR encoder \(vision_model\.\* tensors\), config is a Ocr2Config")
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(tmp_path / "v2.safetensors", config=TINY),
                          r"holds a DeepSeek-OCR 2 encoder \(qwen2_model\.\* tensors\), config is a EncoderConfig")

    def save(name, edit):
        sd = ocr2_checkpoint(ocr2_source)
        edit(sd)
        save_file(sd, tmp_path / name)
        return tmp_path / name

    path = save("noquery.safetensors", lambda sd: sd.pop("model.qwen2_model.query_768.weight"))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          "missing encoder tensors qwen2_model.query_768.weight$")
    path = save("wide.safetensors", lambda sd: sd.update({"model.qwen2_model.query_1024.weight": torch.randn(16, 65)}))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          r"wrong shapes: qwen2_model.query_1024.weight \(16, 65\) \(expected \(16, 64\)\)")
    path = save("rows.safetensors", lambda sd: sd.update({"model.qwen2_model.query_768.weight": torch.randn(16, 64)}))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          r"wrong shapes: qwen2_model.query_768.weight \(16, 64\) \(expected \(9, 64\)\)")
    path = save("intq.safetensors", lambda sd: sd.update(
        {"model.qwen2_model.query_1024.weight": torch.ones(16, 64, dtype=torch.int32)}))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          r"non-floating tensors qwen2_model.query_1024.weight \(torch.int32\)")
    nan = torch.randn(9, 64)
    nan[4, 7] = float("nan")
    path = save("nanq.safetensors", lambda sd: sd.update({"model.qwen2_model.query_768.weight": nan}))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          r"NaN or Inf in qwen2_model.query_768.weight \(as torch.float32\)")
    # without a config: the real DeepSeek-OCR 2 encoder, which the tiny checkpoint does not fill
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(tmp_path / "v2.safetensors"),
                          "missing encoder tensors sam_model.blocks.3.norm1.weight, .* and 385 more$")
    # a deeper Qwen2 than the config: refused unless strict=False
    extra = {"model.qwen2_model.model.model.layers.2.mlp.up_proj.weight": torch.randn(96, 64)}
    path = save("deeper.safetensors", lambda sd: sd.update(extra))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          "encoder tensors the config does not use: model.qwen2_model.model.model.layers.2")
    assert_same_weights(GundamEncoder.from_pretrained(path, config=OCR2_TINY, strict=False), ocr2_source)
    # both families' tensors in one checkpoint, or neither
    path = save("both.safetensors", lambda sd: sd.update(
        {"model.vision_model.pre_layrnorm.weight": torch.ones(3)}))
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          r"holds both vision_model.\* and qwen2_model.\* tensors")
    path = save("neither.safetensors", lambda sd: [sd.pop(k) for k in list(sd) if "qwen2_model" in k])
    assert_one_line_error(lambda: GundamEncoder.from_pretrained(path, config=OCR2_TINY),
                          r"holds neither vision_model.\* nor qwen2_model.\* tensors")


def test_wrong_family_views_and_auto_backend(tiny, batch):
    gundam_views = preprocess(page(300, 200, 5), "gundam")
    assert_one_line_error(lambda: tiny(gundam_views), "views of a deepseek-ocr mode .* for a deepseek-ocr2 encoder")
    assert_one_line_error(lambda: tiny(preprocess(page(300, 200, 5), TINY_MODE)), "for a deepseek-ocr2 encoder")
    assert_one_line_error(lambda: tiny(preprocess(page(300, 200, 5), "ocr2")),
                          "mode base_size=1024: this DeepSeek-OCR 2 encoder takes base_size=256")
    with torch.device("meta"):
        v1 = GundamEncoder(TINY)
    assert_one_line_error(lambda: v1(batch), "views of a deepseek-ocr2 mode .* for a deepseek-ocr encoder")
    # "auto" is the CPU fast path on a CPU (the Triton path on CUDA: tests/test_packed.py runs it in the
    # interpreter)
    assert tiny._resolve("auto") == "cpu"
    with torch.no_grad():
        assert torch.equal(tiny(batch, backend="auto").embeddings, tiny(batch, backend="cpu").embeddings)


# ----------------------------------------------------------------------------------------------------------
# forward_vendor

def test_forward_vendor_both_layouts(tiny, batch):
    S = OCR2_TINY_MODE.image_size
    with torch.no_grad():
        want = tiny(batch).split()
    pv, ic, sc = batch.to_vendor()
    assert pv.shape == (3, 1, 3, 256, 256) and ic.shape == (3, 1, 6, 3, S, S) and sc.tolist() == [[[3, 2]], [[1, 1]], [[1, 2]]]
    crops = torch.split(batch.crops, batch.n_crops)
    lists = [c[None] if len(c) else torch.zeros(1, 1, 3, S, S) for c in crops]   # the vendor's zero placeholder
    flat_grid = torch.tensor([list(g) for g in batch.grids])
    layouts = {
        "per-image tensors": (pv, ic, sc),
        "per-image lists": (list(pv), lists, list(sc)),
        "flat": (batch.global_views, batch.crops, flat_grid),
        "flat, float tile counts": (batch.global_views, batch.crops, flat_grid.float()),
    }
    for what, args in layouts.items():
        got = tiny.forward_vendor(*args)
        assert len(got) == 3
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, atol=1e-6, rtol=1e-6, what=f"{what}, image {i}")
    # uint8 pixels (normalised on the encoder's device), flat layout
    views = [image_views(page(*p), OCR2_TINY_MODE) for p in PAGES]
    got = tiny.forward_vendor(torch.stack([v[0] for v in views]), torch.cat([v[1] for v in views]), flat_grid)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert_close(a, b, atol=1e-6, rtol=1e-6, what=f"uint8, image {i}")
    # flat without any crops: [0, 3, S, S]
    one = preprocess(page(500, 333, 32), OCR2_TINY_MODE)
    got = tiny.forward_vendor(one.global_views, torch.zeros(0, 3, S, S), torch.tensor([[1, 1]]))
    with torch.no_grad():
        assert_close(got[0], tiny(one).embeddings, 1e-6, 1e-6, "flat, no crops")
    assert got[0].shape == (17, 80)


def test_forward_vendor_wrong_views(tiny, batch):
    pv, ic, sc = batch.to_vendor()
    g = torch.Generator().manual_seed(2)
    px = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1   # noqa: E731
    flat_grid = torch.tensor([list(gr) for gr in batch.grids])
    big_crops = torch.zeros(3, 1, 6, 3, 256, 256)     # per image, crops of the global size (grids 3x2, 1x1, 1x2)
    big_crops[0, 0], big_crops[2, 0, :2] = px(6, 3, 256, 256), px(2, 3, 256, 256)
    cases = [
        ((px(3, 3, 1024, 1024), batch.crops, flat_grid), "pixel_values view size=1024: this DeepSeek-OCR 2 "
                                                          "encoder takes views of 256 and 192 px only"),
        ((px(3, 3, 192, 192), batch.crops, flat_grid), "pixel_values views are 192 px, expected this encoder's "
                                                        "global view size 256"),
        ((batch.global_views, px(8, 3, 256, 256), flat_grid), "images_crop views are 256 px, expected this "
                                                               "encoder's crop size 192"),
        ((batch.global_views, px(8, 3, 200, 200), flat_grid), "images_crop view size=200"),
        ((batch.global_views, px(8, 3, 192, 180), flat_grid), "images_crop views are 192x180 px"),
        ((batch.global_views, batch.crops[:7], flat_grid), "images_crop has 7 crops, images_spatial_crop asks for 8"),
        ((pv, big_crops, sc), "images_crop views are 256 px"),
        ((px(3, 1, 3, 768, 768), ic, sc), "pixel_values view size=768"),
        ((pv, ic[:, :, :2], sc), r"images_crop\[0\] holds 2 crops for a 3x2 grid, expected at least w\*h = 6"),
        ((pv[:2], ic, sc), "pixel_values, images_crop and images_spatial_crop must have the same number of "
                           "images, got 2, 3, 3"),
    ]
    for args, match in cases:
        assert_one_line_error(lambda: tiny.forward_vendor(*args), "forward_vendor: " + match)


# ----------------------------------------------------------------------------------------------------------
# training

def loss_and_grads(enc, batch, weights):
    enc.zero_grad(set_to_none=True)
    out = enc(batch).embeddings
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def test_training_gradients_and_checkpointing(tiny):
    batch = preprocess([page(1000, 700, 41), page(500, 333, 42)], OCR2_TINY_MODE)   # 3x2 crops, none
    enc = copy.deepcopy(tiny).train()
    g = torch.Generator().manual_seed(6)
    weights = torch.randn(sum(batch.tokens), 80, generator=g)
    out, grads = loss_and_grads(enc, batch, weights)
    names = [n for n, _ in enc.named_parameters()]
    assert set(grads) == set(names), f"no gradient for {sorted(set(names) - set(grads))}"
    for n, gr in grads.items():
        assert torch.isfinite(gr).all(), n
        if n.startswith(("qwen2_model.", "projector.")) or n == "view_seperator":
            assert gr.abs().max() > 0, f"{n}: zero gradient"
    assert grads["qwen2_model.query_768.weight"].abs().amin(1).gt(0).all()   # every crop query row is used
    assert grads["qwen2_model.query_1024.weight"].abs().amin(1).gt(0).all()

    calls = []
    # pre-hooks: a recomputation stops once it has what the backward needs, before a forward hook would run
    enc.qwen2_model.model.model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    enc.sam_model.blocks[0].register_forward_pre_hook(lambda *a: calls.append(0))
    enc.gradient_checkpointing_enable()
    assert enc.is_gradient_checkpointing and enc.qwen2_model.model.model.gradient_checkpointing
    out_ckpt, grads_ckpt = loss_and_grads(enc, batch, weights)
    # two view sizes: each block runs twice in the forward and is recomputed twice in the backward
    assert calls.count(1) == 4 and calls.count(0) == 4, calls
    assert torch.equal(out_ckpt, out)
    for n in names:
        assert_close(grads_ckpt[n], grads[n], atol=1e-6 * grads[n].abs().max().item(), rtol=1e-6, what=f"d{n}")
    enc.gradient_checkpointing_disable()
    assert not enc.qwen2_model.model.model.gradient_checkpointing


def test_gradients_equal_the_reference_fp64(tiny):
    """Autograd through the torch path equals autograd through the float64 reference (same parameters)."""
    batch = preprocess(page(810, 1700, 43), OCR2_TINY_MODE)   # 1x2 crops
    enc = copy.deepcopy(tiny).double().train()
    g = torch.Generator().manual_seed(7)
    weights = torch.randn(sum(batch.tokens), 80, generator=g, dtype=torch.float64)
    _, got = loss_and_grads(enc, batch, weights)
    enc.zero_grad(set_to_none=True)
    (torch.cat(reference_encode(enc, sam_features(enc, batch))) * weights).sum().backward()
    for n, p in enc.named_parameters():
        want = p.grad
        assert want is not None and want.abs().max() > 0, n
        # SAM resizes its position and rel-pos tables in float32 (as the vendor): their gradients are float32's
        tol = 1e-6 if "pos_embed" in n or "rel_pos" in n else 1e-9
        assert_close(got[n], want, atol=tol * want.abs().max().item(), rtol=tol, what=f"d{n}")
