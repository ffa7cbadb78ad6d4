"""Hostile and unusual inputs through the API and the CLI: each gets a one-line error naming the bad value (CLI:
`error: ...`, exit code 2) or the exactly right result. Files are generated in tmp_path; whatever is encoded goes
through MICRO, an encoder smaller still than testutils.TINY."""
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps, PngImagePlugin
from safetensors.torch import load_file, save_file

import gundam
from gundam import Batch, EncoderConfig, GundamEncoder, Mode, count_image_tokens, crop_grid, preprocess
from gundam.cli import main, parse_size
from gundam.config import ClipConfig, SamConfig, resolve_mode
from gundam.cost import estimate
from gundam.images import image_views, load_image
from gundam.layout import candidate_grids, grid_layout, image_layout
from testutils import MICRO, TINY_MODE, randomize

# ----------------------------------------------------------------------------------------------------------
# generated files

def noise(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def encoded(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def png_header(width, height) -> bytes:
    """A PNG that is only a header declaring width x height RGB pixels (no data)."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def rotated_jpeg(path, orientation, size=(900, 700)):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(noise(*size)).save(path, exif=exif, quality=95)
    return path


@pytest.fixture
def files(tmp_path):
    """name -> path of every kind of bad or unusual file."""
    f = {}
    good = Image.fromarray(noise(300, 200))
    f["good"] = tmp_path / "good.png"
    good.save(f["good"])
    f["text"] = tmp_path / "text.png"
    f["text"].write_text("not an image")
    f["empty"] = tmp_path / "empty.png"
    f["empty"].write_bytes(b"")
    png, jpg = encoded(Image.fromarray(noise(400, 300)), "PNG"), encoded(Image.fromarray(noise(400, 300)), "JPEG")
    f["trunc_png"] = tmp_path / "trunc.png"
    f["trunc_png"].write_bytes(png[:len(png) // 2])
    f["trunc_jpg"] = tmp_path / "trunc.jpg"
    f["trunc_jpg"].write_bytes(jpg[:len(jpg) // 2])
    f["huge_header"] = tmp_path / "huge_header.png"
    f["huge_header"].write_bytes(png_header(100_000, 100_000))
    info = PngImagePlugin.PngInfo()
    info.add_text("comment", "a" * (PngImagePlugin.MAX_TEXT_CHUNK + 1), zip=True)  # compresses to ~1 kB
    f["text_bomb"] = tmp_path / "text_bomb.png"
    Image.new("RGB", (8, 8)).save(f["text_bomb"], pnginfo=info)
    f["dir"] = tmp_path / "adir"
    f["dir"].mkdir()
    f["loop"] = tmp_path / "loop.png"
    os.symlink(tmp_path / "loop.png", f["loop"])
    f["dangling"] = tmp_path / "dangling.png"
    os.symlink(tmp_path / "nowhere.png", f["dangling"])
    f["missing"] = tmp_path / "missing.png"
    f["fifo"] = tmp_path / "fifo.png"
    os.mkfifo(f["fifo"])  # opening it would block forever
    return f


# ----------------------------------------------------------------------------------------------------------
# image files: a ValueError naming the file

@pytest.mark.parametrize("name,match", [
    ("text", "not an image file"), ("empty", "empty file"), ("trunc_png", "cannot decode"),
    ("trunc_jpg", "cannot decode"), ("huge_header", "too many pixels"), ("text_bomb", "MAX_TEXT_CHUNK"),
    ("dir", "is a directory"), ("loop", "broken, or a loop"), ("dangling", "broken, or a loop"),
    ("missing", "no such file"), ("fifo", "not a regular file"),
])
def test_bad_image_files(files, name, match):
    path = str(files[name])
    with pytest.raises(ValueError, match=match) as e:
        preprocess(path)
    assert path in str(e.value) and "\n" not in str(e.value)


def test_truncated_pil_image_names_its_file(files):
    image = Image.open(files["trunc_jpg"])  # lazily opened: the data is decoded later
    with pytest.raises(ValueError, match=re.escape(str(files["trunc_jpg"])) + ".*cannot decode"):
        preprocess(image)


def test_closed_pil_image():
    image = Image.open(io.BytesIO(encoded(Image.new("RGB", (20, 20)), "PNG")))
    image.close()
    with pytest.raises(ValueError, match="cannot decode"):
        load_image(image)


@pytest.mark.parametrize("source,match", [
    (b"page.png", "bytes"), (123, "int"), (None, "NoneType"), (3.5, "float"), ([b"page.png"], "bytes"),
    ([None], "NoneType"), (np.zeros((64, 64, 3), np.uint8), "ndarray"), (torch.zeros(3, 64, 64), "Tensor"),
])
def test_not_an_image_is_a_type_error(source, match):
    with pytest.raises(TypeError, match=f"{match}.*expected a PIL image or a path"):
        preprocess(source)


def test_empty_and_zero_size_images():
    with pytest.raises(ValueError, match="no images"):
        preprocess([])
    with pytest.raises(ValueError, match="size 0x10: expected a non-empty image"):
        preprocess(Image.new("RGB", (0, 10)))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_one_path(tmp_path, capsys, orientation):
    """preprocess and `gundam tokens` see the same upright image (one opening path)."""
    path = rotated_jpeg(tmp_path / f"o{orientation}.jpg", orientation)
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    assert upright.size == ((700, 900) if orientation >= 5 else (900, 700))
    image = load_image(path)
    assert image.size == upright.size and np.array_equal(np.asarray(image), np.asarray(upright))
    batch = preprocess(path)
    assert batch.sizes == [upright.size] and batch.grids == [crop_grid(*upright.size)]
    assert main(["tokens", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"{path}: {upright.size[0]}x{upright.size[1]}" in out
    assert f"gundam    grid {batch.grids[0][0]}x{batch.grids[0][1]}  crops {batch.n_crops[0]}  " \
           f"tokens {batch.tokens[0]}" in out


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16_bit_grey_is_scaled_not_clipped(tmp_path, fmt):
    values = np.array([[0, 1, 128, 257, 32767, 32896, 65279, 65535]], dtype=np.uint16)
    path = tmp_path / f"g16.{fmt.lower()}"
    Image.fromarray(values).save(path, fmt)
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(load_image(path))
    want = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert np.array_equal(got[..., 0], want) and np.array_equal(got[..., 1], want) and np.array_equal(got[..., 2], want)


def test_32_bit_int_image_is_clipped_to_16_bits_then_scaled():
    image = Image.fromarray(np.array([[-5, 0, 65535, 70000, 2 ** 31 - 1]], dtype=np.int32))
    assert image.mode == "I"
    assert np.asarray(load_image(image))[0, :, 0].tolist() == [0, 0, 255, 255, 255]


def test_palette_with_transparency_drops_alpha_like_convert(tmp_path):
    image = Image.new("P", (30, 20))
    image.putpalette([255, 0, 0, 0, 255, 0] * 128)
    image.paste(1, (0, 0, 10, 20))
    path = tmp_path / "pal.png"
    image.save(path, transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning leaks out (it would land in the CLI's progress bar)
        got = load_image(path)
    assert np.array_equal(np.asarray(got), np.asarray(Image.open(path).convert("RGB")))
    assert got.getpixel((0, 0)) == (0, 255, 0) and got.getpixel((29, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["CMYK", "RGBA", "LA", "L", "1", "YCbCr"])
def test_other_modes_equal_pil_convert(tmp_path, mode):
    path = tmp_path / f"m.{'jpg' if mode in ('CMYK', 'YCbCr') else 'png'}"
    Image.fromarray(noise(50, 40)).convert(mode).save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(Image.open(path).convert("RGB")))


def test_unconvertible_mode():
    with pytest.raises(ValueError, match="PIL image: cannot convert PIL mode La to RGB"):
        load_image(Image.new("La", (4, 4)))


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (700, 650), c) for c in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    glob, crops, layout = image_views(path, resolve_mode("gundam"))
    assert layout.grid == crop_grid(700, 650) and crops.shape[0] == layout.n_crops
    assert (crops[:, 0] == 255).all() and (crops[:, 1:] == 0).all()


def test_extreme_aspect_and_one_pixel_images():
    thin = preprocess(Image.new("RGB", (1, 100_000), (200, 10, 10)))
    assert thin.grids == [(1, 6)] and thin.tokens == [count_image_tokens(1, 100_000)]
    assert thin.crops.shape == (6, 3, 640, 640)
    dot = gundam.preprocess(Image.new("RGB", (1, 1), (255, 0, 0)))
    assert dot.grids == [(1, 1)] and dot.tokens == [273]
    assert (dot.global_views[0, 0] == 1).all() and (dot.global_views[0, 1:] == -1).all()  # pad scales 1x1 up


# ----------------------------------------------------------------------------------------------------------
# numbers: exact, or a ValueError naming the value

def vendor_grid(width, height, image_size=640, min_crops=2, max_crops=6):
    """The vendor's float rule, as written there."""
    order = sorted(set((i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1)
                       for j in range(1, n + 1) if min_crops <= i * j <= max_crops), key=lambda g: g[0] * g[1])
    best_diff, best = float("inf"), (1, 1)
    for w, h in order:
        diff = abs(width / height - w / h)
        if diff < best_diff:
            best_diff, best = diff, (w, h)
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * w * h:
            best = (w, h)
    return best


@pytest.mark.parametrize("size,grid", [
    ((10 ** 20, 1), (6, 1)), ((1, 10 ** 20), (1, 6)), ((10 ** 400, 1), (6, 1)), ((7, 10 ** 400), (1, 6)),
    # just below the midpoint of 2/3 and 1: exactly nearer 2/3 (floats round it onto the midpoint)
    ((5 * 10 ** 20 - 1, 6 * 10 ** 20), (2, 3)),
    ((10 ** 30 + 1, 10 ** 30), (2, 2)),
])
def test_crop_grid_exact_at_absurd_sizes(size, grid):
    assert crop_grid(*size) == grid
    lay = image_layout(*size)
    assert lay.tokens == count_image_tokens(*size) == 273 + (grid[1] * 10) * (grid[0] * 10 + 1)


@pytest.mark.parametrize("size,max_crops", [
    ((1500, 1800), 6), ((1080, 2592), 6), ((1000, 2400), 6), ((3500, 600), 6), ((1300, 1560), 9), ((700, 2400), 9),
])
def test_exact_ties_keep_the_vendors_choice(size, max_crops):
    # these aspect ratios lie exactly midway between two candidates; the vendor's floats pick one side
    assert crop_grid(*size, max_crops=max_crops) == vendor_grid(*size, max_crops=max_crops)


def test_every_exact_midpoint_keeps_the_vendors_choice():
    for max_crops in range(2, 10):
        ratios = sorted({Fraction(w, h) for w, h in candidate_grids(2, max_crops)})
        for a, b in zip(ratios, ratios[1:]):
            mid = (a + b) / 2
            for k in (700, 1000, 5000, 10 ** 15):  # sides above 640; areas either side of the tie's area rule
                w, h = mid.numerator * k, mid.denominator * k
                assert crop_grid(w, h, max_crops=max_crops) == vendor_grid(w, h, max_crops=max_crops), (w, h)


def test_numpy_integers_are_ints():
    assert crop_grid(np.int64(2000), np.int32(1000), max_crops=np.int16(9)) == crop_grid(2000, 1000, max_crops=9)
    assert count_image_tokens(np.uint16(1900), np.int64(1250)) == 893
    assert Mode(np.int64(1024), np.int32(640), True).qb == 16
    assert SamConfig(global_attn_indexes=(np.int64(2), 5, 8, 11)).global_attn_indexes == (2, 5, 8, 11)
    r = estimate(np.int64(2000), np.int64(3000), batch=np.int64(2))
    assert r.total.matmul_flops == estimate(2000, 3000, batch=2).total.matmul_flops


@pytest.mark.parametrize("width,height,match", [
    (2000.0, 1000, "width=2000.0"), (True, 1000, "width=True"), (-5, 10, "width=-5"), (10, 0, "height=0"),
    ("100", 10, "width='100'"), (None, 10, "width=None"), (float("nan"), 10, "width=nan"),
])
def test_bad_sizes(width, height, match):
    with pytest.raises(ValueError, match=re.escape(match) + ": expected an integer"):
        crop_grid(width, height)


def test_huge_numbers_stay_one_short_line():
    with pytest.raises(ValueError, match=r"width=-1000000000000000000\.\.\.\(402 chars\)") as e:
        crop_grid(-(10 ** 400), 5)
    assert len(str(e.value)) < 120


@pytest.mark.parametrize("kwargs,match", [
    (dict(width=10 ** 20, height=1), "pixels, expected at most 200000000"),
    (dict(width=10 ** 400, height=1), r"image 10000000000000000000\.\.\.\(401 chars\)x1"),
    (dict(width=20000, height=20000), "400000000 pixels"),
    (dict(width=1000, height=1000, batch=10 ** 400), "batch="),
    (dict(width=1000, height=1000, batch=2.0), "batch=2.0"),
    (dict(width=1000.5, height=1000), "width=1000.5"),
])
def test_estimate_absurd_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        estimate(**kwargs)


def test_estimate_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="config of type dict"):
        estimate(1000, 1000, config={})


@pytest.mark.parametrize("make,match", [
    (lambda: resolve_mode("gundam", 10), "max_crops=10"), (lambda: resolve_mode("gundam", True), "max_crops=True"),
    (lambda: resolve_mode("gundam", 6.0), "max_crops=6.0"), (lambda: resolve_mode("Gundam"), "unknown mode 'Gundam'"),
    (lambda: Mode(1024, 640, 1), "crop_mode=1"),
    (lambda: Mode(2 ** 200, 640, True),
     r"base_size=16069380442589902755\.\.\.\(61 chars\): expected a view of at most"),
    (lambda: SamConfig(mlp_ratio=float("inf")), "mlp_ratio=inf"), (lambda: SamConfig(mlp_ratio="4"), "mlp_ratio='4'"),
    (lambda: SamConfig(mlp_ratio=1e-9), "MLP of 0 units"), (lambda: SamConfig(layer_norm_eps=float("nan")), "eps=nan"),
    (lambda: SamConfig(global_attn_indexes=(2, 12)), r"\[12\] outside"),
    (lambda: SamConfig(global_attn_indexes=5), "global_attn_indexes=5"),
    # every token count (Mode, count_image_tokens, the cost model) is at 64 px per token: 16 px patches
    (lambda: SamConfig(img_size=960, patch_size=48), "patch_size=48: expected 16"),
    (lambda: EncoderConfig(sam=SamConfig(img_size=1008, patch_size=14)), "patch_size=14: expected 16"),
    (lambda: ClipConfig(layernorm_epsilon=-1), "layernorm_epsilon=-1"),
    (lambda: grid_layout(TINY_MODE, (0, 2)), "w_tiles=0"), (lambda: grid_layout(TINY_MODE, "2x2"), "grid='2x2'"),
])
def test_bad_modes_and_configs(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_config_of_the_wrong_type():
    with pytest.raises(TypeError, match="EncoderConfig.sam of type str"):
        EncoderConfig(sam="vit-b")
    with pytest.raises(TypeError, match="config of type dict: expected an EncoderConfig"):
        GundamEncoder({"sam": {}})
    with pytest.raises(ValueError, match="backend='cuda'"):
        GundamEncoder(MICRO, backend="cuda")


# ----------------------------------------------------------------------------------------------------------
# hand-made batches: checked when built

@pytest.fixture(scope="module")
def tiny_batch():
    return preprocess([Image.fromarray(noise(900, 460, 1)), Image.fromarray(noise(300, 300, 2))], TINY_MODE)


def test_tiny_batch_has_crops(tiny_batch):
    assert tiny_batch.n_crops == [2, 0] and tiny_batch.crops.shape == (2, 3, 192, 192)


@pytest.mark.parametrize("change,error,match", [
    (lambda b: dict(global_views=b.global_views[:1]), ValueError,
     r"global_views: shape \[1, 3, 256, 256\], expected \[2, 3, 256, 256\]"),
    (lambda b: dict(crops=b.crops[:1]), ValueError, r"crops: shape \[1, 3, 192, 192\], expected \[2, .*\[2, 0\]"),
    (lambda b: dict(crops=torch.cat([b.crops, b.crops])), ValueError, r"crops: shape \[4,"),
    (lambda b: dict(global_views=b.global_views[..., :128, :128]), ValueError, r"shape \[2, 3, 128, 128\]"),
    (lambda b: dict(global_views=b.global_views[0]), ValueError, r"shape \[3, 256, 256\]"),
    (lambda b: dict(crops=b.crops.to(torch.int64)), TypeError, "crops: dtype torch.int64"),
    (lambda b: dict(global_views=b.global_views > 0), TypeError, "torch.bool"),
    (lambda b: dict(global_views=b.global_views.numpy()), TypeError, "global_views of type ndarray"),
    (lambda b: dict(layouts=[]), ValueError, "no layouts"),
    (lambda b: dict(layouts=b.layouts[0]), TypeError, "layouts of type ImageLayout"),
    (lambda b: dict(layouts=[b.layouts[0], (2, 1)]), TypeError, r"layouts\[1\] of type tuple"),
    (lambda b: dict(layouts=[b.layouts[0], image_layout(300, 300, "gundam")]), ValueError, r"layouts\[1\] has Mode"),
    (lambda b: dict(layouts=[b.layouts[0], grid_layout(b.mode, (2, 1))]), ValueError, r"crops: shape \[2,.*\[2, 2\]"),
    (lambda b: dict(mode="gundam"), ValueError, r"layouts\[0\] has Mode"),
    (lambda b: dict(mode=42), TypeError, "mode=42"),
])
def test_inconsistent_batches(tiny_batch, change, error, match):
    fields = dict(global_views=tiny_batch.global_views, crops=tiny_batch.crops, layouts=tiny_batch.layouts,
                  mode=tiny_batch.mode)
    with pytest.raises(error, match=match):
        Batch(**{**fields, **change(tiny_batch)})


def test_hand_made_layout_with_wrong_tokens(tiny_batch):
    import dataclasses
    bad = dataclasses.replace(tiny_batch.layouts[1], tokens=99)
    with pytest.raises(ValueError, match=r"layouts\[1\] = .*inconsistent"):
        Batch(tiny_batch.global_views, tiny_batch.crops, [tiny_batch.layouts[0], bad], tiny_batch.mode)
    with pytest.raises(TypeError, match="torch.int32"):
        tiny_batch.to(dtype=torch.int32)


@pytest.fixture(scope="module")
def tiny_encoder():
    return randomize(GundamEncoder(MICRO, backend="torch"), seed=3).eval()


@pytest.mark.parametrize("value,match", [(float("nan"), "NaN"), (float("inf"), "Inf"), (-float("inf"), "Inf"),
                                         (255.0, r"\|value\| up to 255")])
def test_non_finite_or_unnormalised_pixels(tiny_encoder, tiny_batch, value, match):
    for field in ("global_views", "crops"):
        views = getattr(tiny_batch, field).clone()
        views[-1, 1, 7, 9] = value
        batch = Batch(**{**vars(tiny_batch), field: views})
        with pytest.raises(ValueError, match=f"batch {field}: {match}.*expected normalised pixels in \\[-1, 1\\]"):
            tiny_encoder(batch)


def test_meta_batch_only_with_a_meta_encoder(tiny_encoder, tiny_batch):
    with pytest.raises(ValueError, match=r"batch global_views is a meta tensor \(no data\), the encoder is on cpu"):
        tiny_encoder(tiny_batch.to("meta"))
    with torch.device("meta"):
        meta_encoder = GundamEncoder(MICRO, backend="torch")
    out = meta_encoder(tiny_batch.to("meta"))   # counting FLOPs: shapes only
    assert out.embeddings.is_meta and out.embeddings.shape == (sum(tiny_batch.tokens), 40)


def test_forward_type_checks(tiny_encoder, tiny_batch):
    with pytest.raises(TypeError, match="batch of type list: expected a gundam.Batch"):
        tiny_encoder([tiny_batch])
    with pytest.raises(ValueError, match="backend='gpu'"):
        tiny_encoder(tiny_batch, backend="gpu")


# ----------------------------------------------------------------------------------------------------------
# state: tables cached under inference_mode must not reach autograd

def test_inference_mode_tables_then_autograd():
    enc = randomize(GundamEncoder(MICRO, backend="torch"), seed=4).eval()
    batch = preprocess(Image.fromarray(noise(120, 90)), Mode(192, 192, False))  # one view of a size not 256
    enc.requires_grad_(False)          # frozen encoder: the tables are cached, gradients flow to the pixels
    with torch.inference_mode():
        first = enc(batch).embeddings
    pixels = batch.global_views.clone().requires_grad_(True)
    out = enc(Batch(pixels, batch.crops, batch.layouts, batch.mode)).embeddings
    out.square().sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    torch.testing.assert_close(out.detach(), first, atol=1e-5, rtol=1e-5)
    enc.requires_grad_(True)           # and training the weights after inference also works
    enc(batch).embeddings.sum().backward()
    assert enc.sam_model.pos_embed.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------
# checkpoints

PROJ = "model.projector.layers.weight"


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """The tiny encoder's tensors, vendor names; all but PROJ saved once (checkpoints below link to that file)."""
    enc = randomize(GundamEncoder(MICRO), seed=5)
    state = {"model." + k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}
    rest = tmp_path_factory.mktemp("ckpt") / "rest.safetensors"
    save_file({k: v for k, v in state.items() if k != PROJ}, rest)
    return state, rest


def write_checkpoint(folder, tiny_state, index=None, changed=None):
    """A two-shard checkpoint: the shared file, and PROJ with any `changed` tensors."""
    state, rest = tiny_state
    os.symlink(rest, folder / "model-00001-of-00002.safetensors")
    save_file({PROJ: state[PROJ], **(changed or {})}, folder / "model-00002-of-00002.safetensors")
    if index is not None:
        (folder / "model.safetensors.index.json").write_text(index)
    return folder


@pytest.mark.parametrize("index,match", [
    ("[1, 2, 3]", "weight_map"), ('{"weight_map": ["a"]}', "weight_map"),
    ('{"weight_map": {"model.image_newline": 7}}', "weight_map"), ('{"weight_map": {"x": ""}}', "weight_map"),
    ("{not json", "not a valid JSON"), ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": {"model.layers.0.w": "model-00001.safetensors"}}', "names no encoder tensor"),
])
def test_malformed_index(tmp_path, tiny_state, index, match):
    write_checkpoint(tmp_path, tiny_state, index)
    with pytest.raises(ValueError, match=f"model.safetensors.index.json.*{match}"):
        GundamEncoder.from_pretrained(tmp_path, config=MICRO)


def test_non_floating_and_non_finite_tensors(tmp_path, tiny_state):
    weight = tiny_state[0][PROJ]
    nan, big = weight.clone(), weight.clone()
    nan[3, 4] = float("nan")
    big[0, 0] = 1e6   # finite in fp32, Inf in fp16
    for name, w in (("int", weight.to(torch.int32)), ("nan", nan), ("big", big)):
        (tmp_path / name).mkdir()
        write_checkpoint(tmp_path / name, tiny_state, changed={PROJ: w})
    with pytest.raises(ValueError, match=r"non-floating tensors projector.layers.weight \(torch.int32\)"):
        GundamEncoder.from_pretrained(tmp_path / "int", config=MICRO)
    with pytest.raises(ValueError, match=r"NaN or Inf in projector.layers.weight \(as torch.float32\)"):
        GundamEncoder.from_pretrained(tmp_path / "nan", config=MICRO)
    assert GundamEncoder.from_pretrained(tmp_path / "big", config=MICRO).projector.layers.weight[0, 0] == 1e6
    with pytest.raises(ValueError, match=r"NaN or Inf in projector.layers.weight \(as torch.float16\)"):
        GundamEncoder.from_pretrained(tmp_path / "big", config=MICRO, dtype="fp16")


def test_deeper_checkpoint_than_config(tmp_path, tiny_state):
    extra = {"model.sam_model.blocks.3.mlp.lin1.weight": torch.randn(4, 4),
             "model.vision_model.transformer.layers.2.mlp.fc1.bias": torch.randn(4),
             "model.layers.0.mlp.weight": torch.randn(2)}   # the language model's: never read
    write_checkpoint(tmp_path, tiny_state, changed=extra)
    with pytest.raises(ValueError, match=r"does not use: model.sam_model.blocks.3.mlp.lin1.weight, "
                                         r"model.vision_model.transformer.layers.2.mlp.fc1.bias.*strict=False"):
        GundamEncoder.from_pretrained(tmp_path, config=MICRO)
    enc = GundamEncoder.from_pretrained(tmp_path, config=MICRO, strict=False)
    for k, v in enc.state_dict().items():
        assert torch.equal(v, tiny_state[0]["model." + k]), k


@pytest.mark.parametrize("dtype,want", [
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float32", torch.float32), ("fp32", torch.float32),
    ("float16", torch.float16), ("fp16", torch.float16), ("torch.bfloat16", torch.bfloat16),
    (torch.float16, torch.float16), (torch.float64, torch.float64),
])
def test_dtype_names(tmp_path, tiny_state, dtype, want):
    write_checkpoint(tmp_path, tiny_state)
    enc = GundamEncoder.from_pretrained(tmp_path, config=MICRO, dtype=dtype)
    assert enc.dtype == want and all(p.dtype == want for p in enc.parameters())
    assert torch.equal(enc.image_newline, tiny_state[0]["model.image_newline"].to(want))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(dtype="int8"), ValueError, "dtype='int8': expected a floating torch dtype"),
    (dict(dtype=torch.int64), ValueError, "dtype=torch.int64"), (dict(dtype=None), ValueError, "dtype=None"),
    (dict(device="gpu"), ValueError, "device='gpu': expected a device"),
    (dict(device=3.5), ValueError, "device=3.5"), (dict(device="meta"), ValueError, "device='meta'"),
    (dict(config="MICRO"), TypeError, "config of type str"),
])
def test_bad_from_pretrained_arguments(tmp_path, tiny_state, kwargs, error, match):
    write_checkpoint(tmp_path, tiny_state)
    with pytest.raises(error, match=match):
        GundamEncoder.from_pretrained(tmp_path, **{"config": MICRO, **kwargs})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
def test_cuda_without_cuda(tmp_path, tiny_state, capsys, files):
    write_checkpoint(tmp_path, tiny_state)
    with pytest.raises(ValueError, match="device='cuda': not available \\(this torch has no CUDA\\)"):
        GundamEncoder.from_pretrained(tmp_path, config=MICRO, device="cuda")
    assert main(["encode", str(files["good"]), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == "error: device='cuda': not available (this torch has no CUDA)\n"


def test_bad_checkpoint_paths(tmp_path):
    (tmp_path / "part").mkdir()
    save_file({"a": torch.randn(50, 50)}, tmp_path / "part" / "model.safetensors")
    data = (tmp_path / "part" / "model.safetensors").read_bytes()
    (tmp_path / "part" / "model.safetensors").write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors': cannot read as safetensors"):
        GundamEncoder.from_pretrained(tmp_path / "part", config=MICRO)
    with pytest.raises(TypeError, match="checkpoint path of type NoneType"):
        GundamEncoder.from_pretrained(None, config=MICRO)
    with pytest.raises(ValueError, match="no such file or directory"):
        GundamEncoder.from_pretrained(tmp_path / "nope", config=MICRO)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read as safetensors"):
        GundamEncoder.from_pretrained(tmp_path, config=MICRO)


# ----------------------------------------------------------------------------------------------------------
# CLI

def run_cli(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    # error lines start a line of their own: never glued after a progress bar's carriage return
    for piece in re.split(r"[\r\n]", err):
        assert "error:" not in piece or piece.startswith("error: "), err
    return code, out, err


@pytest.fixture
def tiny_cli(monkeypatch):
    """`gundam encode` with the micro encoder (random weights, seed 0, as the CLI makes them)."""
    monkeypatch.setattr(EncoderConfig, "deepseek_ocr", staticmethod(lambda: MICRO))


def test_cli_encode_keeps_the_good_images(tmp_path, files, capsys, tiny_cli):
    good2 = tmp_path / "good2.jpg"
    Image.fromarray(noise(500, 200, 9)).save(good2)
    out = tmp_path / "emb.safetensors"
    code, stdout, err = run_cli(capsys, "encode", files["good"], files["missing"], files["trunc_png"], good2,
                                files["dir"], "--mode", "tiny", "--dtype", "float32", "--batch-size", "2", "--out", out)
    assert code == 2
    for bad in ("missing", "trunc_png", "dir"):
        assert f"error: image {str(files[bad])!r}: " in err
    assert "error: 3 of 5 images failed" in err
    saved = load_file(out)
    assert saved["offsets"].tolist() == [0, 73, 146]
    torch.manual_seed(0)
    enc = GundamEncoder(MICRO).eval()
    with torch.no_grad():  # each in a batch of its own, as the CLI's batches were after the bad ones dropped out
        want = torch.cat([enc(preprocess(p, "tiny")).embeddings for p in (files["good"], good2)])
    assert torch.equal(saved["embeddings"], want)
    from safetensors import safe_open
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["images"].split("\n") == [str(files["good"]), str(good2)]
    assert set(meta["failed"].split("\n")) == {str(files[k]) for k in ("missing", "trunc_png", "dir")}
    assert "(2 of 5 images)" in stdout


@pytest.mark.parametrize("out,match", [
    ("missing_dir/emb.safetensors", "does not exist"), (".", "is a directory"),
    ("good.png/emb.safetensors", "is not a directory"),
])
def test_cli_out_checked_before_encoding(tmp_path, files, capsys, tiny_cli, out, match):
    code, stdout, err = run_cli(capsys, "encode", files["good"], "--mode", "tiny", "--out", tmp_path / out)
    assert code == 2 and stdout == "" and err.startswith("error: --out") and match in err and err.count("\n") == 1


@pytest.mark.parametrize("args,match", [
    (["--device", "tpu9"], "device='tpu9'"), (["--batch-size", "0"], "--batch-size=0"),
    (["--batch-size", "-3"], "--batch-size=-3"), (["--max-crops", "10"], "max_crops=10"),
    (["--max-crops", "1"], "max_crops=1"), (["--weights", "/no/such/checkpoint"], "no such file or directory"),
])
def test_cli_encode_bad_options(files, capsys, tiny_cli, args, match):
    code, stdout, err = run_cli(capsys, "encode", files["good"], "--mode", "tiny", *args)
    assert code == 2 and match in err and err.startswith("error: ") and err.count("\n") == 1


def test_cli_encode_all_bad_builds_no_model(files, capsys, monkeypatch):
    monkeypatch.setattr(GundamEncoder, "__init__", lambda *a, **k: pytest.fail("model built"))
    code, stdout, err = run_cli(capsys, "encode", files["missing"], files["dir"], files["empty"])
    assert code == 2 and stdout == ""
    assert err.count("error: ") == 4 and "3 of 3 images failed" in err


@pytest.mark.parametrize("name,match", [
    ("dir", "is a directory"), ("missing", "no such file, and not an image size"), ("empty", "empty file"),
    ("trunc_jpg", "cannot decode"), ("loop", "broken, or a loop"), ("huge_header", "too many pixels"),
])
def test_cli_tokens_bad_files(files, capsys, name, match):
    code, stdout, err = run_cli(capsys, "tokens", files[name])
    assert code == 2 and stdout == "" and match in err and str(files[name]) in err and err.count("\n") == 1


@pytest.mark.parametrize("item,match", [
    ("12xx4", "'12xx4': no such file, and not an image size"), ("0x5", "'0x5'"), ("3x-5", "'3x-5'"), ("", "''"),
])
def test_cli_tokens_bad_sizes(capsys, item, match):
    code, stdout, err = run_cli(capsys, "tokens", item)
    assert code == 2 and match in err


@pytest.mark.parametrize("side", ["width", "height"])
def test_cli_tokens_size_with_too_many_digits_is_too_large(capsys, side):
    # an image size it is (so not "not an image size"), one Python would not even convert: too large, by name
    digits = "7" * 5001
    item = f"{digits}x10" if side == "width" else f"10x{digits}"
    code, stdout, err = run_cli(capsys, "tokens", item, "3x4")
    assert code == 2 and "3x4: 3x4" in stdout
    assert f"the {side} has 5001 digits, too large: expected at most 4000" in err and "not an image size" not in err
    assert len(err.splitlines()[0]) < 200
    code, stdout, _ = run_cli(capsys, "tokens", "0" * 5000 + "640x480")      # leading zeros are no size
    assert code == 0 and stdout.startswith("0000")
    with pytest.raises(ValueError, match="too large"):
        parse_size(f"{digits}x1")                                           # `gundam cost` parses sizes so too


def test_cli_tokens_absurd_sizes_are_exact(capsys):
    code, stdout, err = run_cli(capsys, "tokens", f"{10 ** 20}x1", f"1x{10 ** 400}", "--max-crops", "9")
    assert code == 0
    # 272 global + (1 * 10) * (9 * 10 + 1) local + 1, and 272 + (9 * 10) * (1 * 10 + 1) + 1
    assert "gundam    grid 9x1  crops 9  tokens 1183" in stdout and "gundam    grid 1x9  crops 9  tokens 1263" in stdout


def test_cli_tokens_file_named_like_a_size(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (300, 200)).save("640x480", "PNG")
    code, stdout, err = run_cli(capsys, "tokens", "640x480")
    assert code == 0 and stdout.startswith("640x480: 300x200\n")


def test_cli_tokens_reports_the_bad_and_prints_the_good(files, capsys):
    code, stdout, err = run_cli(capsys, "tokens", files["missing"], "2000x3000", files["good"])
    assert code == 2 and "2000x3000: 2000x3000" in stdout and f"{files['good']}: 300x200" in stdout
    assert "error: 1 of 3 items failed" in err


def test_cli_tokens_bad_max_crops_before_output(files, capsys):
    code, stdout, err = run_cli(capsys, "tokens", files["good"], "--max-crops", "1")
    assert code == 2 and stdout == "" and "max_crops=1" in err


def test_cli_cost_sweep_into_impossible_path(files, capsys):
    code, stdout, err = run_cli(capsys, "cost", "--sweep", "--out", f"{files['good']}/sweep.csv")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "good.png" in err


def test_cli_bad_mode_is_argparse_usage_error(files, capsys):
    with pytest.raises(SystemExit) as e:
        main(["encode", str(files["good"]), "--mode", "huge"])
    assert e.value.code == 2 and "invalid choice: 'huge'" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# bulk encoding (`gundam encode-dataset`, read_embeddings / read_manifest): bad inputs are recorded and the run
# goes on; bad options, checkpoints and devices fail before anything is written; a folder that is corrupt or of
# another tool is a one-line error naming the file

BULK = dict(config=MICRO, mode="tiny", dtype=torch.float32, workers=0, verbose=False)


def tiny_pdf(objects, trailer=""):
    """A PDF of the given object bodies (numbered from 1, the first the catalog), with a valid xref table."""
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    return out + f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R {trailer}>>\nstartxref\n{xref}\n%%EOF\n".encode()


ZERO_PAGE_PDF = tiny_pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [] /Count 0 >>"])
# the standard security handler with a user password that is not empty: PDFium says "Incorrect password"
ENCRYPTED_PDF = tiny_pdf(["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [] /Count 0 >>",
                          f"<< /Filter /Standard /V 1 /R 2 /O <{'11' * 32}> /U <{'22' * 32}> /P -4 >>"],
                         f"/Encrypt 3 0 R /ID [<{'33' * 16}> <{'33' * 16}>] ")


@pytest.fixture
def pages(tmp_path):
    """Two good images, a PDF of two pages, and a folder of both images: the inputs of a small good run."""
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(noise(300, 200, 1)).save(folder / "a.png")
    Image.fromarray(noise(200, 260, 2)).save(folder / "b.jpg")
    first, second = Image.fromarray(noise(100, 140, 3)), Image.fromarray(noise(150, 90, 4))
    first.save(tmp_path / "doc.pdf", save_all=True, append_images=[second], resolution=72)
    return [str(folder), str(tmp_path / "doc.pdf")]


def one_line_error(exc_info, *names):
    message = str(exc_info.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def test_bulk_bad_manifest_lines_are_recorded(tmp_path, pages):
    # invalid UTF-8, a lone surrogate escape, an empty id, a line that is not JSON: recorded with file:line, the
    # rest encoded; a UTF-8 byte order mark is skipped; a folder file whose name is not UTF-8 is encoded too
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b'\xef\xbb\xbf{"image": "in/a.png", "id": "bom"}\n'
                         b'{"image": "in/a.png", "id": "caf\xe9"}\n'
                         b'{"image": "in/b.jpg", "id": "\\ud800x"}\n'
                         b'{"image": "in/b.jpg", "id": ""}\n'
                         b'{"image": \n')
    Image.fromarray(noise(120, 80, 5)).save(os.fsdecode(bytes(tmp_path / "in") + b"/\xff.png"))
    s = gundam.bulk.encode_dataset([manifest, pages[0]], tmp_path / "out", **BULK)
    failed = dict(s.failed)
    assert set(failed) == {f"{manifest}:2", f"{manifest}:4", f"{manifest}:5"}, failed
    assert "not UTF-8 (byte 33 of the line is b'\\xe9')" in failed[f"{manifest}:2"]
    assert "a non-empty string" in failed[f"{manifest}:4"] and "not JSON" in failed[f"{manifest}:5"]
    rows = {r["id"]: r for r in gundam.bulk.read_manifest(tmp_path / "out")}
    assert rows["bom"]["error"] is None and rows["\\ud800x"]["error"] is None       # written as its escape
    assert rows[f"{tmp_path / 'in'}/\\udcff.png"]["error"] is None
    again = gundam.bulk.encode_dataset([manifest, pages[0]], tmp_path / "out", **BULK)
    assert (again.skipped, again.encoded) == (s.items, 0)                           # the same ids: all done


def test_bulk_unreadable_inputs_are_recorded(tmp_path, pages, monkeypatch):
    # a folder that cannot be listed and a manifest that cannot be opened: items with errors, the run goes on
    # (root reads anything, so the OS errors are made here)
    (tmp_path / "locked").mkdir()
    (tmp_path / "m.jsonl").write_text('{"image": "in/a.png"}\n')
    real_scandir, real_open = os.scandir, open

    def scandir(path="."):
        if os.fspath(path) == str(tmp_path / "locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    def fake_open(path, *args, **kwargs):
        if os.fspath(path) == str(tmp_path / "m.jsonl"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr("builtins.open", fake_open)
    items = gundam.bulk.expand_inputs([tmp_path / "locked", tmp_path / "m.jsonl", pages[0]])
    assert [it.error for it in items] == [f"folder {str(tmp_path / 'locked')!r}: cannot be listed (Permission denied)",
                                          f"manifest {str(tmp_path / 'm.jsonl')!r}: cannot read (Permission denied)",
                                          None, None]


def test_bulk_stale_pdfium_errors(tmp_path):
    # PDFium keeps its last error: a zero-page PDF read after an encrypted one must not say "Incorrect password"
    (tmp_path / "enc.pdf").write_bytes(ENCRYPTED_PDF)
    (tmp_path / "zero.pdf").write_bytes(ZERO_PAGE_PDF)
    (tmp_path / "cut.pdf").write_bytes(ZERO_PAGE_PDF[:40])
    alone = gundam.bulk.expand_inputs(tmp_path / "zero.pdf")[0].error
    errors = [it.error for it in gundam.bulk.expand_inputs([tmp_path / f for f in
                                                            ("enc.pdf", "zero.pdf", "cut.pdf", "zero.pdf", "enc.pdf")])]
    assert "Incorrect password" in errors[0] and "Data format error" in errors[2]
    assert errors[1] == alone and "PDFium gives no reason" in alone and "password" not in alone
    rendered = gundam.bulk.Item("p", str(tmp_path / "zero.pdf"), page=0)    # load_item opens the same way
    with pytest.raises(ValueError, match="PDFium gives no reason") as e:
        gundam.bulk.load_item(rendered)
    one_line_error(e, tmp_path / "zero.pdf")


@pytest.mark.parametrize("dpi", [1e308, 1e6])
def test_bulk_page_too_large_at_dpi_is_recorded(tmp_path, pages, dpi):
    s = gundam.bulk.encode_dataset(pages[1], tmp_path / "out", **{**BULK, "dpi": dpi})
    assert len(s.failed) == 2 and all("expected a lower --dpi" in why for _, why in s.failed)


def test_bulk_view_bound_comes_from_the_mode(tmp_path, pages, capsys, tiny_cli):
    # no crops in "tiny": a batch of one view holds any image; in "gundam" an image can have 7
    s = gundam.bulk.encode_dataset(pages, tmp_path / "one", **{**BULK, "batch_size": 1})
    assert s.encoded == 4 and not s.failed
    with pytest.raises(ValueError, match=r"batch_size=6 views: an image can have 7 in this mode \(a global view and "
                                         r"max_crops=6 crops\): expected at least 7"):
        gundam.bulk.encode_dataset(pages, tmp_path / "gundam", **{**BULK, "mode": "gundam", "batch_size": 6})
    with pytest.raises(ValueError, match=r"an image can have 4 in this mode .*max_crops=3"):
        gundam.bulk.encode_dataset(pages, tmp_path / "gundam", **{**BULK, "mode": "gundam", "max_crops": 3,
                                                                  "batch_size": 3})
    code, _, err = run_cli(capsys, "encode-dataset", *pages, "--out", tmp_path / "cli", "--mode", "base",
                           "--batch-size", "1", "--workers", "0", "--dtype", "float32")
    assert code == 0, err


@pytest.mark.parametrize("inputs,error,match", [
    (None, TypeError, "inputs of type NoneType: expected a path"), (b"scans/", TypeError, "inputs of type bytes"),
    (123, TypeError, "inputs of type int"), ([None], TypeError, r"inputs\[0\] of type NoneType"),
    ([b"a.png"], TypeError, r"inputs\[0\] of type bytes"), ([], ValueError, "inputs: got none"),
    ([""], ValueError, r"inputs\[0\] is an empty path"),
])
def test_bulk_bad_inputs_argument(tmp_path, inputs, error, match):
    with pytest.raises(error, match=match) as e:
        gundam.bulk.encode_dataset(inputs, tmp_path / "out", **BULK)
    one_line_error(e)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(out=None), TypeError, "out of type NoneType"), (dict(workers=10 ** 6), ValueError, r"workers=1000000"),
    (dict(workers=2, engine="ray"), ValueError, "workers=2 with engine='ray'"),
    (dict(dpi=float("inf")), ValueError, "dpi=inf"), (dict(backend="cuda"), ValueError, "backend='cuda'"),
    (dict(shard_size=0), ValueError, "shard_size=0"), (dict(max_shards=0), ValueError, "max_shards=0"),
])
def test_bulk_bad_options_write_nothing(tmp_path, pages, kwargs, error, match):
    kwargs = {"out": tmp_path / "out", **kwargs}
    with pytest.raises(error, match=match) as e:
        gundam.bulk.encode_dataset(pages, **{**BULK, **kwargs})
    one_line_error(e)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def micro_weights(tmp_path):
    state = {k: v.contiguous() for k, v in randomize(GundamEncoder(MICRO), seed=4).state_dict().items()}
    return state, tmp_path / "weights"


def bad_start(case, state, folder):
    """A start that fails after the options look fine: (kwargs of encode_dataset, what the error says)."""
    folder.mkdir(exist_ok=True)
    if case == "nan weights":
        save_file({**state, "projector.layers.bias": torch.full_like(state["projector.layers.bias"], float("nan"))},
                  folder / "nan.safetensors")
        return dict(weights=folder / "nan.safetensors"), "NaN or Inf in projector.layers.bias"
    if case == "missing tensor":
        save_file({k: v for k, v in state.items() if k != "view_seperator"}, folder / "missing.safetensors")
        return dict(weights=folder / "missing.safetensors"), "missing encoder tensors view_seperator"
    if case == "truncated weights":
        save_file(state, folder / "full.safetensors")
        data = (folder / "full.safetensors").read_bytes()
        (folder / "cut.safetensors").write_bytes(data[:len(data) // 2])
        return dict(weights=folder / "cut.safetensors"), "cannot read as safetensors"
    if case == "triton without its interpreter":
        return dict(backend="triton"), "needs Triton's interpreter"
    if case == "device":
        return dict(device="cuda:7" if torch.cuda.is_available() else "cuda"), "not available"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["nan weights", "missing tensor", "truncated weights",
                                  "triton without its interpreter", "device"])
def test_bulk_failed_start_claims_nothing(tmp_path, pages, micro_weights, monkeypatch, capsys, tiny_cli, case):
    # the failed start leaves the folder as it was (new here), so the corrected rerun is not "other settings"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    state, folder = micro_weights
    kwargs, match = bad_start(case, state, folder)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        gundam.bulk.encode_dataset(pages, out, **{**BULK, **kwargs})
    one_line_error(e)
    assert not out.exists()
    cli = [f"--{k}={v}" for k, v in kwargs.items()]
    code, stdout, err = run_cli(capsys, "encode-dataset", *pages, "--out", out, "--mode", "tiny", "--workers", "0",
                                "--dtype", "float32", *cli)
    assert code == 2 and err.startswith("error: ") and match in err and err.count("\n") == 1, err
    assert not out.exists()
    save_file(state, folder / "good.safetensors")
    s = gundam.bulk.encode_dataset(pages, out, **{**BULK, "weights": folder / "good.safetensors"})
    assert s.encoded == 4 and not s.failed


def test_bulk_killed_before_its_first_shard_claims_nothing(tmp_path, pages, monkeypatch):
    # a run stopped while it encodes its first batch (Ctrl-C here) has recorded no settings: any rerun is welcome
    import gundam.bulk.engines as engines

    def interrupted(encoder, group):
        raise KeyboardInterrupt
    monkeypatch.setattr(engines, "encode_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gundam.bulk.encode_dataset(pages, tmp_path / "out", **BULK)
    assert sorted(os.listdir(tmp_path / "out")) == [".lock"]
    monkeypatch.undo()
    # settings recorded by a run stopped before it finished a shard (or a damaged run.json) hold no embeddings
    (tmp_path / "out" / "run.json").write_text('{"dpi": ')
    s = gundam.bulk.encode_dataset(pages, tmp_path / "out", **{**BULK, "dpi": 72})
    assert s.encoded == 4 and json.loads((tmp_path / "out" / "run.json").read_text())["dpi"] == 72


@pytest.fixture
def finished(tmp_path, pages):
    out = tmp_path / "done"
    s = gundam.bulk.encode_dataset(pages, out, **{**BULK, "shard_size": 2})
    assert len(s.shards) == 2 and not s.failed
    return out


def corrupt(case, out):
    """Damage a finished folder: (the file the error must name, what it must say)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    run, manifest = out / "run.json", out / "manifest" / "shard-00001.parquet"
    if case == "run.json not JSON":
        run.write_text('{"mode": ')
        return run, "cannot read the run's settings"
    if case == "run.json not UTF-8":
        run.write_bytes(b'{"dpi": "\xff"}')
        return run, "cannot read the run's settings"
    if case == "run.json a list":
        run.write_text("[]")
        return run, "holds a JSON list"
    if case == "manifest truncated":
        manifest.write_bytes(manifest.read_bytes()[:100])
        return manifest, "not a readable Parquet file"
    if case == "manifest of another tool":
        pq.write_table(pa.table({"name": ["x"], "value": [1]}), manifest)
        return manifest, "no column 'id'"
    if case == "manifest without errors":
        table = pq.read_table(manifest)
        pq.write_table(table.drop_columns(["error"]), manifest)
        return manifest, "no column 'error'"
    if case == "manifest ids of another type":
        table = pq.read_table(manifest)
        pq.write_table(table.set_column(0, "id", pa.array(range(len(table)))), manifest)
        return manifest, "column 'id' is int64"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["run.json not JSON", "run.json not UTF-8", "run.json a list", "manifest truncated",
                                  "manifest of another tool", "manifest without errors",
                                  "manifest ids of another type"])
def test_bulk_corrupt_folder_is_one_line_naming_the_file(finished, pages, capsys, tiny_cli, case):
    path, match = corrupt(case, finished)
    readers = [lambda: gundam.bulk.encode_dataset(pages, finished, **{**BULK, "shard_size": 2})]
    if case.startswith("manifest"):
        readers += [lambda: gundam.bulk.read_manifest(finished), lambda: list(gundam.read_embeddings(finished))]
    for read in readers:
        with pytest.raises(ValueError, match=re.escape(match)) as e:
            read()
        one_line_error(e, path)
    code, _, err = run_cli(capsys, "encode-dataset", *pages, "--out", finished, "--mode", "tiny", "--workers", "0",
                           "--dtype", "float32", "--shard-size", "2")
    assert code == 2 and err.startswith("error: ") and match in err and str(path) in err and err.count("\n") == 1


@pytest.mark.parametrize("case,match", [
    ("truncated", "cannot read as safetensors"), ("missing", "cannot read as safetensors"),
    ("other tensor", 'no "embeddings" tensor'), ("fewer rows", "expected the shard its manifest was written with"),
    ("a path in the manifest", "expected a file name shard-NNNNN.safetensors"),
])
def test_bulk_bad_embeddings_file_names_it(finished, case, match):
    import pyarrow as pa
    import pyarrow.parquet as pq
    emb = finished / "embeddings" / "shard-00001.safetensors"
    if case == "truncated":
        emb.write_bytes(emb.read_bytes()[:200])
    elif case == "missing":
        emb.unlink()
    elif case == "other tensor":
        save_file({"x": torch.zeros(2, 2)}, emb)
    elif case == "fewer rows":
        t = load_file(emb)
        save_file({"embeddings": t["embeddings"][:-1].contiguous(), "offsets": t["offsets"]}, emb)
    else:
        manifest = finished / "manifest" / "shard-00001.parquet"
        table = pq.read_table(manifest)
        shard = [None if s is None else "../../elsewhere.safetensors" for s in table.column("shard").to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index("shard"), "shard", pa.array(shard)), manifest)
        emb = "../../elsewhere.safetensors"
    read = gundam.read_embeddings(finished)
    next(read), next(read)                       # the first shard reads fine
    with pytest.raises(ValueError, match=re.escape(match)) as e:
        list(read)
    one_line_error(e, emb)


def test_bulk_shard_folder_that_is_a_file(tmp_path, pages):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "embeddings").write_text("")
    with pytest.raises(ValueError, match="'embeddings' in it is not a folder") as e:
        gundam.bulk.encode_dataset(pages, tmp_path / "out", **BULK)
    one_line_error(e, tmp_path / "out")
    with pytest.raises(ValueError, match="no manifest"):
        gundam.bulk.read_manifest(tmp_path / "out")
    with pytest.raises(TypeError, match="out of type NoneType"):
        gundam.bulk.read_manifest(None)


def test_bulk_settings_come_from_the_manifest_without_run_json(finished, pages):
    # run.json gone: the settings recorded in the shards' manifests still keep other settings out
    (finished / "run.json").unlink()
    with pytest.raises(ValueError, match=r"dpi=144.0 \(.*shard-00000.parquet\), this run has dpi=72.0"):
        gundam.bulk.encode_dataset(pages, finished, **{**BULK, "shard_size": 2, "dpi": 72})
    s = gundam.bulk.encode_dataset(pages, finished, **{**BULK, "shard_size": 2})
    assert (s.skipped, s.encoded) == (4, 0)


@pytest.fixture
def no_ray(monkeypatch):
    """Ray not yet connected in this process (as in a fresh `gundam encode-dataset --engine ray`), its bound 3 s."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("Ray is connected in this process already")
    import gundam.bulk.engines as engines
    monkeypatch.setattr(engines, "RAY_TIMEOUT", 3.0)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return ray


@pytest.mark.parametrize("address,shown,match", [
    ("127.0.0.1:1", "127.0.0.1:1", r"cannot reach .*:1 within 3s \(Connection refused\)"),
    ("ray://127.0.0.1:1", "ray://127.0.0.1:1", r"cannot reach 127.0.0.1:1 within 3s"),
    (None, "127.0.0.1:2", r"cannot reach .*:2 within 3s"),                                      # RAY_ADDRESS
])
def test_bulk_ray_unreachable_address_is_bounded(tmp_path, pages, no_ray, monkeypatch, capsys, tiny_cli, address,
                                                  shown, match):
    if address is None:
        monkeypatch.setenv("RAY_ADDRESS", shown)
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=match) as e:
        gundam.bulk.encode_dataset(pages, tmp_path / "out", engine="ray", ray_address=address,
                                   **{**BULK, "workers": None})
    assert time.monotonic() - t0 < 10
    one_line_error(e, f"ray_address={shown!r}")
    assert not no_ray.is_initialized() and not (tmp_path / "out").exists()
    cli = ["--ray-address", address] if address else []
    code, _, err = run_cli(capsys, "encode-dataset", *pages, "--out", tmp_path / "out", "--engine", "ray", *cli,
                           "--mode", "tiny")
    assert code == 2 and err.startswith("error: ray_address=") and shown in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_bulk_ray_address_that_is_not_ray_is_bounded(tmp_path, pages):
    # a port that accepts connections but never speaks Ray: ray.init would wait; the run ends at the bound
    pytest.importorskip("ray")
    server = socket.socket()
    server.bind(("0.0.0.0", 0))         # Ray connects to this machine's address, not to 127.0.0.1
    server.listen(64)
    try:
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "gundam.cli", "encode-dataset", *pages, "--out", str(tmp_path / "o"),
                            "--engine", "ray", "--ray-address", f"127.0.0.1:{server.getsockname()[1]}", "--mode",
                            "tiny"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "GUNDAM_RAY_TIMEOUT": "3", "RAY_ADDRESS": ""})
    finally:
        server.close()
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ray_address='127.0.0.1:") and "did not connect within 3s" in last, r.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "o").exists()
