import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import gundam.kernels.attention as attn_mod
from gundam.kernels.attention import attention, attention_reference
from gundam.kernels.segments import PROG_Q0, SEG_GH, SEG_GW, SEG_RH_OFF, SEG_RW_OFF, build_segments, pack_rel_pos
from gundam.kernels.tiling import choose_config, mma_work

from testutils import DTYPES, assert_close, attention_inputs, log_launches, vendor_block_attention

ROOT = Path(__file__).resolve().parents[1]


def _check(views, heads, head_dim, dtype, atol, rtol, seed, what, *, config=None, **kw):
    seg, (qkv, rh, rw, b), _ = attention_inputs(views, heads, head_dim, seed, dtype=dtype, **kw)
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
    # 50, 26, 101 and 65 tokens, class token first; 65 = 64 + a 16-row tail block of one query
    views = [(0, 7, 7), (50, 5, 5), (76, 10, 10), (177, 8, 8)]
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
    dict(BLOCK_M=32, TAIL_M=16, BLOCK_KH=2, BLOCK_KW=8),   # tail blocks: 5x7 = 32 + 3, 6x6 windows = 32 + 4
])
def test_block_sizes(dtype, atol, rtol, config):
    views = [(0, 9, 9), (81, 5, 7)]
    _check(views, 2, 16, dtype, atol, rtol, seed=8, what=f"global {config}", config=config)
    _check(views, 2, 16, dtype, atol, rtol, seed=9, what=f"windows {config}", config=config, window=6)


class Allocations(TorchDispatchMode):
    """Records the shape of every zero-filled or filled tensor."""

    def __init__(self):
        super().__init__()
        self.filled = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.zeros.default, torch.ops.aten.zero_.default, torch.ops.aten.fill_.Scalar):
            self.filled.append(tuple(out.shape))
        return out


def test_out_default_is_filled_only_where_no_group_writes():
    # groups covering every token: the output is allocated, not zero-filled
    seg, (qkv, rh, rw, b), _ = attention_inputs([(0, 7, 7), (49, 5, 6)], 2, 16, 15, window=4)
    with Allocations() as allocs:
        got = attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)
    assert (79, 32) not in allocs.filled, allocs.filled
    assert_close(got, attention_reference(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b), 1e-5, 1e-5, "covered")
    # tokens 0..4 and 54..59 in no group: zeros there
    seg, (qkv, rh, rw, b), _ = attention_inputs([(5, 7, 7)], 2, 16, 16, window=4, tokens=60)
    got = attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)
    assert torch.equal(got[:5], torch.zeros(5, 32)) and torch.equal(got[54:], torch.zeros(6, 32))


def test_out_in_place_leaves_other_tokens_untouched():
    # tokens 0..4 and 54..59 belong to no group: a written `out` keeps them
    views = [(5, 7, 7)]
    seg, (qkv, rh, rw, b), _ = attention_inputs(views, 2, 16, 10, window=4, tokens=60)
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
    log_launches(monkeypatch, calls, [attn_mod])
    views = [(0, 16, 16), (256, 10, 10), (356, 10, 10), (456, 10, 10)]
    for window in (6, None):
        calls.clear()
        _check(views, 2, 16, torch.float32, 1e-5, 1e-5, seed=12, what=f"mixed batch window={window}",
               window=window)
        assert [c[0] for c in calls] == ["_relpos_kernel", "_attention_kernel"], calls
        # one program per (query block, head), none idle: 16x16 is 4 blocks of 64 and each 10x10 two
        # (BLOCK_M 64; windows of 6: every window one block); rel-pos blocks of 32
        n_blocks = 4 + 3 * 2 if window is None else 9 + 3 * 4
        n_rel = (8 + 3 * 4) if window is None else (9 + 3 * 4) * 2
        assert calls[1][1] == (n_blocks, 2) and calls[0][1] == (n_rel, 2), calls


# ---------------------------------------------------------------- the reference against the vendor's computation

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
        want.append(vendor_block_attention(x[None], w_qkv, b_qkv, rh, rw, heads, window)[0].reshape(h * w, C))
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


def test_planning_modules_import_without_triton():
    # segment, program and row-map tables and the tiling heuristics are host code: torch alone imports them
    code = ("import sys\n"
            "sys.modules['triton'] = None\n"        # any import of triton now raises ImportError
            "import gundam.kernels.segments, gundam.kernels.tiling, gundam.kernels.prefix_segments, gundam.packed\n"
            "try:\n"
            "    import gundam.kernels.attention\n"
            "except ImportError:\n"
            "    print('kernels need triton')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "kernels need triton", res.stdout    # the block works: the kernels do not import


def _tile(cfg):
    return cfg["BLOCK_M"], cfg["TAIL_M"], cfg["BLOCK_KH"], cfg["BLOCK_KW"]


def test_choose_config_production_tiles():
    # 64x64 and 40x40 views tile into 8x8 key blocks without waste and whole 128-row query blocks; windows of
    # 14 into 2 x 16 key tiles (14 rows of 16 slots) and 64 + 64 + 64 + 16 query rows; CLIP's single-row
    # groups of 257 tokens into 1 x 32 key tiles and 4 x 64 + 16 query rows, of 101 tokens into 64-wide ones
    assert _tile(choose_config(build_segments([(0, 64, 64), (4096, 40, 40)]), 64, torch.bfloat16)) == (128, 128, 8, 8)
    assert _tile(choose_config(build_segments([(0, 64, 64), (4096, 40, 40)], 14), 64, torch.bfloat16)) == (64, 16, 2, 16)
    assert _tile(choose_config(build_segments([(0, 16, 16)], class_token=True), 64, torch.bfloat16)) == (64, 16, 1, 32)
    assert _tile(choose_config(build_segments([(0, 10, 10)], class_token=True), 64, torch.bfloat16)) == (64, 64, 1, 64)


def test_window_padding_ratio():
    # A 14 x 14 window is 196 queries x 196 keys of useful work (padded keys are real keys: the qkv bias).
    # Before: 4 query blocks of 64 x 4 key tiles of 8 x 8 = 256 x 256 = 1.71x. Now: 64 + 64 + 64 + 16 query
    # rows x 7 key tiles of 2 x 16 = 208 x 224 = 1.21x. Counted from the group shapes (mma_work); the program
    # table the kernel runs has those query blocks.
    seg = build_segments([(0, 64, 64), (4096, 40, 40)], 14)        # 25 + 9 windows
    assert dict(seg.group_shapes) == {(14, 14): 34}
    before = mma_work(seg.group_shapes, 64, 64, 8, 8)
    assert before == (34 * 256 * 256, 34 * 196 * 196) and round(before[0] / before[1], 2) == 1.71
    cfg = choose_config(seg, 64, torch.bfloat16)
    after = mma_work(seg.group_shapes, *_tile(cfg))
    assert after == (34 * 208 * 224, 34 * 196 * 196) and round(after[0] / after[1], 2) == 1.21
    # 4 programs per window, first queries 0, 64, 128, 192; the last holds 196 - 192 = 4 <= TAIL_M = 16 queries,
    # so the kernel runs it as a 16-row block
    progs = seg.program_table(cfg["BLOCK_M"], cfg["TAIL_M"])[:, PROG_Q0].tolist()
    assert progs == [0, 64, 128, 192] * 34 and cfg["TAIL_M"] == 16
    # other production shapes: global blocks pad only the 640 view's last query block (1600 = 12.5 x 128),
    # CLIP-1024 is 272 x 288 / 257^2 = 1.19x (was 320 x 320: 1.55x)
    glob = build_segments([(0, 64, 64), (4096, 40, 40)])
    issued, useful = mma_work(glob.group_shapes, *_tile(choose_config(glob, 64, torch.bfloat16)))
    assert (issued, useful) == (4096 ** 2 + 1664 * 1600, 4096 ** 2 + 1600 ** 2)
    clip = build_segments([(0, 16, 16)], class_token=True)
    issued, useful = mma_work(clip.group_shapes, *_tile(choose_config(clip, 64, torch.bfloat16)))
    assert (issued, useful) == (272 * 288, 257 * 257)
    # 257 queries: first queries 0, 64, 128, 192 and a 16-row block for query 256: 4 * 64 + 16 = 272 rows
    assert clip.program_table(64, 16)[:, PROG_Q0].tolist() == [0, 64, 128, 192, 256]


def test_ocr2_sam_tiling():
    # DeepSeek-OCR 2's SAM: 768 px crops are 48 x 48 grids. Windows of 14 pad them to 56 (16 windows, as the
    # 1024 view's 25 are 14 x 14): the same 1.21x as above, with the same config. Global blocks: 48 x 48 = 2304
    # queries = 18 blocks of 128 and 6 x 6 key tiles of 8 x 8: no waste at all, with the config of DeepSeek-OCR's
    # mixed launch (so the compile check's entries cover it)
    win = build_segments([(0, 64, 64), (4096, 48, 48)], 14)
    assert dict(win.group_shapes) == {(14, 14): 25 + 16}
    cfg = choose_config(win, 64, torch.bfloat16)
    assert cfg == choose_config(build_segments([(0, 64, 64), (4096, 40, 40)], 14), 64, torch.bfloat16)
    assert mma_work(win.group_shapes, *_tile(cfg)) == (41 * 208 * 224, 41 * 196 * 196)
    glob = build_segments([(0, 64, 64), (4096, 48, 48)])
    cfg = choose_config(glob, 64, torch.bfloat16)
    assert cfg == choose_config(build_segments([(0, 64, 64), (4096, 40, 40)]), 64, torch.bfloat16)
    assert mma_work(glob.group_shapes, *_tile(cfg)) == (4096 ** 2 + 2304 ** 2,) * 2


def test_errors_are_clear():
    seg, (qkv, rh, rw, b), _ = attention_inputs([(0, 6, 6)], 2, 16, 14, window=4)
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
    with pytest.raises(ValueError, match="BLOCK_M=16, TAIL_M=32, .* expected 16 <= TAIL_M <= BLOCK_M"):
        attention(qkv, seg, config=dict(BLOCK_M=16, TAIL_M=32))
    with pytest.raises(ValueError, match="segments are for meta, expected qkv's cpu"):
        attention(qkv, seg.to("meta"))
    big = torch.empty_strided((2**20, 3, 2, 16), (2**12, 32, 16, 1), device="meta")   # a 2**20-token view
    with pytest.raises(ValueError, match="a view of 1048576 tokens at row stride 4096, expected fewer"):
        attention(big, build_segments([(0, 1024, 1024)], device="meta"))
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

def test_bench_smoke(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "bench" / "attention.py"), "--smoke", "--sweep",
                          "--json", str(tmp_path / "a.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "global-1024" in res.stdout and "windows" in res.stdout and "M32" in res.stdout
    assert "MISMATCH" not in res.stdout
    out = json.loads((tmp_path / "a.json").read_text())
    assert out["environment"]["torch"] == torch.__version__
    for case in out["cases"]:
        assert case["max_error_vs_vendor"] <= 1e-4 and case["vendor_sdpa"], case
        methods = {r["method"]: r for r in case["results"]}
        assert {"triton segmented", "sdpa + materialised bias", "sdpa flash, no bias"} <= set(methods)
        assert all(0 < r["ms_min"] <= r["ms_median"] and r["tflops"] > 0 for r in case["results"])
        assert methods["triton segmented"]["padding"] >= 1
