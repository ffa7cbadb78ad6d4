import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import gundam
from gundam import GundamEncoder, preprocess
from gundam import model as M
from testutils import TINY, TINY_MODE, randomize


def images(seed=0):
    """No crops, 2x1, 1x3, 3x2 grids in TINY_MODE (crops appear above 640 px)."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(500, 300), (1300, 650), (700, 2100), (1950, 1300)]
    out = []
    for w, h in sizes:
        arr = (torch.rand(h // 10, w // 10, 3, generator=g) * 255).to(torch.uint8).numpy()
        out.append(Image.fromarray(arr).resize((w, h)))
    return out


@pytest.fixture(scope="module")
def batch():
    return preprocess(images(), TINY_MODE)


def test_grids_and_shapes(tiny_encoder, batch):
    assert batch.grids == [(1, 1), (2, 1), (1, 3), (3, 2)]
    with torch.no_grad():
        out = tiny_encoder(batch)
    assert out.embeddings.shape == (sum(batch.tokens), 1280)
    assert out.offsets.tolist() == [0] + torch.tensor(batch.tokens).cumsum(0).tolist()
    assert [t.shape[0] for t in out.split()] == batch.tokens
    assert torch.isfinite(out.embeddings).all()


def test_deterministic_and_batched_equals_one_by_one(tiny_encoder, batch):
    with torch.no_grad():
        together = tiny_encoder(batch).split()
        again = tiny_encoder(batch).split()
        alone = [tiny_encoder(preprocess(im, TINY_MODE)).embeddings for im in images()]
    for a, b, c in zip(together, again, alone):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_layout_newlines_separator_and_tiles(tiny_encoder, batch):
    """Every newline and separator row sits where the vendor puts it, and every crop token is at its tile."""
    enc = tiny_encoder
    with torch.no_grad():
        outs = enc(batch).split()
        glob = enc.encode_views(batch.global_views)                     # [n, qb*qb, D]
        local = enc.encode_views(batch.crops)                           # [n_crops, qi*qi, D]
    qb, qi = 4, 3
    start = 0
    for i, (out, (gw, gh)) in enumerate(zip(outs, batch.grids)):
        n_crops = 0 if (gw, gh) == (1, 1) else gw * gh
        row = 0
        if n_crops:
            for r in range(gh * qi):
                for c in range(gw * qi):
                    crop = start + (r // qi) * gw + (c // qi)
                    torch.testing.assert_close(out[row], local[crop, (r % qi) * qi + (c % qi)], atol=1e-5, rtol=1e-5)
                    row += 1
                assert torch.equal(out[row], enc.image_newline), f"image {i} local row {r}: no newline at {row}"
                row += 1
        for r in range(qb):
            torch.testing.assert_close(out[row:row + qb], glob[i, r * qb:(r + 1) * qb], atol=1e-5, rtol=1e-5)
            row += qb
            assert torch.equal(out[row], enc.image_newline), f"image {i} global row {r}: no newline at {row}"
            row += 1
        assert torch.equal(out[row], enc.view_seperator) and row + 1 == out.shape[0]
        start += n_crops


def naive_rel_pos_attention(q, k, v, rel_h_table, rel_w_table, H, W):
    """Float64, one (query, key) pair at a time: bias = q.Rh[qh-kh+S-1] + q.Rw[qw-kw+S-1]."""
    B, nh, N, d = q.shape
    q, k, v = q.double(), k.double(), v.double()
    Rh = M.rel_pos_table(M.resize_rel_pos(rel_h_table.float(), H), H).double()   # resized like the vendor,
    Rw = M.rel_pos_table(M.resize_rel_pos(rel_w_table.float(), W), W).double()   # then gathered
    qh = torch.arange(N) // W
    qw = torch.arange(N) % W
    bias = torch.empty(B, nh, N, N, dtype=torch.float64)
    for i in range(N):
        bias[:, :, i] = (q[:, :, i, None, :] * Rh[qh[i], qh]).sum(-1) + (q[:, :, i, None, :] * Rw[qw[i], qw]).sum(-1)
    att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + bias, dim=-1)
    return att @ v


@pytest.mark.parametrize("H,W,table", [(6, 6, 11), (7, 7, 7), (5, 5, 9)])
def test_rel_pos_attention_against_naive(H, W, table, monkeypatch):
    g = torch.Generator().manual_seed(H * 100 + table)
    B, nh, d = 2, 3, 8
    q, k, v = (torch.randn(B, nh, H * W, d, generator=g) for _ in range(3))
    rh, rw = torch.randn(table, d, generator=g), torch.randn(table, d, generator=g)
    Rh, Rw = M.rel_pos_table(M.resize_rel_pos(rh, H), H), M.rel_pos_table(M.resize_rel_pos(rw, W), W)
    ref = naive_rel_pos_attention(q, k, v, rh, rw, H, W)
    full = M.attention_with_rel_pos(q, k, v, Rh, Rw, H, W)
    monkeypatch.setattr(M, "BIAS_CHUNK_ELEMENTS", B * nh * H * W * 5)  # 5 query rows per chunk
    chunked = M.attention_with_rel_pos(q, k, v, Rh, Rw, H, W)
    for got in (full, chunked):
        err = (got.double() - ref).abs()
        assert err.max() < 1e-5, f"max {err.max():.3g} mean {err.mean():.3g}"


def test_window_padding_keys_are_qkv_bias():
    """A window block on a grid that needs padding equals a per-window loop where padded keys are the qkv bias."""
    torch.manual_seed(1)
    blk = randomize(M.SamBlock(TINY.sam, TINY.sam.window_size, M.TableCache()), seed=3).eval()
    x = torch.randn(1, 7, 7, TINY.sam.embed_dim)
    S, C, nh = 5, TINY.sam.embed_dim, TINY.sam.num_heads
    with torch.no_grad():
        got = blk(x)
        xn = blk.norm1(x)[0]
        attn_out = torch.zeros(7, 7, C)
        for r0 in (0, 5):
            for c0 in (0, 5):
                win = torch.zeros(S, S, C)
                hh, ww = min(S, 7 - r0), min(S, 7 - c0)
                win[:hh, :ww] = xn[r0:r0 + hh, c0:c0 + ww]
                qkv = blk.attn.qkv(win.reshape(S * S, C)).reshape(S * S, 3, nh, -1).permute(1, 2, 0, 3)
                if hh < S or ww < S:  # padded positions carry exactly the bias
                    pad = qkv[:, :, -1]
                    assert torch.allclose(pad.reshape(-1), blk.attn.qkv.bias.view(3, nh, -1).reshape(-1))
                o = naive_rel_pos_attention(qkv[0][None], qkv[1][None], qkv[2][None],
                                            blk.attn.rel_pos_h, blk.attn.rel_pos_w, S, S)[0].float()
                o = o.permute(1, 0, 2).reshape(S, S, C)
                attn_out[r0:r0 + hh, c0:c0 + ww] = blk.attn.proj(o)[:hh, :ww]
        h = x[0] + attn_out
        ref = h + blk.mlp(blk.norm2(h))
    err = (got[0] - ref).abs()
    assert err.max() < 1e-4, f"max {err.max():.3g} mean {err.mean():.3g}"


def test_pos_embed_resize_matches_interpolate():
    pe = torch.randn(1, 16, 16, 8)
    got = M.resize_pos_embed(pe, 12)
    ref = F.interpolate(pe.permute(0, 3, 1, 2).double(), size=(12, 12), mode="bicubic", antialias=True,
                        align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)
    assert M.resize_pos_embed(pe, 16) is pe


def test_table_cache_invalidated_by_weight_update(tiny_encoder):
    enc = GundamEncoder(TINY).eval()
    randomize(enc, seed=5)
    x = preprocess(images()[1], TINY_MODE)
    with torch.no_grad():
        a = enc(x).embeddings
        enc.sam_model.pos_embed.add_(1.0)          # in-place update: cached resized tables must follow
        b = enc(x).embeddings
        fresh = GundamEncoder(TINY).eval()
        fresh.load_state_dict(enc.state_dict())
        c = fresh(x).embeddings
        # a parameter replaced by a new object (load_state_dict(assign=True)) is never matched to old tables
        sd = {k: v.clone() for k, v in enc.state_dict().items()}
        sd["sam_model.pos_embed"].add_(1.0)
        enc.load_state_dict(sd, assign=True)
        d = enc(x).embeddings
        fresh.load_state_dict(sd)
        e = fresh(x).embeddings
        # writes through .data skip the version counter: clear_cache() makes them visible
        enc.sam_model.pos_embed.data.add_(1.0)
        enc.clear_cache()
        f = enc(x).embeddings
        fresh.sam_model.pos_embed.add_(1.0)
        g = fresh(x).embeddings
    assert not torch.allclose(a, b)
    torch.testing.assert_close(b, c)
    torch.testing.assert_close(d, e)
    torch.testing.assert_close(f, g)


def test_gradients_flow_through_tables():
    enc = randomize(GundamEncoder(TINY), seed=2)
    out = enc(preprocess(images()[1], TINY_MODE)).embeddings
    out.float().pow(2).mean().backward()
    for name in ("sam_model.pos_embed", "sam_model.blocks.1.attn.rel_pos_h", "vision_model.embeddings.position_embedding.weight"):
        grad = dict(enc.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-5), (torch.bfloat16, 0.25)])
def test_dtypes(tiny_encoder, batch, dtype, atol):
    ref_enc = tiny_encoder
    enc = GundamEncoder(TINY).eval()
    enc.load_state_dict(ref_enc.state_dict())
    enc = enc.to(dtype)
    with torch.no_grad():
        ref = ref_enc(batch).embeddings.double()
        got = enc(batch).embeddings
    assert got.dtype == dtype
    err = (got.double() - ref).abs()
    scale = ref.abs().max()
    assert err.max() / scale < atol, f"max {err.max():.3g} mean {err.mean():.3g} (scale {scale:.3g})"


def test_vendor_init_and_state_dict_names():
    enc = GundamEncoder(TINY)
    assert torch.count_nonzero(enc.sam_model.pos_embed) == 0
    assert torch.count_nonzero(enc.sam_model.blocks[0].attn.rel_pos_h) == 0
    keys = set(enc.state_dict())
    for k in ("sam_model.blocks.0.attn.qkv.weight", "sam_model.neck.3.bias", "sam_model.net_3.weight",
              "vision_model.transformer.layers.1.self_attn.qkv_proj.bias", "vision_model.pre_layrnorm.weight",
              "vision_model.embeddings.position_embedding.weight", "projector.layers.weight", "image_newline",
              "view_seperator"):
        assert k in keys, k
    # a vendor state dict also carries CLIP's unused patch embedding and position ids: they are ignored
    sd = dict(enc.state_dict())
    sd["vision_model.embeddings.patch_embedding.weight"] = torch.zeros(1024, 3, 14, 14)
    sd["vision_model.embeddings.position_ids"] = torch.arange(10)[None]
    GundamEncoder(TINY).load_state_dict(sd)


def test_uint8_pixels_equal_preprocessed_floats(tiny_encoder, batch):
    # uint8 pixels, normalised on the encoder's device, give the very same tokens as preprocess's floats
    to_u8 = lambda x: torch.round((x.double() + 1) * 127.5).to(torch.uint8)   # exact inverse on 0..255
    u8 = gundam.Batch(to_u8(batch.global_views), to_u8(batch.crops), batch.layouts, batch.mode)
    with torch.no_grad():
        assert torch.equal(tiny_encoder(u8).embeddings, tiny_encoder(batch).embeddings)


def test_gradient_checkpointing_same_gradients(batch):
    enc = randomize(GundamEncoder(TINY), seed=4)
    grads, saved = [], []
    for on in (False, True):
        enc.zero_grad()
        enc.gradient_checkpointing_enable() if on else enc.gradient_checkpointing_disable()
        assert enc.is_gradient_checkpointing == on
        count = [0]

        def pack(t):   # every tensor autograd keeps for the backward
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = enc(batch, backend="torch").embeddings.pow(2).mean()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in enc.named_parameters()})
        saved.append(count[0])
    assert saved[1] < saved[0] / 2, saved          # the blocks' activations are not kept
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name   # same ops recomputed: bit-identical
