"""`GundamEncoder.forward_vendor`: both vendor layouts give what the vendor's `_pixel_values_to_embedding` gives.

The reference (host_standins.image_tokens) follows the vendor's per-image loop (deepseek-ai/DeepSeek-OCR
e4ac34e, DeepSeek-OCR-vllm/deepseek_ocr.py; vllm-project/vllm 029329a, deepseek_ocr.py): one SAM -> CLIP ->
projector pass for an image's crops and one for its global view, rows assembled token by token.
"""
import re

import pytest
import torch
from PIL import Image

from gundam import Batch, preprocess
from gundam.images import image_views
from host_standins import image_tokens
from testutils import TINY_MODE, assert_close, page

S, B = TINY_MODE.image_size, TINY_MODE.base_size


@pytest.fixture(scope="module")
def batch():
    """No crops, 2x1, 1x3 and 3x2 grids: different crop counts in one batch."""
    sizes = [(500, 300), (1300, 650), (700, 2100), (1950, 1300)]
    return preprocess([page(w, h, seed=i) for i, (w, h) in enumerate(sizes)], TINY_MODE)


def per_image_crops(batch):
    return list(torch.split(batch.crops, batch.n_crops))


@pytest.fixture(scope="module")
def reference(tiny_encoder, batch):
    with torch.no_grad():
        return [image_tokens(tiny_encoder, c if len(c) else None, g, grid)
                for g, c, grid in zip(batch.global_views, per_image_crops(batch), batch.grids)]


def check(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"image {i}")


def test_per_image_tensors(tiny_encoder, batch, reference):
    pv, ic, sc = batch.to_vendor()          # [n,1,3,B,B], [n,1,N,3,S,S] zero-padded, [n,1,2]
    assert batch.grids == [(1, 1), (2, 1), (1, 3), (3, 2)]
    check(tiny_encoder.forward_vendor(pv, ic, sc), reference)


def test_per_image_lists(tiny_encoder, batch, reference):
    # different crop counts: one entry per image; an image without crops carries one all-zero crop (the
    # vendor's processor), or none at all
    crops = [c[None] if len(c) else torch.zeros(1, 1, 3, S, S) for c in per_image_crops(batch)]
    sc = [torch.tensor([list(g)]) for g in batch.grids]
    check(tiny_encoder.forward_vendor([g[None] for g in batch.global_views], crops, sc), reference)
    crops[0] = torch.zeros(1, 0, 3, S, S)
    check(tiny_encoder.forward_vendor([g[None] for g in batch.global_views], crops, sc), reference)


def test_flat_layout(tiny_encoder, batch, reference):
    # vLLM: no crop rows for an image without crops; spatial crop [n, 2]
    spatial = torch.tensor([list(g) for g in batch.grids])
    check(tiny_encoder.forward_vendor(batch.global_views, batch.crops, spatial), reference)
    # SGLang hands tile counts over in the vision dtype
    check(tiny_encoder.forward_vendor(batch.global_views, batch.crops, spatial.to(torch.bfloat16)), reference)


def test_flat_layout_without_any_crops(tiny_encoder, batch, reference):
    got = tiny_encoder.forward_vendor(batch.global_views[:1], torch.zeros(0, 3, S, S), torch.tensor([[1, 1]]))
    check(got, reference[:1])


def test_grid_decides_in_both_layouts(tiny_encoder, batch):
    """All-zero crops with a 2x1 grid: both layouts take the crops the grid says (no pixel sum decides), as the
    vendor's processor pairs a grid other than 1x1 with real crops."""
    zeros = torch.zeros(2, 3, S, S)
    glob = batch.global_views[1:2]
    flat = tiny_encoder.forward_vendor(glob, zeros, torch.tensor([[2, 1]]))[0]
    per_image = tiny_encoder.forward_vendor(glob[:, None], zeros[None, None], torch.tensor([[[2, 1]]]))[0]
    assert flat.shape[0] == per_image.shape[0] == batch.layouts[1].tokens      # 2x1 grid: local rows included
    with torch.no_grad():
        want = image_tokens(tiny_encoder, zeros, glob[0], (2, 1))
    assert_close(flat, want, atol=1e-5, rtol=1e-5, what="all-zero crops, flat layout")
    assert_close(per_image, want, atol=1e-5, rtol=1e-5, what="all-zero crops, per-image layout")


def zero_sum_batches():
    """Pages whose crops sum to exactly 0 in the vendor's tensors, where the vendor's `sum != 0` test would drop
    them: crops of +1 and -1 in equal numbers (normalised floats), and a black page (uint8 crops: all 0)."""
    page_ = preprocess([page(1300, 650, seed=5), page(1950, 1300, seed=6)], TINY_MODE)
    signs = torch.ones_like(page_.crops)
    signs[..., ::2, :] = -1                                   # every other pixel row: sum 0 exactly
    floats = Batch(page_.global_views, signs, page_.layouts, TINY_MODE)
    black = Image.new("RGB", (1300, 650))
    uint8 = Batch.from_views([image_views(black, TINY_MODE), image_views(page(700, 2100, 7), TINY_MODE)], TINY_MODE)
    return {"floats": floats, "uint8 black page": uint8}


@pytest.mark.parametrize("kind", ["floats", "uint8 black page"])
def test_zero_sum_crops_keep_their_crops(tiny_encoder, kind):
    b = zero_sum_batches()[kind]
    pv, ic, sc = b.to_vendor()
    assert float(ic[0].double().sum()) == 0 and b.grids[0] == (2, 1)
    with torch.no_grad():
        want = tiny_encoder(b).split()
    assert [t.shape[0] for t in want] == b.tokens and b.tokens[0] > 21            # 21: the global view alone
    check(tiny_encoder.forward_vendor(pv, ic, sc), want)                          # the round trip
    crops = [c[None] for c in torch.split(b.crops, b.n_crops)]                    # per-image lists
    check(tiny_encoder.forward_vendor([g[None] for g in b.global_views], crops, [s for s in sc]), want)


def test_large_grid_and_uint8_pixels(tiny_encoder):
    """A 4x3 grid (12 crops: derived models such as Unlimited-OCR allow more than 9) and uint8 pixels."""
    g = torch.Generator().manual_seed(3)
    glob = torch.randint(0, 256, (1, 3, B, B), generator=g, dtype=torch.uint8)
    crops = torch.randint(0, 256, (12, 3, S, S), generator=g, dtype=torch.uint8)
    to_float = lambda x: x.float() / 255 * 2 - 1
    got = tiny_encoder.forward_vendor(glob, crops, torch.tensor([[4, 3]]))
    got_float = tiny_encoder.forward_vendor(to_float(glob), to_float(crops), torch.tensor([[4, 3]]))
    with torch.no_grad():
        want = image_tokens(tiny_encoder, to_float(crops), to_float(glob)[0], (4, 3))
    assert got[0].shape[0] == (3 * 3) * (4 * 3 + 1) + 4 * 5 + 1
    check(got, [want])
    check(got_float, [want])


def bad_inputs(batch):
    pv, ic, sc = batch.to_vendor()
    flat_sc = torch.tensor([list(g) for g in batch.grids])
    gv, crops = batch.global_views, batch.crops
    lists = [g[None] for g in gv], [c[None] for c in ic[:, 0]], [s for s in sc]
    meta = lambda x: torch.empty(x.shape, device="meta")
    one_by_one = torch.tensor([[[1, 1]]] * 4)
    return {
        "counts": ((pv, ic[:2], sc), ValueError, "same number of images, got 4, 2, 4"),
        "empty lists": (([], [], []), ValueError, "holds no images"),
        "0-d": ((torch.tensor(1.0), ic, sc), ValueError, "0-d tensor"),
        "not a tensor": (("x", ic, sc), TypeError, "expected a tensor or a list"),
        "int pixels": ((pv.to(torch.int32), ic, sc), TypeError, "floating-point"),
        "bool tiles": ((gv, crops, flat_sc.bool()), TypeError, "integer tile counts"),
        "meta pixels": ((meta(pv), ic, sc), ValueError, "meta tensor"),
        "meta flat crops": ((gv, meta(crops), flat_sc), ValueError, "meta tensor"),
        "meta tiles": ((gv, crops, meta(flat_sc)), ValueError, "meta tensor"),
        "zero-size views": ((torch.zeros(4, 3, 0, 0), crops, flat_sc), ValueError, "view size=0"),
        "view not a multiple of 64": ((gv[..., :100, :100], crops, flat_sc), ValueError, "multiple of 64"),
        "non-square views": ((gv[..., :192], crops, flat_sc), ValueError, "square"),
        "per-image shape": ((pv[:, 0][:, None, None], ic, sc), ValueError, "expected [1, 3, *, *]"),
        "flat crop count": ((gv, crops[:-1], flat_sc), ValueError, "has 10 crops, images_spatial_crop asks for 11"),
        "flat tiles shape": ((gv, crops, sc), ValueError, "expected a tensor [n, 2]"),
        "too few crops": ((pv, ic, torch.tensor([[[3, 3]]] * 4)), ValueError, "holds 6 crops for a 3x3 grid"),
        "crops for a 1x1 grid": ((pv, ic, one_by_one), ValueError, "not all zeros for a 1x1 grid"),
        "zero-sum crops for a 1x1 grid": ((pv, torch.cat([ic[:, :, :1], -ic[:, :, :1]], 2), one_by_one), ValueError,
                                          "not all zeros for a 1x1 grid"),
        "tiles past int64": ((lists[0], lists[1], [[2 ** 70, 1]] * 4), ValueError, "expected integer tile counts"),
        "three tile numbers": ((gv, crops, torch.ones(4, 3)), ValueError, "expected a tensor [n, 2]"),
        "fractional tiles": ((gv, crops, flat_sc + 0.5), ValueError, "expected 2 integers"),
        "zero tiles": ((gv, crops, torch.tensor([[1, 0]] * 4)), ValueError, "tiles=0"),
        "mixed dtypes": (([lists[0][0].half()] + lists[0][1:], lists[1], lists[2]), ValueError, "mixes"),
        "mixed sizes": (([lists[0][0][..., :192, :192]] + lists[0][1:], lists[1], lists[2]), ValueError,
                        "views of sizes"),
    }


BAD_CASES = ["counts", "empty lists", "0-d", "not a tensor", "int pixels", "bool tiles", "meta pixels",
             "meta flat crops", "meta tiles", "zero-size views", "view not a multiple of 64", "non-square views",
             "per-image shape", "flat crop count", "flat tiles shape", "too few crops", "crops for a 1x1 grid",
             "zero-sum crops for a 1x1 grid", "tiles past int64", "three tile numbers", "fractional tiles",
             "zero tiles", "mixed dtypes", "mixed sizes"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_one_line_error(tiny_encoder, batch, case):
    args, exc, match = bad_inputs(batch)[case]
    with pytest.raises(exc, match=re.escape(match)) as info:
        tiny_encoder.forward_vendor(*args)
    message = str(info.value)
    assert "\n" not in message and "Mode" not in message, message
    assert message.startswith("forward_vendor:"), message


def test_bad_backend(tiny_encoder, batch):
    with pytest.raises(ValueError, match="backend"):
        tiny_encoder.forward_vendor(*batch.to_vendor(), backend="cuda")
