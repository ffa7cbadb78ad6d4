"""Images -> views (a `Batch`), exactly as the vendor's `DeepseekOCRProcessor.tokenize_with_images`.

One image becomes a `base_size` global view (the image padded to a square with grey 127) and, in crop mode
and above the mode's `small_image` (640 px; DeepSeek-OCR 2: 768), a grid of `image_size` crops of the image
resized to the grid (`gundam.layout` chooses it). DeepSeek-OCR 2's processor follows the same rules.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from gundam.config import MAX_IMAGE_PIXELS, Mode, resolve_mode
from gundam.layout import ImageLayout, grid_layout, image_layout

PAD_COLOR = (127, 127, 127)     # int(0.5 * 255): the normalisation mean
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")  # 16-bit (and 32-bit int) pixels: scaled, not clipped


def load_image(source) -> Image.Image:
    """A path or a PIL image -> RGB PIL image: the one way every image is opened (preprocess, data loaders,
    `gundam tokens`).

    A path is opened as the vendor's script does: EXIF orientation applied, then RGB. A PIL image is taken as
    given (no EXIF rotation, the frame it is on). Differences from a plain `convert("RGB")`, on purpose: 16-bit
    and 32-bit integer grey (`I;16`, `I`) is scaled to 8 bits (0..65535 -> 0..255) where PIL would clip it to
    white. Alpha is dropped, not composited (as the vendor). Every failure is a ValueError naming the file.
    """
    if isinstance(source, Image.Image):
        filename = getattr(source, "filename", None)
        return _rgb(source, f"image {filename!r}" if filename else "PIL image")
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"image of type {type(source).__name__}: expected a PIL image or a path (str or os.PathLike)")
    path = check_image_file(source)
    name = f"image {path!r}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            f = Image.open(path)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{name}: too many pixels ({e})") from None
    except UnidentifiedImageError:
        raise ValueError(f"{name}: not an image file PIL can read") from None
    except Exception as e:  # noqa: BLE001 - PIL's plugins raise many kinds on malformed headers
        raise ValueError(f"{name}: cannot read ({type(e).__name__}: {e})") from None
    with f:
        _check_pixels(f.size, name)
        try:
            f.load()
            image = ImageOps.exif_transpose(f)
        except Exception as e:  # noqa: BLE001 - truncated or corrupt data, bad EXIF
            raise ValueError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
        return _rgb(image if image is not f else f.copy(), name)


def check_image_file(source) -> str:
    """`source` as a path string if it names a regular, non-empty file, or a ValueError saying what it is."""
    path = os.fspath(source)
    path = os.fsdecode(path) if isinstance(path, bytes) else path
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise ValueError(f"image {path!r}: empty file")
        return path
    if os.path.isdir(path):
        raise ValueError(f"image {path!r}: is a directory, expected an image file")
    if os.path.islink(path):
        raise ValueError(f"image {path!r}: symbolic link to nothing (broken, or a loop)")
    if os.path.exists(path):
        raise ValueError(f"image {path!r}: not a regular file")
    raise ValueError(f"image {path!r}: no such file")


def _rgb(image: Image.Image, name: str) -> Image.Image:
    _check_pixels(image.size, name)
    try:
        image.load()  # a lazily opened PIL image decodes here (truncated data fails here)
    except Exception as e:  # noqa: BLE001 - same as a corrupt file: say which image and why
        raise ValueError(f"{name}: cannot decode ({type(e).__name__}: {e})") from None
    try:
        if image.mode in WIDE_MODES:
            wide = np.asarray(image).astype(np.int64).clip(0, 65535)
            image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), "L")  # round(v * 255/65535)
        if image.mode != "RGB":
            with warnings.catch_warnings():  # palette + transparency: dropped as the vendor's convert drops it
                warnings.simplefilter("ignore", UserWarning)
                image = image.convert("RGB")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{name}: cannot convert PIL mode {image.mode} to RGB ({e})") from None
    return image


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
    if mode.image_size <= mode.small_image and not mode.crop_mode:
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

    def __post_init__(self):
        """A batch is checked when built: a hand-made inconsistent one would otherwise fail in a reshape deep in
        the encoder, or silently drop views."""
        self.mode = resolve_mode(self.mode)
        if isinstance(self.layouts, ImageLayout) or not isinstance(self.layouts, (list, tuple)):
            raise TypeError(f"Batch layouts of type {type(self.layouts).__name__}: expected a list of ImageLayout")
        self.layouts = list(self.layouts)
        if not self.layouts:
            raise ValueError("Batch: no layouts, expected one per image (at least one image)")
        for i, lay in enumerate(self.layouts):
            if not isinstance(lay, ImageLayout):
                raise TypeError(f"Batch layouts[{i}] of type {type(lay).__name__}: expected an ImageLayout")
            if lay.mode != self.mode:
                raise ValueError(f"Batch layouts[{i}] has {lay.mode}, the batch has {self.mode}: expected one mode")
            if lay != grid_layout(self.mode, lay.grid, lay.width, lay.height):
                raise ValueError(f"Batch layouts[{i}] = {lay}: inconsistent, expected what "
                                 f"gundam.layout.grid_layout makes of its mode and grid")
        B, S = self.mode.base_size, self.mode.image_size
        _check_views(self.global_views, "global_views", (self.n_images, 3, B, B), "one per layout")
        _check_views(self.crops, "crops", (sum(self.n_crops), 3, S, S), f"the layouts' crops: {self.n_crops}")

    @classmethod
    def from_views(cls, views, mode: str | Mode) -> "Batch":
        """A batch of images' views, each (global view [3, B, B], crops [n_crops, 3, S, S], layout) as
        `image_views` gives them: global views stacked, crops concatenated in image order, pixels as given
        (uint8 stays uint8: the encoder normalises on its device)."""
        views = list(views)
        if not views:
            raise ValueError("Batch.from_views: got no views, expected one (global view, crops, layout) per image")
        globals_, crops, layouts = zip(*views)
        return cls(torch.stack(globals_), torch.cat(crops), list(layouts), mode)

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

    def to(self, device=None, dtype=None, non_blocking: bool = False) -> "Batch":
        move = dict(device=device, dtype=dtype, non_blocking=non_blocking)
        return Batch(self.global_views.to(**move), self.crops.to(**move), self.layouts, self.mode)

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


def _check_views(x, name, shape, why):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"Batch {name} of type {type(x).__name__}: expected a tensor {list(shape)}")
    if not (x.dtype == torch.uint8 or x.is_floating_point()):
        raise TypeError(f"Batch {name}: dtype {x.dtype}, expected uint8 (0..255) or floating point (in [-1, 1])")
    if tuple(x.shape) != shape:
        raise ValueError(f"Batch {name}: shape {list(x.shape)}, expected {list(shape)} ({why})")


def check_pixel_values(x: torch.Tensor, name: str, device: torch.device):
    """Float pixels must be normalised, [-1, 1] (NaN, Inf or 0..255 floats would give wrong embeddings, not an
    error): one reduction while they are still on the host. Pixels already on a GPU are not checked: reading
    the result would make the forward wait for the device (and break CUDA-graph capture). uint8 pixels are
    always in range. Meta pixels (no data) go only to a meta encoder (counting FLOPs)."""
    if x.is_meta:
        if device.type != "meta":
            raise ValueError(f"batch {name} is a meta tensor (no data), the encoder is on {device}: expected "
                             f"pixels (a meta batch runs only through a meta encoder, e.g. to count FLOPs)")
        return
    if x.is_floating_point() and x.numel() and x.device.type == "cpu":
        worst = x.abs().amax().item()  # NaN propagates through amax
        if not worst <= 1 + 1e-3:
            bad = "NaN" if worst != worst else "Inf" if worst == float("inf") else f"|value| up to {worst:.4g}"
            raise ValueError(f"batch {name}: {bad}: expected normalised pixels in [-1, 1] (or uint8 0..255)")


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
    if isinstance(images, (bytes, bytearray, np.ndarray, torch.Tensor)) or not hasattr(images, "__iter__"):
        raise TypeError(f"images of type {type(images).__name__}: expected a PIL image or a path, or a list of them")
    images = list(images)
    if not images:
        raise ValueError("preprocess: got no images, expected at least one")
    batch = Batch.from_views((image_views(source, mode) for source in images), mode)
    return Batch(normalize(batch.global_views), normalize(batch.crops), batch.layouts, mode)
