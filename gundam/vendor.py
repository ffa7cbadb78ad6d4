"""The vendor's encoder inputs -> a `Batch`: what `GundamEncoder.forward_vendor` takes.

Two layouts reach `_pixel_values_to_embedding` in the programs that serve DeepSeek-OCR:

- per image (the vendor's own vLLM and HF code, SGLang; read at deepseek-ai/DeepSeek-OCR e4ac34e,
  sgl-project/sglang b4ea46f): pixel_values [n, 1, 3, B, B], images_crop [n, 1, N, 3, S, S],
  images_spatial_crop [n, 1, 2], each a tensor or a list of per-image entries (lists when crop counts
  differ). An image without crops carries a zero placeholder (the vendor's processor writes one all-zero
  crop) and the grid 1x1; an image with crops carries its w x h grid, and its crops are the first w*h rows
  (rows past them are padding).
- flat (vLLM's upstream `DeepseekOCRForCausalLM`, read at vllm-project/vllm 029329a): pixel_values
  [n, 3, B, B], images_crop [sum of crops, 3, S, S] with no rows for an image without crops (possibly
  [0, 3, S, S]), images_spatial_crop [n, 2].

In both layouts the grid decides (the vendor's processor writes a grid other than 1x1 exactly when it cuts
crops): an image has w*h crops when its grid is not 1x1, none when it is 1x1, and no pixels are summed. The
vendor's own test, `sum(crops) != 0`, would drop the crops of a page whose normalised crops sum to exactly 0
(half black, half white, say). A 1x1 grid with crop rows that are not all zeros is refused: the vendor would
encode them as one crop, a layout this encoder does not have.

Pixels are normalised floats (what the vendor passes) or uint8 (normalised on the encoder's device).
"""
from __future__ import annotations

import torch

from gundam.config import Mode, check_int, short_repr
from gundam.images import Batch
from gundam.layout import grid_layout


def vendor_batch(pixel_values, images_crop, images_spatial_crop, config, mode: Mode | None = None) -> Batch:
    """The vendor's `_pixel_values_to_embedding` arguments, either layout -> Batch (flat crops are not copied).
    `config`: the encoder's config (which view sizes it takes); `mode`: the batch's mode when the encoder has
    one (DeepSeek-OCR 2), else made from the view sizes (DeepSeek-OCR takes any)."""
    n = _num_images(pixel_values, "pixel_values")
    flat = isinstance(pixel_values, torch.Tensor) and pixel_values.dim() == 4
    # flat: images_crop holds crops, not images, and is checked against the tile counts instead
    counts = [n, _num_images(images_spatial_crop, "images_spatial_crop")]
    if not flat:
        counts.insert(1, _num_images(images_crop, "images_crop"))
    if len(set(counts)) != 1:
        names = "pixel_values and images_spatial_crop" if flat else \
            "pixel_values, images_crop and images_spatial_crop"
        raise ValueError(f"forward_vendor: {names} must have the same number of images, got "
                         f"{', '.join(map(str, counts))}")
    if flat:
        globals_, crops, grids = _flat(pixel_values, images_crop, images_spatial_crop)
    else:
        globals_, crops, grids = _per_image(pixel_values, images_crop, images_spatial_crop, n)
    B = _view_size(globals_, "pixel_values", config)
    if mode is not None and B != mode.base_size:
        raise ValueError(f"forward_vendor: pixel_values views are {B} px, expected this encoder's global view "
                         f"size {mode.base_size}")
    if crops is None:  # no image has crops: an empty crop tensor of the crop size (else of the global views')
        S = mode.image_size if mode is not None else B
        crops = globals_.new_zeros(0, 3, S, S)
    S = _view_size(crops, "images_crop", config)
    if mode is None:
        mode = Mode(B, S, crops.shape[0] > 0)
    elif S != mode.image_size:
        raise ValueError(f"forward_vendor: images_crop views are {S} px, expected this encoder's crop size "
                         f"{mode.image_size}")
    return Batch(globals_, crops, [grid_layout(mode, g) for g in grids], mode)


def _flat(pixel_values, images_crop, images_spatial_crop):
    _check_pixels(pixel_values, "pixel_values", (None, 3, None, None))
    _check_pixels(images_crop, "images_crop", (None, 3, None, None))
    if not isinstance(images_spatial_crop, torch.Tensor) or list(images_spatial_crop.shape[1:]) != [2]:
        got = list(images_spatial_crop.shape) if isinstance(images_spatial_crop, torch.Tensor) else "a list"
        raise ValueError(f"forward_vendor: images_spatial_crop is {got} with flat pixel_values [n, 3, B, B], "
                         f"expected a tensor [n, 2]")
    rows = _numbers(images_spatial_crop, "images_spatial_crop").reshape(-1, 2).tolist()
    grids = [_grid(row, f"images_spatial_crop[{j}]") for j, row in enumerate(rows)]
    wanted = sum(w * h for w, h in grids if (w, h) != (1, 1))
    if images_crop.shape[0] != wanted:
        raise ValueError(f"forward_vendor: images_crop has {images_crop.shape[0]} crops, images_spatial_crop "
                         f"asks for {wanted} (w*h of each image whose grid is not 1x1)")
    return pixel_values, (images_crop if wanted else None), grids


def _per_image(pixel_values, images_crop, images_spatial_crop, n):
    globals_, crops, grids = [], [], []
    for j in range(n):
        globals_.append(_check_pixels(pixel_values[j], f"pixel_values[{j}]", (1, 3, None, None))[0])
        patches = _check_pixels(images_crop[j], f"images_crop[{j}]", (1, None, 3, None, None))[0]
        w, h = _grid(_numbers(images_spatial_crop[j], f"images_spatial_crop[{j}]").reshape(-1).tolist(),
                     f"images_spatial_crop[{j}]")
        if (w, h) != (1, 1):                                        # the grid decides: w*h crops
            if patches.shape[0] < w * h:
                raise ValueError(f"forward_vendor: images_crop[{j}] holds {patches.shape[0]} crops for a {w}x{h} "
                                 f"grid, expected at least w*h = {w * h}")
            crops.append(patches[:w * h])
        elif patches.shape[0] and bool(patches.ne(0).any()):
            raise ValueError(f"forward_vendor: images_crop[{j}] holds {patches.shape[0]} crops that are not all "
                             f"zeros for a 1x1 grid, expected the all-zero placeholder (no crops) or a grid of "
                             f"more than one tile")
        grids.append((w, h))
    return _join(globals_, "pixel_values", torch.stack), _join(crops, "images_crop", torch.cat) if crops else None, grids


def _num_images(x, name):
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError(f"forward_vendor: {name} is a 0-d tensor, expected one entry per image")
        n = x.shape[0]
    elif isinstance(x, (list, tuple)):
        n = len(x)
    else:
        raise TypeError(f"forward_vendor: {name} of type {type(x).__name__}, expected a tensor or a list of "
                        f"per-image tensors")
    if n == 0:
        raise ValueError(f"forward_vendor: {name} holds no images, expected at least one")
    return n


def _check_pixels(x, name, shape):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"forward_vendor: {name} of type {type(x).__name__}, expected a tensor")
    if not (x.is_floating_point() or x.dtype == torch.uint8):
        raise TypeError(f"forward_vendor: {name} has dtype {x.dtype}, expected floating-point (normalised) or "
                        f"uint8 pixels")
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"forward_vendor: {name} has shape {list(x.shape)}, expected {want}")
    if x.is_meta:
        raise ValueError(f"forward_vendor: {name} is a meta tensor (no data), expected pixels")
    return x


def _join(tensors, name, join):
    kinds = sorted({f"{t.dtype} on {t.device}" for t in tensors})
    if len(kinds) > 1:
        raise ValueError(f"forward_vendor: {name} mixes {', '.join(kinds)}, expected one dtype and device")
    sizes = sorted({tuple(t.shape[-2:]) for t in tensors})
    if len(sizes) > 1:
        raise ValueError(f"forward_vendor: {name} views of sizes {sizes}, expected one size")
    return join(tensors)


def _view_size(views, name, config) -> int:
    H, W = views.shape[-2:]
    if H != W:
        raise ValueError(f"forward_vendor: {name} views are {H}x{W} px, expected square views")
    config.tokens_per_side(H, f"forward_vendor: {name} view size")   # raises unless the encoder takes it
    return H


def _numbers(x, name) -> torch.Tensor:
    """Tile counts as a CPU tensor: integers, or floats holding integers (SGLang casts them to the vision dtype)."""
    try:
        x = torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:   # e.g. a Python int past int64
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"forward_vendor: {name} = {short_repr(x)}: expected integer tile counts ({why})") from None
    if x.is_meta:
        raise ValueError(f"forward_vendor: {name} is a meta tensor (no data), expected tile counts")
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"forward_vendor: {name} has dtype {x.dtype}, expected integer tile counts")
    return x.cpu()


def _grid(values, name) -> tuple[int, int]:
    if len(values) != 2 or not all(float(v).is_integer() for v in values):
        raise ValueError(f"forward_vendor: {name} = {values}, expected 2 integers [w_tiles, h_tiles]")
    return tuple(check_int(int(v), f"forward_vendor: {name} tiles") for v in values)
