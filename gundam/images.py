"""Images -> views (a `Batch`), exactly as the vendor's `DeepseekOCRProcessor.tokenize_with_images`.

One image becomes a `base_size` global view (the image padded to a square with grey 127) and, in crop mode
and above 640 px, a grid of `image_size` crops of the image resized to the grid (`gundam.layout` chooses it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gundam.config import Mode, resolve_mode
from gundam.layout import SMALL_IMAGE, ImageLayout, image_layout

MAX_IMAGE_PIXELS = 200_000_000  # larger images are refused (decompression-bomb guard)
PAD_COLOR = (127, 127, 127)     # int(0.5 * 255): the normalisation mean


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


def to_uint8(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [3, H, W] uint8."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # [H,W,3] -> [3,H,W]


def normalize(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels -> [-1, 1] in `dtype`, computed in float32: torchvision's to_tensor then normalize(0.5, 0.5),
    as the vendor. Float pixels are taken as already normalised and only cast."""
    if pixels.dtype == torch.uint8:
        pixels = (pixels.float() / 255 - 0.5) / 0.5
    return pixels.to(dtype)


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
    in row-major tile order; layouts[i]: image i's grid and token layout. Pixels are float in [-1, 1] (what
    `preprocess` makes) or uint8 0..255 (4x fewer bytes to move; the encoder normalises them on its device).
    """
    global_views: torch.Tensor
    crops: torch.Tensor
    layouts: list[ImageLayout]
    mode: Mode

    @property
    def n_images(self) -> int:
        return len(self.layouts)

    @property
    def grids(self) -> list[tuple[int, int]]:
        return [l.grid for l in self.layouts]

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Original (width, height) of each image (0, 0 when built from vendor tensors)."""
        return [(l.width, l.height) for l in self.layouts]

    @property
    def n_crops(self) -> list[int]:
        return [l.n_crops for l in self.layouts]

    @property
    def tokens(self) -> list[int]:
        return [l.tokens for l in self.layouts]

    @property
    def offsets(self) -> torch.Tensor:
        """int64 [n_images + 1]: image i's tokens are rows offsets[i]:offsets[i + 1] of the encoder output."""
        return torch.tensor([0] + self.tokens, dtype=torch.int64).cumsum(0)

    def pin_memory(self) -> "Batch":
        """The pixels in page-locked memory, so the upload to a GPU is asynchronous (DataLoader calls this
        with pin_memory=True)."""
        return Batch(self.global_views.pin_memory(), self.crops.pin_memory(), self.layouts, self.mode)

    def to(self, device=None, dtype=None) -> "Batch":
        return Batch(self.global_views.to(device=device, dtype=dtype), self.crops.to(device=device, dtype=dtype),
                     self.layouts, self.mode)

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


def image_views(source, mode: Mode) -> tuple[torch.Tensor, torch.Tensor, ImageLayout]:
    """One image (PIL image or path) -> (global view uint8 [3, B, B], crops uint8 [n_crops, 3, S, S], layout):
    the one code path from an image to its views (preprocess and data loaders call it)."""
    image = load_image(source)
    layout = image_layout(*image.size, mode)
    glob = to_uint8(global_view(image, mode))
    S = mode.image_size
    crops = [to_uint8(c) for c in crop_images(image, layout.grid, S)] if layout.n_crops else []
    return glob, torch.stack(crops) if crops else torch.zeros(0, 3, S, S, dtype=torch.uint8), layout


def preprocess(images, mode: str | Mode = "gundam", max_crops: int | None = None) -> Batch:
    """One image or a list of images (PIL images or paths) -> Batch (float pixels in [-1, 1])."""
    mode = resolve_mode(mode, max_crops)
    if isinstance(images, (Image.Image, str, os.PathLike)):
        images = [images]
    images = list(images)
    if not images:
        raise ValueError("preprocess: got no images, expected at least one")
    globals_, crops, layouts = zip(*(image_views(source, mode) for source in images))
    return Batch(normalize(torch.stack(globals_)), normalize(torch.cat(crops)), list(layouts), mode)
