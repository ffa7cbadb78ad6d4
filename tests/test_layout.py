import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from gundam.kernels.layout import (ImageViews, build_layout, project_and_layout, project_and_layout_reference)

DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-2, 1e-2)]
TINY_BLOCKS = (16, 16, 16, 1)   # BLOCK_M, BLOCK_N, BLOCK_K, num_warps: tl.dot's minimum, several tiles per dim


def _batch(grids, qi, qb, seed):
    """Images with the given crop grids ((1, 1) = no crops), their views packed in a shuffled order with gaps.

    Returns (images, sam_off, clip_off, q, T_sam, T_clip).
    """
    g = torch.Generator().manual_seed(seed)
    q, images = [], []
    for gw, gh in grids:
        crops = () if gw * gh == 1 else tuple(range(len(q) + 1, len(q) + 1 + gw * gh))
        images.append(ImageViews(global_view=len(q), grid_w=gw, grid_h=gh, crop_views=crops))
        q += [qb] + [qi] * len(crops)

    def pack(extra):  # views in a random order, each after a random gap of junk rows
        offs, t = [0] * len(q), 0
        for v in torch.randperm(len(q), generator=g).tolist():
            t += int(torch.randint(0, 3, (1,), generator=g))
            offs[v] = t
            t += extra + q[v] * q[v]
        return offs, t + 1

    sam_off, T_sam = pack(0)
    clip_off, T_clip = pack(1)   # CLIP views carry a class token first
    return images, sam_off, clip_off, q, T_sam, T_clip


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


def _expected_positions(images, q):
    """(newline rows, separator rows, image offsets) from the token-count formula, not from the row map."""
    newlines, seps, offsets = [], [], [0]
    for im in images:
        o = offsets[-1]
        if im.crop_views:
            qi = q[im.crop_views[0]]
            width = im.grid_w * qi + 1
            newlines += [o + r * width + width - 1 for r in range(im.grid_h * qi)]
            o += im.grid_h * qi * width
        qb = q[im.global_view]
        newlines += [o + r * (qb + 1) + qb for r in range(qb)]
        o += qb * (qb + 1)
        seps.append(o)
        offsets.append(o + 1)
    return newlines, seps, offsets


def _check(images, sam_off, clip_off, q, sam, clip, weight, bias, newline, separator, atol, rtol, blocks):
    layout = build_layout(images, sam_off, clip_off, q)
    newlines, seps, offsets = _expected_positions(images, q)
    T_out, N = offsets[-1], weight.shape[0]
    assert layout.out_offsets.tolist() == offsets

    out = torch.full((T_out, N), float("nan"), dtype=sam.dtype)
    got = project_and_layout(sam, clip, weight, bias, newline, separator, layout, out=out, blocks=blocks)
    assert got is out
    assert not out.isnan().any(), f"rows never written: {out.isnan().any(1).nonzero().flatten().tolist()}"

    # Embedding rows: bit for bit, exactly where the formula puts them.
    is_emb = torch.zeros(T_out, dtype=torch.bool)
    is_emb[newlines + seps] = True
    assert torch.equal(out[newlines], newline.expand(len(newlines), N))
    assert torch.equal(out[seps], separator.expand(len(seps), N))

    want = project_and_layout_reference(sam, clip, weight, bias, newline, separator, images, sam_off, clip_off, q)
    assert want.shape == out.shape
    assert torch.equal(want[is_emb], out[is_emb])
    err = (out.double() - want.double()).abs()
    assert torch.allclose(out.double(), want.double(), atol=atol, rtol=rtol), \
        f"max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}"


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_mixed_grids(dtype, atol, rtol):
    # No crops, 2 wide x 1 high, 1 wide x 3 high, 3 wide x 2 high.
    images, sam_off, clip_off, q, T_sam, T_clip = _batch([(1, 1), (2, 1), (1, 3), (3, 2)], qi=2, qb=3, seed=0)
    params = _params(T_sam, T_clip, 24, 24, 40, dtype, seed=1)
    _check(images, sam_off, clip_off, q, *params, atol, rtol, TINY_BLOCKS)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_unequal_halves_strided_rows(dtype, atol, rtol):
    # K_clip != K_sam, inputs as column slices of wider buffers, 32-row tiles, an image with crops first.
    images, sam_off, clip_off, q, T_sam, T_clip = _batch([(2, 2), (1, 1), (1, 2)], qi=3, qb=2, seed=2)
    sam, clip, weight, bias, newline, separator = _params(T_sam, T_clip, 20, 36, 33, dtype, seed=3)
    wide_sam = torch.randn(T_sam, 50).to(dtype)
    wide_clip = torch.randn(T_clip, 30).to(dtype)
    wide_sam[:, 7:43] = sam
    wide_clip[:, 5:25] = clip
    _check(images, sam_off, clip_off, q, wide_sam[:, 7:43], wide_clip[:, 5:25], weight, bias, newline, separator,
           atol, rtol, (32, 16, 16, 1))


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_real_feature_sizes(dtype, atol, rtol):
    # The real projector (1024 + 1024 -> 1280) and its production BLOCK_N/BLOCK_K, on a few tokens.
    images, sam_off, clip_off, q, T_sam, T_clip = _batch([(2, 1), (1, 1)], qi=1, qb=2, seed=4)
    params = _params(T_sam, T_clip, 1024, 1024, 1280, dtype, seed=5)
    _check(images, sam_off, clip_off, q, *params, atol, rtol, (16, 128, 64, 1))


def test_build_layout_row_map():
    # One 2x1 image of 1x1-token crops and a 1x1-token global view: every entry spelled out.
    images = [ImageViews(global_view=2, grid_w=2, grid_h=1, crop_views=(1, 0))]
    layout = build_layout(images, sam_off=[10, 20, 30], clip_off=[100, 200, 300], q=[1, 1, 1])
    assert layout.row_map.tolist() == [[201, 20], [101, 10], [-1, -1], [301, 30], [-1, -1], [-2, -1]]
    assert layout.row_map.dtype == torch.int32
    assert layout.out_offsets.tolist() == [0, 6]
    assert (layout.clip_rows, layout.sam_rows) == (302, 31)


def test_build_layout_bad_inputs():
    ok = dict(sam_off=[0, 4, 8], clip_off=[0, 5, 10], q=[2, 2, 2])
    with pytest.raises(ValueError, match=r"1 crop views for a 2x1 grid, expected 2"):
        build_layout([ImageViews(0, 2, 1, (1,))], **ok)
    with pytest.raises(ValueError, match=r"2x1 grid but no crop views"):
        build_layout([ImageViews(0, 2, 1)], **ok)
    with pytest.raises(ValueError, match=r"uses views \(0, 1, 3\), expected indices in \[0, 3\)"):
        build_layout([ImageViews(0, 2, 1, (1, 3))], **ok)
    with pytest.raises(ValueError, match=r"crops have q=\[2, 3\]"):
        build_layout([ImageViews(0, 2, 1, (1, 2))], sam_off=[0, 4, 8], clip_off=[0, 5, 10], q=[2, 2, 3])
    with pytest.raises(ValueError, match=r"lengths 2, 3, 3"):
        build_layout([ImageViews(0)], sam_off=[0, 4], clip_off=[0, 5, 10], q=[2, 2, 2])


def test_project_and_layout_bad_inputs():
    images, sam_off, clip_off, q, T_sam, T_clip = _batch([(2, 1)], qi=2, qb=2, seed=6)
    sam, clip, weight, bias, newline, separator = _params(T_sam, T_clip, 16, 16, 16, torch.float32, seed=7)
    layout = build_layout(images, sam_off, clip_off, q)
    args = [sam, clip, weight, bias, newline, separator, layout]

    def call(**changes):
        names = ["sam", "clip", "weight", "bias", "newline", "separator", "layout"]
        project_and_layout(*[changes.get(n, a) for n, a in zip(names, args)])

    with pytest.raises(ValueError, match=r"weight has 31 input features, expected 16 \(clip\) \+ 16 \(sam\)"):
        call(weight=weight[:, :31])
    with pytest.raises(ValueError, match=r"newline has shape \(15,\), expected \(16,\)"):
        call(newline=newline[:15])
    with pytest.raises(ValueError, match=r"clip has dtype torch.float16, expected torch.float32"):
        call(clip=clip.half())
    with pytest.raises(ValueError, match=r"layout reads SAM rows up to \d+, sam has 3 rows"):
        call(sam=sam[:3])
    with pytest.raises(ValueError, match=r"clip must be contiguous along its last dim"):
        call(clip=clip.t().contiguous().t())
    with pytest.raises(ValueError, match=r"layout must be a Layout"):
        call(layout=layout.row_map)
    with pytest.raises(ValueError, match=r"out is torch.float32 \(3, 16\)"):
        project_and_layout(*args, out=torch.empty(3, 16))
    with pytest.raises(ValueError, match=r"blocks \(16, 8, 16\), expected powers of two >= 16"):
        project_and_layout(*args, blocks=(16, 8, 16, 1))
