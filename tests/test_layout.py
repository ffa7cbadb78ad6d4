"""The projector + layout kernel (Triton's interpreter) against the torch layout (`gundam.layout`)."""
import pytest
import torch

from gundam.config import Mode
from gundam.kernels.layout import project_and_layout
from gundam.kernels.segments import NEWLINE, SEPARATOR, RowMap
from gundam.layout import grid_layout, layout_tokens
from testutils import DTYPES, assert_close

TINY_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1)  # tl.dot's minimum, several tiles per dim


def _batch(grids, mode, seed):
    """Layouts for the given crop grids ((1, 1) = no crops) and their views packed in a shuffled order with gaps
    of junk rows. Returns (layouts, views, T_sam, T_clip); views[i] = (global, crops) as (sam_off, clip_off, q)."""
    g = torch.Generator().manual_seed(seed)
    layouts = [grid_layout(mode, grid) for grid in grids]
    qs = [(i, lay.qb) for i, lay in enumerate(layouts)] + [(i, lay.qi) for i, lay in enumerate(layouts)
                                                           for _ in range(lay.n_crops)]

    def pack(extra):  # views in a random order, each after a random gap of junk rows
        offs, t = [0] * len(qs), 0
        for v in torch.randperm(len(qs), generator=g).tolist():
            t += int(torch.randint(0, 3, (1,), generator=g))
            offs[v] = t
            t += extra + qs[v][1] ** 2
        return offs, t + 1

    sam_off, T_sam = pack(0)
    clip_off, T_clip = pack(1)   # CLIP views carry a class token first
    views = [(v, sam_off[v], clip_off[v], q) for v, (_, q) in enumerate(qs)]
    per_image = [([views[i]], [w for w in views[len(layouts):] if qs[w[0]][0] == i]) for i in range(len(layouts))]
    return layouts, per_image, T_sam, T_clip


def _params(T_sam, T_clip, K_clip, K_sam, N, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    K = K_clip + K_sam
    sam = torch.randn(T_sam, K_sam, generator=g).to(dtype)
    clip = torch.randn(T_clip, K_clip, generator=g).to(dtype)
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    newline = (torch.randn(N, generator=g) + 10).to(dtype)    # far from any projected value
    separator = (torch.randn(N, generator=g) - 10).to(dtype)
    return sam, clip, weight, bias, newline, separator


def _layout_all(layouts, per_image, tokens_of, newline, separator):
    """The torch layout of every image, with tokens_of(view) giving a view's [q*q, D] tokens."""
    out = []
    for lay, (glob, crops) in zip(layouts, per_image):
        local = torch.stack([tokens_of(v) for v in crops]) if crops else None
        out.append(layout_tokens(lay, tokens_of(glob[0]), local, newline, separator))
    return torch.cat(out)


def _check(layouts, per_image, sam, clip, weight, bias, newline, separator, atol, rtol, config):
    def index_rows(view):   # (CLIP row, SAM row) of each token of a view
        _, s, c, q = view
        t = torch.arange(q * q)
        return torch.stack([c + 1 + t, s + t], dim=1)

    def projected(view):    # the torch projection of a view's tokens, in float64
        _, s, c, q = view
        feats = torch.cat([clip[c + 1:c + 1 + q * q], sam[s:s + q * q]], dim=-1).double()
        return torch.nn.functional.linear(feats, weight.double(), bias.double())

    rows = _layout_all(layouts, per_image, index_rows, torch.tensor([NEWLINE, -1]), torch.tensor([SEPARATOR, -1]))
    T_out, N = rows.shape[0], weight.shape[0]
    assert T_out == sum(lay.tokens for lay in layouts)
    out = torch.full((T_out, N), float("nan"), dtype=sam.dtype)
    got = project_and_layout(sam, clip, weight, bias, newline, separator, RowMap.from_host(rows), out=out,
                             config=config)
    assert got is out
    assert not out.isnan().any(), f"rows never written: {out.isnan().any(1).nonzero().flatten().tolist()}"
    want = _layout_all(layouts, per_image, projected, newline.double(), separator.double())
    is_emb = rows[:, 0] < 0
    assert torch.equal(out[is_emb], want[is_emb].to(out.dtype)), "newline/separator rows are not exact copies"
    assert_close(out, want, atol, rtol, "projected rows")


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_mixed_grids(dtype, atol, rtol):
    # no crops, 2 wide x 1 high, 1 wide x 3 high, 3 wide x 2 high; qb = 3, qi = 2
    layouts, per_image, T_sam, T_clip = _batch([(1, 1), (2, 1), (1, 3), (3, 2)], Mode(192, 128, True), seed=0)
    params = _params(T_sam, T_clip, 24, 24, 40, dtype, seed=1)
    _check(layouts, per_image, *params, atol, rtol, TINY_BLOCKS)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_unequal_halves_strided_rows(dtype, atol, rtol):
    # K_clip != K_sam, inputs as column slices of wider buffers, 32-row tiles, an image with crops first
    layouts, per_image, T_sam, T_clip = _batch([(2, 2), (1, 1), (1, 2)], Mode(128, 192, True), seed=2)
    sam, clip, weight, bias, newline, separator = _params(T_sam, T_clip, 20, 36, 33, dtype, seed=3)
    wide_sam = torch.randn(T_sam, 50).to(dtype)
    wide_clip = torch.randn(T_clip, 30).to(dtype)
    wide_sam[:, 7:43] = sam
    wide_clip[:, 5:25] = clip
    _check(layouts, per_image, wide_sam[:, 7:43], wide_clip[:, 5:25], weight, bias, newline, separator,
           atol, rtol, dict(TINY_BLOCKS, BLOCK_M=32))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_real_feature_sizes(dtype, atol, rtol):
    # the real projector (1024 + 1024 -> 1280) and its production BLOCK_N/BLOCK_K, on a few tokens
    layouts, per_image, T_sam, T_clip = _batch([(2, 1), (1, 1)], Mode(128, 64, True), seed=4)
    params = _params(T_sam, T_clip, 1024, 1024, 1280, dtype, seed=5)
    _check(layouts, per_image, *params, atol, rtol, dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64, num_warps=1))


def test_row_map_bounds_and_codes():
    rows = torch.tensor([[201, 20], [101, 10], [NEWLINE, -1], [301, 30], [NEWLINE, -1], [SEPARATOR, -1]])
    rm = RowMap.from_host(rows)
    assert rm.rows.dtype == torch.int32 and rm.rows.tolist() == rows.tolist()
    assert (rm.clip_rows, rm.sam_rows) == (302, 31)
    with pytest.raises(ValueError, match=r"RowMap: rows has shape \(6,\), expected 2 dims"):
        RowMap.from_host(rows[:, 0])
    with pytest.raises(ValueError, match="does not fit int32"):
        RowMap.from_host(torch.tensor([[2**31, 0]]))


def test_project_and_layout_bad_inputs():
    layouts, per_image, T_sam, T_clip = _batch([(2, 1)], Mode(128, 128, True), seed=6)
    sam, clip, weight, bias, newline, separator = _params(T_sam, T_clip, 16, 16, 16, torch.float32, seed=7)
    rm = RowMap.from_host(torch.tensor([[T_clip - 1, T_sam - 1], [NEWLINE, -1], [SEPARATOR, -1]]))
    args = dict(sam=sam, clip=clip, weight=weight, bias=bias, newline=newline, separator=separator, row_map=rm)

    def call(**changes):
        return project_and_layout(**{**args, **changes})

    with pytest.raises(ValueError, match=r"weight has shape \(16, 31\), expected \(\*, 32\)"):
        call(weight=weight[:, :31])
    with pytest.raises(ValueError, match=r"newline has shape \(15,\), expected \(16\)"):
        call(newline=newline[:15])
    with pytest.raises(TypeError, match=r"clip has dtype torch.float16, expected torch.float32"):
        call(clip=clip.half())
    with pytest.raises(ValueError, match=r"row_map reads SAM rows up to \d+, expected fewer than sam's 3 rows"):
        call(sam=sam[:3])
    with pytest.raises(ValueError, match=r"clip has strides .* expected a contiguous last dim"):
        call(clip=clip.t().contiguous().t())
    with pytest.raises(TypeError, match=r"row_map is a Tensor, expected a RowMap"):
        call(row_map=rm.rows)
    with pytest.raises(ValueError, match=r"out has shape \(3, 8\), expected \(3, 16\)"):
        call(out=torch.empty(3, 8))
    with pytest.raises(ValueError, match=r"config BLOCK_N=8, expected a power of two >= 16"):
        call(config=dict(BLOCK_N=8))


def test_backward_float64():
    # gradients of every input (both halves, weight, bias, newline, separator) against autograd through the torch
    # layout of the torch projection, kernels in fp64: to ~1e-10
    layouts, per_image, T_sam, T_clip = _batch([(1, 1), (3, 2), (1, 2)], Mode(192, 128, True), seed=8)
    params = [t.double().requires_grad_() for t in _params(T_sam, T_clip, 20, 12, 24, torch.float64, seed=9)]
    sam, clip, weight, bias, newline, separator = params

    def index_rows(view):
        _, s, c, q = view
        t = torch.arange(q * q)
        return torch.stack([c + 1 + t, s + t], dim=1)

    def projected(view):
        _, s, c, q = view
        return torch.nn.functional.linear(torch.cat([clip[c + 1:c + 1 + q * q], sam[s:s + q * q]], -1), weight, bias)

    rows = _layout_all(layouts, per_image, index_rows, torch.tensor([NEWLINE, -1]), torch.tensor([SEPARATOR, -1]))
    dout = torch.randn(rows.shape[0], 24, generator=torch.Generator().manual_seed(10), dtype=torch.float64)
    got = project_and_layout(sam, clip, weight, bias, newline, separator, RowMap.from_host(rows), config=TINY_BLOCKS)
    grads = torch.autograd.grad((got * dout).sum(), params)
    want = _layout_all(layouts, per_image, projected, newline, separator)
    wants = torch.autograd.grad((want * dout).sum(), params)
    assert_close(got, want, 1e-12, 1e-12, "output")   # the kernel accumulates in fp64 for fp64 inputs
    for name, g, w in zip(("sam", "clip", "weight", "bias", "newline", "separator"), grads, wants):
        assert_close(g, w, 1e-10, 1e-10, f"d{name}")
    # CLIP's class tokens feed no output: zero gradient
    class_rows = [c for glob, crops in per_image for _, _, c, _ in glob + crops]
    assert grads[1][class_rows].abs().max() == 0
