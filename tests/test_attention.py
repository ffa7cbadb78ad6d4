import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gundam.kernels.attention as attn_mod
from gundam.kernels.attention import (SEG_GH, SEG_GW, SEG_RH_OFF, SEG_RW_OFF, attention, attention_reference,
                                      build_segments, choose_config, pack_rel_pos)

from testutils import DTYPES, assert_close

ROOT = Path(__file__).resolve().parents[1]


def _packed(views, heads, head_dim, dtype, seed, *, window=None, class_token=False, rel=True, bias=True,
            tokens=None):
    """Random packed qkv, segments, packed rel-pos tables and qkv bias for `views` [(offset, H, W)]."""
    g = torch.Generator().manual_seed(seed)
    seg = build_segments(views, window, class_token=class_token)
    T = tokens if tokens is not None else seg.end_token
    qkv = torch.randn(T, 3, heads, head_dim, generator=g).to(dtype)
    rh = rw = None
    if rel:
        rh = pack_rel_pos([(torch.randn(2 * s - 1, head_dim, generator=g) * 0.15).to(dtype)
                           for s in seg.rel_sizes_h], seg.rel_sizes_h)
        rw = pack_rel_pos([(torch.randn(2 * s - 1, head_dim, generator=g) * 0.15).to(dtype)
                           for s in seg.rel_sizes_w], seg.rel_sizes_w)
    qkv_bias = (torch.randn(3 * heads * head_dim, generator=g) * 0.5).to(dtype) if bias else None
    return qkv, seg, rh, rw, qkv_bias


def _check(views, heads, head_dim, dtype, atol, rtol, seed, what, *, config=None, **kw):
    qkv, seg, rh, rw, b = _packed(views, heads, head_dim, dtype, seed, **kw)
    got = attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b, config=config)
    want = attention_reference(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)   # float64 compute
    assert got.dtype == dtype and got.shape == (qkv.shape[0], heads * head_dim)
    assert_close(got, want, atol, rtol, what)
    return got


# --------------------------------------------------------------------------------------- kernel vs reference

@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_single_window(dtype, atol, rtol):
    _check([(0, 8, 8)], 2, 32, dtype, atol, rtol, seed=1, what="one 8x8 window", window=8)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("grid, window", [(8, 5), (10, 4), (16, 7), (20, 6), (28, 14)])
def test_windows_with_padding(dtype, atol, rtol, grid, window):
    # a square view plus a small non-square one; both padded at the bottom/right edge
    views = [(0, grid, grid), (grid * grid, window + 2, window + 3)]
    _check(views, 2, 16, dtype, atol, rtol, seed=grid, what=f"grid {grid} window {window}", window=window)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_global_groups_of_different_sizes(dtype, atol, rtol):
    views = [(0, 16, 16), (256, 10, 10), (356, 10, 10), (456, 10, 10)]
    _check(views, 2, 32, dtype, atol, rtol, seed=3, what="16x16 + 3 x 10x10 global")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_global_non_square_views(dtype, atol, rtol):
    views = [(0, 12, 9), (108, 6, 11), (174, 9, 12)]     # Rh and Rw have different lengths per view
    _check(views, 3, 16, dtype, atol, rtol, seed=4, what="non-square global")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("window", [None, 5])
def test_without_rel_pos(dtype, atol, rtol, window):
    _check([(0, 11, 11), (121, 7, 7)], 2, 16, dtype, atol, rtol, seed=5, what=f"no rel-pos window={window}",
           window=window, rel=False)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_padded_keys_without_qkv_bias_are_zero_keys(dtype, atol, rtol):
    # a bias-free qkv linear: padded keys have k = v = 0 and still take softmax mass (exp(rel-pos bias))
    _check([(0, 9, 9)], 2, 16, dtype, atol, rtol, seed=6, what="no qkv bias", window=4, bias=False)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_clip_groups_with_class_token(dtype, atol, rtol):
    views = [(0, 7, 7), (50, 5, 5), (76, 10, 10)]        # 50, 26 and 101 tokens, class token first
    _check(views, 2, 64, dtype, atol, rtol, seed=7, what="CLIP groups", class_token=True, rel=False)


@pytest.mark.parametrize("head_dim", [16, 32, 64, 128])
def test_head_dims(head_dim):
    _check([(0, 9, 9), (81, 6, 6)], 2, head_dim, torch.float32, 1e-5, 1e-5, seed=head_dim,
           what=f"head_dim {head_dim}", window=4)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_KH=1, BLOCK_KW=16),     # blocks much smaller than a group, one key row per block
    dict(BLOCK_M=16, BLOCK_KH=4, BLOCK_KW=4),
    dict(BLOCK_M=32, BLOCK_KH=8, BLOCK_KW=2),      # tall, narrow key tiles
    dict(BLOCK_M=128, BLOCK_KH=16, BLOCK_KW=16),   # larger than every group: one query and one key block
])
def test_block_sizes(dtype, atol, rtol, config):
    views = [(0, 9, 9), (81, 5, 7)]
    _check(views, 2, 16, dtype, atol, rtol, seed=8, what=f"global {config}", config=config)
    _check(views, 2, 16, dtype, atol, rtol, seed=9, what=f"windows {config}", config=config, window=6)


def test_out_in_place_leaves_other_tokens_untouched():
    # tokens 0..4 and 54..59 belong to no group: a written `out` keeps them
    views = [(5, 7, 7)]
    qkv, seg, rh, rw, b = _packed(views, 2, 16, torch.float32, 10, window=4, tokens=60)
    out = torch.full((60, 32), 7.0)
    res = attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b, out=out)
    assert res.data_ptr() == out.data_ptr()
    assert torch.equal(out[:5], torch.full((5, 32), 7.0)) and torch.equal(out[54:], torch.full((6, 32), 7.0))
    want = attention_reference(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)
    assert_close(out[5:54], want[5:54], 1e-5, 1e-5, "in-place out")


def test_strided_qkv_view_of_linear_output():
    # qkv as the fused linear produces it: a view of a [T, 3C] buffer, here with an extra column padding
    g = torch.Generator().manual_seed(11)
    heads, hd, T = 2, 16, 64
    buf = torch.randn(T, 3 * heads * hd + 16, generator=g)
    qkv = buf[:, :3 * heads * hd].view(T, 3, heads, hd)
    seg = build_segments([(0, 8, 8)], 3)
    rh = pack_rel_pos([torch.randn(5, hd, generator=g) * 0.2], seg.rel_sizes_h)
    rw = pack_rel_pos([torch.randn(5, hd, generator=g) * 0.2], seg.rel_sizes_w)
    b = torch.randn(3 * heads * hd, generator=g) * 0.5
    got = attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)
    want = attention_reference(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)
    assert_close(got, want, 1e-5, 1e-5, "strided qkv")


def test_one_launch_for_a_mixed_batch(monkeypatch):
    # the windows of views of two sizes (a scaled-down Gundam batch) and their global groups: one launch each
    calls = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            calls.append((self.kernel.__name__, grid))
            return self.kernel[grid]

    monkeypatch.setattr(attn_mod, "_attention_kernel", Counting(attn_mod._attention_kernel))
    monkeypatch.setattr(attn_mod, "_relpos_kernel", Counting(attn_mod._relpos_kernel))
    views = [(0, 16, 16), (256, 10, 10), (356, 10, 10), (456, 10, 10)]
    for window in (6, None):
        calls.clear()
        _check(views, 2, 16, torch.float32, 1e-5, 1e-5, seed=12, what=f"mixed batch window={window}",
               window=window)
        assert [c[0] for c in calls] == ["_relpos_kernel", "_attention_kernel"], calls


# ---------------------------------------------------------------- the reference against the vendor's computation

def _vendor_block_attention(x, w_qkv, b_qkv, rel_pos_h, rel_pos_w, heads, window):
    """SAM's attention the vendor's way (float64): pad + partition windows, qkv linear on the padded grid,
    decomposed rel-pos with the full bias materialised, softmax, unpartition, crop. x: [B, H, W, C]."""
    B, H, W, C = x.shape
    hd = C // heads
    if window:
        ph, pw = -H % window, -W % window
        x = torch.nn.functional.pad(x, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        x = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, window, window, C)                                   # [B * nw, S, S, C]
    Bw, S1, S2, _ = x.shape
    N = S1 * S2
    qkv = (x.reshape(Bw, N, C) @ w_qkv.T + b_qkv).reshape(Bw, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                    # [Bw, heads, N, hd]
    Rh = rel_pos_h[torch.arange(S1)[:, None] - torch.arange(S1)[None, :] + S1 - 1]   # [S1, S1, hd]
    Rw = rel_pos_w[torch.arange(S2)[:, None] - torch.arange(S2)[None, :] + S2 - 1]
    r_q = q.reshape(Bw, heads, S1, S2, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(Bw, heads, N, N)
    o = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + bias, dim=-1) @ v   # [Bw, heads, N, hd]
    o = o.transpose(1, 2).reshape(Bw, S1, S2, C)
    if window:
        o = o.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
        o = o.reshape(B, Hp, Wp, C)[:, :H, :W]
    return o


@pytest.mark.parametrize("window", [5, None])
def test_reference_and_kernel_match_the_vendor_computation(window):
    g = torch.Generator().manual_seed(13)
    heads, hd = 2, 16
    C = heads * hd
    sizes = [(12, 12), (12, 12), (7, 7)]           # two views of one size + one of another
    xs = [torch.randn(h, w, C, generator=g, dtype=torch.float64) for h, w in sizes]
    w_qkv = torch.randn(3 * C, C, generator=g, dtype=torch.float64) * C ** -0.5
    b_qkv = torch.randn(3 * C, generator=g, dtype=torch.float64) * 0.5
    tables = {s: (torch.randn(2 * s - 1, hd, generator=g, dtype=torch.float64) * 0.2,
                  torch.randn(2 * s - 1, hd, generator=g, dtype=torch.float64) * 0.2)
              for s in {window} if window} or {s: (torch.randn(2 * s - 1, hd, generator=g, dtype=torch.float64) * 0.2,
                                                   torch.randn(2 * s - 1, hd, generator=g, dtype=torch.float64) * 0.2)
                                               for s in {h for h, _ in sizes}}
    # the vendor, one batch per view size
    want = []
    for x, (h, w) in zip(xs, sizes):
        rh, rw = tables[window or h]
        want.append(_vendor_block_attention(x[None], w_qkv, b_qkv, rh, rw, heads, window)[0].reshape(h * w, C))
    want = torch.cat(want)
    # packed: the qkv linear on real tokens only, padding supplied by the bias
    views, off = [], 0
    for h, w in sizes:
        views.append((off, h, w))
        off += h * w
    seg = build_segments(views, window)
    qkv = (torch.cat([x.reshape(-1, C) for x in xs]) @ w_qkv.T + b_qkv).view(off, 3, heads, hd)
    rel_h = pack_rel_pos([tables[s][0] for s in seg.rel_sizes_h], seg.rel_sizes_h)
    rel_w = pack_rel_pos([tables[s][1] for s in seg.rel_sizes_w], seg.rel_sizes_w)
    ref = attention_reference(qkv, seg, rel_pos_h=rel_h, rel_pos_w=rel_w, qkv_bias=b_qkv)
    assert_close(ref, want, 1e-10, 1e-10, f"reference vs vendor window={window}")
    got = attention(qkv.float(), seg, rel_pos_h=rel_h.float(), rel_pos_w=rel_w.float(), qkv_bias=b_qkv.float())
    assert_close(got, want, 1e-5, 1e-5, f"kernel vs vendor window={window}")


# ------------------------------------------------------------------------------------ segments, config, errors

def test_build_segments_windows_cover_every_token_once():
    views = [(0, 20, 20), (400, 9, 13)]
    seg = build_segments(views, 7)
    rows = seg.rows.tolist()
    assert len(rows) == 3 * 3 + 2 * 2 and seg.max_group_tokens == 49 and seg.rel_sizes_h == (7,)
    count = torch.zeros(seg.end_token, dtype=torch.int64)
    for tok0, H, W, r0, c0, gh, gw, rh_off, rw_off in rows:
        assert (gh, gw, rh_off, rw_off) == (7, 7, 0, 0)
        for y in range(r0, min(r0 + gh, H)):
            count[tok0 + y * W + c0: tok0 + y * W + min(c0 + gw, W)] += 1
    assert torch.equal(count, torch.ones_like(count))


def test_build_segments_global_rel_offsets_and_packing():
    seg = build_segments([(0, 16, 16), (256, 10, 12), (376, 10, 10)])
    assert seg.rel_sizes_h == (10, 16) and seg.rel_sizes_w == (10, 12, 16)
    r = seg.rows
    assert r[:, SEG_RH_OFF].tolist() == [19, 0, 0] and r[:, SEG_RW_OFF].tolist() == [19 + 23, 19, 0]
    assert r[:, SEG_GH].tolist() == [16, 10, 10] and r[:, SEG_GW].tolist() == [16, 12, 10]
    packed = pack_rel_pos([torch.full((2 * s - 1, 4), float(s)) for s in seg.rel_sizes_w], seg.rel_sizes_w)
    assert packed.shape == (19 + 23 + 31, 4) and packed[19, 0] == 12 and packed[42, 0] == 16
    with pytest.raises(ValueError, match="size 12 must be"):
        pack_rel_pos([torch.zeros(19, 4), torch.zeros(19, 4), torch.zeros(31, 4)], seg.rel_sizes_w)


def test_build_segments_clip():
    seg = build_segments([(0, 16, 16), (257, 10, 10)], class_token=True)
    assert seg.rows[:, :7].tolist() == [[0, 1, 257, 0, 0, 1, 257], [257, 1, 101, 0, 0, 1, 101]]
    assert seg.end_token == 358 and seg.class_token


def test_choose_config_production_tiles():
    # 64x64 and 40x40 views tile into 8x8 key blocks without waste; windows of 14 into 16-wide tiles;
    # CLIP's single-row groups into 1 x 64
    big = choose_config(build_segments([(0, 64, 64), (4096, 40, 40)]), 64, torch.bfloat16)
    assert (big["BLOCK_M"], big["BLOCK_KH"], big["BLOCK_KW"]) == (128, 8, 8)
    win = choose_config(build_segments([(0, 64, 64), (4096, 40, 40)], 14), 64, torch.bfloat16)
    assert win["BLOCK_M"] == 64 and win["BLOCK_KH"] * win["BLOCK_KW"] == 64 and win["BLOCK_KW"] >= 8
    clip = choose_config(build_segments([(0, 16, 16)], class_token=True), 64, torch.bfloat16)
    assert (clip["BLOCK_KH"], clip["BLOCK_KW"]) == (1, 64)


def test_errors_are_clear():
    qkv, seg, rh, rw, b = _packed([(0, 6, 6)], 2, 16, torch.float32, 14, window=4)
    with pytest.raises(ValueError, match=r"attention: qkv has shape \(36, 96\), expected 4 dims"):
        attention(qkv.view(36, 3 * 2 * 16), seg)
    with pytest.raises(TypeError, match=r"attention: qkv has dtype torch.int32, expected one of"):
        attention(qkv.to(torch.int32), seg)
    with pytest.raises(ValueError, match="qkv has head_dim 12, expected a power of two"):
        attention(qkv[..., :12], seg)
    with pytest.raises(ValueError, match="segments reach token 36, expected at most qkv's 30 tokens"):
        attention(qkv[:30], seg)
    with pytest.raises(ValueError, match="only one of rel_pos_h and rel_pos_w"):
        attention(qkv, seg, rel_pos_h=rh)
    with pytest.raises(ValueError, match=r"rel_pos_h has shape \(5, 16\), expected \(7, 16\)"):
        attention(qkv, seg, rel_pos_h=rh[:5], rel_pos_w=rw)
    with pytest.raises(TypeError, match="rel_pos_w has dtype torch.float16, expected torch.float32"):
        attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw.half())
    with pytest.raises(ValueError, match=r"qkv_bias has shape \(10,\), expected \(96\)"):
        attention(qkv, seg, qkv_bias=b[:10])
    with pytest.raises(ValueError, match=r"out has shape \(36, 16\), expected \(36, 32\)"):
        attention(qkv, seg, out=torch.empty(36, 16))
    with pytest.raises(TypeError, match="segments is a Tensor, expected a SegmentTable"):
        attention(qkv, seg.rows)
    with pytest.raises(ValueError, match="config BLOCK_KW=6, expected a power of two"):
        attention(qkv, seg, config=dict(BLOCK_KW=6))
    with pytest.raises(ValueError, match=r"config keys \['BLOCK_Q'\] unknown"):
        attention(qkv, seg, config=dict(BLOCK_Q=16))
    with pytest.raises(ValueError, match="views overlap"):
        build_segments([(0, 4, 4), (10, 4, 4)])
    with pytest.raises(ValueError, match="window must be"):
        build_segments([(0, 4, 4)], 0)
    with pytest.raises(ValueError, match="class-token"):
        clip = build_segments([(0, 4, 4)], class_token=True)
        attention(qkv[:17], clip, rel_pos_h=rh, rel_pos_w=rw)


# ------------------------------------------------------------------------------------------------- benchmark

def test_bench_smoke():
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py"), "--smoke", "--sweep"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "global-1024" in res.stdout and "windows" in res.stdout and "M32" in res.stdout
    assert "MISMATCH" not in res.stdout
