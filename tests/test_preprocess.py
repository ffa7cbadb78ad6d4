import io
import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from gundam import MODES, Batch, Mode, count_image_tokens, crop_grid, preprocess
from gundam import images
from gundam.config import MAX_CROPS, MIN_CROPS, resolve_mode
from gundam.layout import image_layout


def brute_force_grid(width, height, image_size, min_crops, max_crops):
    """The vendor's rule restated: closest aspect ratio; on an exact tie the later candidate (by tile count,
    then the vendor's set order) wins if the image area exceeds half the candidate's pixel area."""
    order = sorted(set((i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1)
                       for j in range(1, n + 1) if min_crops <= i * j <= max_crops), key=lambda g: g[0] * g[1])
    diffs = [abs(width / height - i / j) for i, j in order]
    best = min(diffs)
    ties = [g for g, d in zip(order, diffs) if d == best]
    choice = ties[0]
    for g in ties[1:]:
        if width * height > 0.5 * image_size * image_size * g[0] * g[1]:
            choice = g
    return choice


@pytest.mark.parametrize("max_crops", [6, 9])
def test_crop_grid_sweep(max_crops):
    rng = random.Random(max_crops)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(3000)]
    sizes += [(w, h) for w in range(600, 700, 7) for h in range(100, 4000, 173)]
    for w, h in sizes:
        got = crop_grid(w, h, "gundam", max_crops)
        if w <= 640 and h <= 640:
            assert got == (1, 1), (w, h)
        else:
            assert got == brute_force_grid(w, h, 640, 2, max_crops), (w, h, got)
            assert 2 <= got[0] * got[1] <= max_crops


@pytest.mark.parametrize("size,max_crops,grid", [
    ((1250, 1000), 6, (3, 2)),   # aspect 1.25: exactly between 2x2 and 3x2; area 1.25M > 0.5*640^2*6
    ((1125, 900), 6, (2, 2)),    # same aspect, area 1.01M < 1.23M: the earlier candidate stays
    ((2000, 1000), 9, (4, 2)),   # 2x1 and 4x2 tie exactly; area 2M > 0.5*640^2*8
    ((1800, 900), 9, (2, 1)),    # area 1.62M < 1.64M
    ((2000, 1000), 6, (2, 1)),   # 4x2 is not a candidate with max 6
    ((1000, 1000), 6, (2, 2)),
    ((3000, 1000), 6, (3, 1)),
    ((1000, 3000), 9, (1, 3)),
    ((3000, 800), 6, (4, 1)),
    ((1900, 1250), 6, (3, 2)),
])
def test_crop_grid_ties_and_known(size, max_crops, grid):
    assert crop_grid(*size, "gundam", max_crops) == grid


def test_small_image_rule_and_crop_mode_off():
    assert crop_grid(640, 640) == (1, 1)
    assert crop_grid(641, 640) != (1, 1)
    assert crop_grid(640, 641) != (1, 1)
    assert crop_grid(10, 5000) == (1, 6) and crop_grid(10, 5000, max_crops=9) == (1, 9)
    for name in ("tiny", "small", "base", "large"):
        assert crop_grid(3000, 2000, name) == (1, 1)
    # the 640 rule is the vendor's literal, not the mode's crop size
    assert crop_grid(900, 900, "gundam-m") == (2, 2)
    assert crop_grid(600, 600, "gundam-m") == (1, 1)


@pytest.mark.parametrize("mode,size,tokens", [
    ("gundam", (600, 400), 273), ("gundam", (1280, 640), 210 + 273), ("gundam", (1000, 1000), 693),
    ("gundam", (1900, 1250), 893), ("base", (1900, 1250), 273), ("tiny", (3000, 100), 73),
    ("small", (800, 800), 111), ("large", (2000, 2000), 421), ("gundam-m", (600, 600), 421),
    ("gundam-m", (1000, 1000), 421 + (2 * 16) * (2 * 16 + 1)),
])
def test_token_counts(mode, size, tokens):
    assert count_image_tokens(*size, mode) == tokens


def test_token_formula_every_mode():
    for name, mode in MODES.items():
        qb, qi = mode.base_size // 64, mode.image_size // 64
        for w, h in [(300, 300), (700, 500), (1000, 1500), (2000, 3000), (3000, 800), (5000, 700)]:
            lay = image_layout(w, h, name)
            gw, gh = lay.grid
            crops = (gw, gh) != (1, 1)
            if mode.family == "deepseek-ocr":    # rows of tokens, each with a newline
                assert lay.tokens == qb * (qb + 1) + ((gh * qi) * (gw * qi + 1) if crops else 0) + 1
            else:                                # DeepSeek-OCR 2: no newlines
                assert lay.tokens == qb * qb + (gw * gh * qi * qi if crops else 0) + 1
            assert lay.n_crops == (gw * gh if (gw, gh) != (1, 1) else 0)


def test_mode_validation():
    with pytest.raises(ValueError, match="unknown mode"):
        resolve_mode("huge")
    for bad in (1, 10, 0, "6", 2.5):
        with pytest.raises(ValueError, match="max_crops"):
            resolve_mode("gundam", bad)
    with pytest.raises(ValueError, match="multiple of 64"):
        Mode(1000, 640, True)
    assert resolve_mode("gundam", 9).max_crops == 9 and resolve_mode("gundam", np.int64(3)).max_crops == 3
    with pytest.raises(ValueError, match="width"):
        crop_grid(0, 100)
    # one set of crop limits everywhere: a Mode cannot allow what resolve_mode refuses
    assert (MIN_CROPS, MAX_CROPS) == (2, 9)
    for lo, hi in ((1, 6), (2, 10), (5, 4)):
        with pytest.raises(ValueError, match="crops"):
            Mode(1024, 640, True, lo, hi)


def test_pixels_global_view_and_crops():
    # 1280x640 in gundam mode: grid 2x1, the resize to 1280x640 is the identity, so crops are exact halves
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (640, 1280, 3), dtype=np.uint8)
    b = preprocess(Image.fromarray(arr), "gundam")
    assert b.grids == [(2, 1)] and b.crops.shape == (2, 3, 640, 640) and b.global_views.shape == (1, 3, 1024, 1024)
    expect = torch.from_numpy(arr).permute(2, 0, 1).double() / 255 * 2 - 1
    torch.testing.assert_close(b.crops[0].double(), expect[:, :, :640], atol=1e-6, rtol=0)
    torch.testing.assert_close(b.crops[1].double(), expect[:, :, 640:], atol=1e-6, rtol=0)
    # global view: resized to 1024x512 and centred with grey (127) bands above and below
    g = b.global_views[0]
    grey = 127 / 255 * 2 - 1
    assert torch.allclose(g[:, :256], torch.full_like(g[:, :256], grey)) and torch.allclose(g[:, 768:], torch.full_like(g[:, 768:], grey))
    ref = np.asarray(Image.fromarray(arr).resize((1024, 512), Image.Resampling.BICUBIC), dtype=np.float64) / 255 * 2 - 1
    torch.testing.assert_close(g[:, 256:768].double(), torch.from_numpy(ref).permute(2, 0, 1), atol=1e-6, rtol=0)


def test_small_mode_resizes_before_pad():
    img = Image.new("RGB", (300, 100), (255, 0, 0))
    b = preprocess(img, "small")
    # resized to 640x640 first: the red fills the whole view, no grey
    assert b.global_views.shape == (1, 3, 640, 640)
    assert torch.allclose(b.global_views[0, 0], torch.ones(640, 640))
    b = preprocess(img, "base")
    assert torch.allclose(b.global_views[0, 0, 0], torch.full((1024,), 127 / 255 * 2 - 1))


def test_to_vendor_shapes():
    imgs = [Image.new("RGB", (1280, 640)), Image.new("RGB", (300, 300)), Image.new("RGB", (1900, 1250), (9, 9, 9))]
    b = preprocess(imgs)
    pv, ic, sc = b.to_vendor()
    assert pv.shape == (3, 1, 3, 1024, 1024)
    assert ic.shape == (3, 1, 6, 3, 640, 640)
    assert sc.tolist() == [[[2, 1]], [[1, 1]], [[3, 2]]]
    assert ic[1].abs().sum() == 0 and ic[0, 0, 2:].abs().sum() == 0
    torch.testing.assert_close(ic[2, 0], b.crops[2:8])
    b1 = preprocess(imgs[1])
    assert b1.to_vendor()[1].shape == (1, 1, 1, 3, 640, 640)


@pytest.mark.parametrize("pil_mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "1", "F"])
def test_any_pil_mode(pil_mode, tmp_path):
    img = Image.new("RGB", (700, 900), (10, 200, 30)).convert(pil_mode)
    b = preprocess(img)
    assert b.global_views.shape == (1, 3, 1024, 1024) and b.grids == [crop_grid(700, 900)]
    assert torch.isfinite(b.global_views).all()


def test_exif_transpose(tmp_path):
    img = Image.new("RGB", (200, 100), (255, 255, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 200x100, shown 100x200
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert preprocess(path).sizes == [(100, 200)]


def test_bad_files(tmp_path, monkeypatch):
    text = tmp_path / "a.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        preprocess(text)
    with pytest.raises(ValueError, match="no such file"):
        preprocess(tmp_path / "missing.png")
    buf = io.BytesIO()
    Image.new("RGB", (800, 800), (1, 2, 3)).save(buf, format="PNG")
    trunc = tmp_path / "t.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cannot decode"):
        preprocess(trunc)
    with pytest.raises(ValueError, match="non-empty"):
        preprocess(Image.new("RGB", (0, 10)))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="at most 1000"):
        preprocess(Image.new("RGB", (40, 40)))
    with pytest.raises(TypeError, match="expected a PIL image or a path"):
        preprocess([123])
    with pytest.raises(ValueError, match="no images"):
        preprocess([])


def test_batch_fields():
    imgs = [Image.new("RGB", (1000, 1000)), Image.new("RGB", (500, 500)), Image.new("RGB", (3000, 1000))]
    b = preprocess(imgs)
    assert isinstance(b, Batch)
    assert b.grids == [(2, 2), (1, 1), (3, 1)] and b.n_crops == [4, 0, 3] and b.tokens == [693, 273, 273 + 10 * 31]
    assert b.crops.shape[0] == 7
    assert math.isclose(b.global_views.min().item(), -1.0)
