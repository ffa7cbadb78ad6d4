"""Images -> views, exactly as the vendor's `DeepseekOCRProcessor.tokenize_with_images`.

One image becomes a `base_size` global view (the image padded to a square with grey 127) and, in crop mode
and above 640 px, a grid of `image_size` crops of the image resized to the grid. Token counts and the crop grid
come from here and nowhere else (the cost model uses `image_layout` too).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gundam.config import Mode, resolve_mode

SMALL_IMAGE = 640          # vendor rule: an image with both sides <= 640 px is never cropped, in every mode
MAX_IMAGE_PIXELS = 200_000_000  # larger images are refused (decompression-bomb guard)
PAD_COLOR = (127, 127, 127)     # int(0.5 * 255): the normalisation mean


def _candidate_grids(min_crops: int, max_crops: int) -> list[tuple[int, int]]:
    # The vendor builds a set and sorts it by tile count; among equal counts the set's iteration order
    # decides, and that order decides exact ties. Built by the same expression, the order is the same.
    grids = set((i, j) for n in range(min_crops, max_crops + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                if min_crops <= i * j <= max_crops)
    return sorted(grids, key=lambda g: g[0] * g[1])


def _closest_grid(width: int, height: int, mode: Mode) -> tuple[int, int]:
    aspect = width / height
    best_diff, best = float("inf"), (1, 1)
    for w, h in _candidate_grids(mode.min_crops, mode.max_crops):
        diff = abs(aspect - w / h)
        if diff < best_diff:
            best_diff, best = diff, (w, h)
        elif diff == best_diff and width * height > 0.5 * mode.image_size * mode.image_size * w * h:
            best = (w, h)
    return best


def _check_size(width, height):
    for name, v in (("width", width), ("height", height)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"image {name}={v!r}: expected a positive integer")


def crop_grid(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None) -> tuple[int, int]:
    """(w_tiles, h_tiles) of the crop grid; (1, 1) means no crops."""
    _check_size(width, height)
    mode = resolve_mode(mode, max_crops)
    if not mode.crop_mode or (width <= SMALL_IMAGE and height <= SMALL_IMAGE):
        return (1, 1)
    return _closest_grid(width, height, mode)


@dataclass(frozen=True)
class ImageLayout:
    """Views and tokens of one image. Tokens: global `qb*(qb+1)`, local `(h*qi)*(w*qi+1)`, plus 1 separator."""
    width: int
    height: int
    mode: Mode
    grid: tuple[int, int]       # (w_tiles, h_tiles)
    n_crops: int                # 0 when the grid is 1x1
    global_tokens: int
    local_tokens: int
    tokens: int

    @property
    def qb(self) -> int:  # tokens per side of the global view
        return tokens_per_side(self.mode.base_size)

    @property
    def qi(self) -> int:  # tokens per side of a crop
        return tokens_per_side(self.mode.image_size)


def tokens_per_side(size: int) -> int:
    """Output tokens along a side of a `size` px view: 16 px patches, then net_2 and net_3 halve the grid."""
    return math.ceil(size / 16 / 4)


def image_layout(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None) -> ImageLayout:
    mode = resolve_mode(mode, max_crops)
    return grid_layout(mode, crop_grid(width, height, mode), width, height)


def grid_layout(mode: Mode, grid: tuple[int, int], width: int = 0, height: int = 0) -> ImageLayout:
    """The layout of an image whose crop grid is already known."""
    w, h = grid
    qb, qi = tokens_per_side(mode.base_size), tokens_per_side(mode.image_size)
    n_crops = 0 if (w, h) == (1, 1) else w * h
    global_tokens = qb * (qb + 1)
    local_tokens = (h * qi) * (w * qi + 1) if n_crops else 0
    return ImageLayout(int(width), int(height), mode, (w, h), n_crops, global_tokens, local_tokens,
                       global_tokens + local_tokens + 1)


def count_image_tokens(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None) -> int:
    """Number of vision tokens the language model sees for one image (newlines and separator included)."""
    return image_layout(width, height, mode, max_crops).tokens


# ----------------------------------------------------------------------------------------------------------
# pixels

def load_image(source) -> Image.Image:
    """A PIL image or a path -> RGB PIL image, opened as the vendor's script does (EXIF transpose, then RGB)."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"image {path!r}: no such file")
        try:
            with Image.open(path) as f:
                _check_pixels(f.size, path)
                f.load()
                image = ImageOps.exif_transpose(f)
                if image is f:
                    image = f.copy()
        except UnidentifiedImageError:
            raise ValueError(f"image {path!r}: not an image file PIL can read") from None
        except Image.DecompressionBombError as e:
            raise ValueError(f"image {path!r}: too many pixels ({e})") from None
        except (OSError, SyntaxError) as e:  # truncated or corrupt data
            raise ValueError(f"image {path!r}: cannot decode ({e})") from None
    else:
        raise TypeError(f"image of type {type(source).__name__}: expected a PIL image or a path")
    _check_pixels(image.size, getattr(source, "filename", None) or "image")
    return image.convert("RGB") if image.mode != "RGB" else image


def _check_pixels(size, name):
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"{name}: size {w}x{h}: expected a non-empty image")
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name}: {w}x{h} = {w * h} pixels: expected at most {MAX_IMAGE_PIXELS}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] float32 in [-1, 1]: torchvision's to_tensor then normalize(0.5, 0.5)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [H,W,3] -> [3,H,W]
    return (x.float() / 255 - 0.5) / 0.5


def crop_images(image: Image.Image, grid: tuple[int, int], image_size: int) -> list[Image.Image]:
    """Resize to the grid with PIL's default filter and cut row-major into image_size squares."""
    w, h = grid
    resized = image.resize((image_size * w, image_size * h))
    return [resized.crop((tx * image_size, ty * image_size, (tx + 1) * image_size, (ty + 1) * image_size))
            for ty in range(h) for tx in range(w)]


def global_view(image: Image.Image, mode: Mode) -> Image.Image:
    if mode.image_size <= SMALL_IMAGE and not mode.crop_mode:
        image = image.resize((mode.image_size, mode.image_size))
    return ImageOps.pad(image, (mode.base_size, mode.base_size), color=PAD_COLOR)


@dataclass
class Batch:
    """Views of a batch of images, ready for the encoder.

    global_views: [n_images, 3, B, B]; crops: [n_crops, 3, S, S], all images' crops in image order, each image's
    in row-major tile order; grids[i] = (w_tiles, h_tiles), (1, 1) for no crops.
    """
    global_views: torch.Tensor
    crops: torch.Tensor
    grids: list[tuple[int, int]]
    layouts: list[ImageLayout]
    mode: Mode
    sizes: list[tuple[int, int]] = field(default_factory=list)  # original (width, height)

    @property
    def n_images(self) -> int:
        return len(self.grids)

    @property
    def n_crops(self) -> list[int]:
        return [l.n_crops for l in self.layouts]

    @property
    def tokens(self) -> list[int]:
        return [l.tokens for l in self.layouts]

    def to(self, device=None, dtype=None) -> "Batch":
        return Batch(self.global_views.to(device=device, dtype=dtype), self.crops.to(device=device, dtype=dtype),
                     self.grids, self.layouts, self.mode, self.sizes)

    def to_vendor(self):
        """The vendor's tensors: pixel_values [n,1,3,B,B], images_crop [n,1,N,3,S,S], images_spatial_crop [n,1,2].

        Images with fewer crops than the most are padded with zero crops (the vendor treats an all-zero crop
        tensor as "no crops"); an image without crops gets zeros. vLLM passes per-image lists instead when the
        crop counts differ; `GundamEncoder.forward_vendor` takes both.
        """
        S, n = self.mode.image_size, self.n_images
        n_max = max([1] + self.n_crops)
        images_crop = torch.zeros(n, 1, n_max, 3, S, S, dtype=self.crops.dtype)
        start = 0
        for i, k in enumerate(self.n_crops):
            images_crop[i, 0, :k] = self.crops[start:start + k]
            start += k
        spatial = torch.tensor([[list(g)] for g in self.grids], dtype=torch.long)
        return self.global_views[:, None], images_crop, spatial


def preprocess(images, mode: str | Mode = "gundam", max_crops: int | None = None) -> Batch:
    """One image or a list of images (PIL images or paths) -> Batch."""
    mode = resolve_mode(mode, max_crops)
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("preprocess: got no images, expected at least one")
    globals_, crops, grids, layouts, sizes = [], [], [], [], []
    for source in images:
        image = load_image(source)
        layout = image_layout(*image.size, mode)
        globals_.append(to_tensor(global_view(image, mode)))
        if layout.n_crops:
            crops += [to_tensor(c) for c in crop_images(image, layout.grid, mode.image_size)]
        grids.append(layout.grid)
        layouts.append(layout)
        sizes.append(image.size)
    S = mode.image_size
    crops_t = torch.stack(crops) if crops else torch.zeros(0, 3, S, S)
    return Batch(torch.stack(globals_), crops_t, grids, layouts, mode, sizes)
