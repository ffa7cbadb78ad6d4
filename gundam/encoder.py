"""`GundamEncoder`: the DeepEncoder as one module, for a batch of images in any mix of crop grids.

    enc = gundam.GundamEncoder.from_pretrained("DeepSeek-OCR/", dtype=torch.bfloat16, device="cuda")
    out = enc(gundam.preprocess(["page1.png", "page2.png"]))   # EncoderOutput
    per_image = out.split()                                    # [tokens_i, 1280] each

`forward_vendor` is a drop-in for the vendor's `_pixel_values_to_embedding`. `backend` picks the pure-torch
path ("torch"), the packed Triton path ("triton", inference only) or Triton for inference on CUDA and torch
otherwise ("auto").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from gundam.config import EncoderConfig, Mode
from gundam.images import Batch, check_pixel_values, normalize
from gundam.layout import grid_layout, layout_tokens
from gundam.model import build_modules, encode_views
from gundam.packed import check_triton_available, encode_packed

BACKENDS = ("auto", "torch", "triton")
STAGES = ("sam", "clip", "layout")   # `EncoderOutput.timings` keys, both backends ("layout": projector + layout)


class StageTimer:
    """Seconds per stage of one forward. On CUDA, events are recorded between stages and read only when the
    timings are asked for, so timing adds no host synchronisation to the forward."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = [("start", self._now())]

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, stage: str):
        self.marks.append((stage, self._now()))

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = dict.fromkeys(STAGES, 0.0)
        for (_, t0), (stage, t1) in zip(self.marks, self.marks[1:]):
            out[stage] += t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
        return out


@dataclass
class EncoderOutput:
    """All images' tokens packed: image i is embeddings[offsets[i]:offsets[i+1]]."""
    embeddings: torch.Tensor          # [total_tokens, n_embed]
    offsets: torch.Tensor             # [n_images + 1], int64, on the CPU
    timer: StageTimer | None = field(default=None, repr=False)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage ("sam", "clip", "layout") of the forward that made this output."""
        return self.timer.seconds() if self.timer else {}

    def split(self) -> list[torch.Tensor]:
        return list(torch.split(self.embeddings, torch.diff(self.offsets).tolist()))


class GundamEncoder(nn.Module):
    """SAM ViT-B + CLIP-L + projector with the vendor's parameter names, plus `image_newline`/`view_seperator`."""

    def __init__(self, config: EncoderConfig | None = None, backend: str = "auto"):
        super().__init__()
        if config is not None and not isinstance(config, EncoderConfig):
            raise TypeError(f"config of type {type(config).__name__}: expected an EncoderConfig (or None for "
                            f"DeepSeek-OCR's)")
        self.config = config = config or EncoderConfig.deepseek_ocr()
        self.backend = _check_backend(backend)
        self.sam_model, self.vision_model, self.projector = build_modules(config)
        n = config.projector.n_embed
        std = 1 / torch.sqrt(torch.tensor(n, dtype=torch.float32))
        self.image_newline = nn.Parameter(torch.randn(n) * std)
        self.view_seperator = nn.Parameter(torch.randn(n) * std)
        # Vendor checkpoints carry CLIP's unused patch-embedding conv and position ids: drop them on load.
        self._register_load_state_dict_pre_hook(_drop_unused_keys)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str = torch.float32, device="cpu", backend: str = "auto",
                        config: EncoderConfig | None = None, strict: bool = True) -> "GundamEncoder":
        """Encoder weights from a DeepSeek-OCR safetensors checkpoint (file, directory or sharded directory).

        dtype: a floating torch dtype or a name ("bfloat16", "bf16", "fp16", ...); device: one this torch has.
        strict=False ignores encoder tensors the config does not use (by default they are an error: a deeper
        checkpoint than the config would otherwise load as a silently different model)."""
        from gundam.weights import load_encoder_state_dict, resolve_device, resolve_dtype
        dtype, device = resolve_dtype(dtype), resolve_device(device)
        with torch.device("meta"):
            enc = cls(config, backend=backend)
        state = load_encoder_state_dict(path, enc, device=device, dtype=dtype, strict=strict)
        enc.load_state_dict(state, assign=True)
        return enc.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.layers.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.layers.weight.device

    def _resolve(self, backend):
        backend = _check_backend(backend or self.backend)
        if backend == "auto":  # the Triton kernels have no backward: train through the torch path
            training = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
            backend = "triton" if self.device.type == "cuda" and not training else "torch"
        if backend == "triton":
            check_triton_available(self.device)
        return backend

    def clear_cache(self):
        """Drop the cached position and rel-pos tables (needed only after writing weights through `.data`)."""
        self.sam_model.tables.clear()
        self.vision_model.embeddings.tables.clear()

    def encode_views(self, pixels: torch.Tensor, mark=None) -> torch.Tensor:
        """Views of one size [B, 3, S, S] -> projected tokens [B, (S/64)^2, n_embed]."""
        return encode_views(self.sam_model, self.vision_model, self.projector, pixels, mark)

    def forward(self, batch: Batch, backend: str | None = None) -> EncoderOutput:
        if not isinstance(batch, Batch):
            raise TypeError(f"batch of type {type(batch).__name__}: expected a gundam.Batch (from gundam.preprocess)")
        backend = self._resolve(backend)
        self._check_batch(batch)
        timer = StageTimer(self.device)
        if backend == "triton":
            return EncoderOutput(encode_packed(self, batch, timer), batch.offsets, timer)
        dev, dt = self.device, self.dtype
        glob = self.encode_views(self.pixels(batch.global_views), timer.mark)    # [n_images, qb*qb, D]
        local = self.encode_views(self.pixels(batch.crops), timer.mark) if batch.crops.shape[0] else None
        out, start = [], 0
        newline, separator = self.image_newline.to(dt), self.view_seperator.to(dt)
        for i, lay in enumerate(batch.layouts):
            crops = local[start:start + lay.n_crops] if lay.n_crops else None   # [n_crops, qi*qi, D]
            start += lay.n_crops
            out.append(layout_tokens(lay, glob[i], crops, newline, separator))
        timer.mark("layout")
        return EncoderOutput(torch.cat(out), batch.offsets, timer)

    def pixels(self, views: torch.Tensor) -> torch.Tensor:
        """Batch pixels (uint8 or normalised float) -> normalised, on this encoder's device and dtype."""
        return normalize(views.to(self.device, non_blocking=True), self.dtype)

    def _check_batch(self, batch: Batch):
        """The batch's token layout must be what this encoder makes of its view sizes, and float pixels must be
        normalised and finite (checked where they are, before the copy to this encoder's device)."""
        check_pixel_values(batch.global_views, "global_views", self.device)
        check_pixel_values(batch.crops, "crops", self.device)
        m = batch.mode
        for name, size, q in (("base_size", m.base_size, m.qb), ("image_size", m.image_size, m.qi)):
            made = self.config.tokens_per_side(size, f"mode {name}")
            if made != q:
                raise ValueError(f"mode {name}={size}: this encoder makes {made} tokens per side, the batch's "
                                 f"layout expects {q} (SamConfig.patch_size={self.config.sam.patch_size})")

    @torch.no_grad()
    def forward_vendor(self, pixel_values, images_crop, images_spatial_crop, backend: str | None = None):
        """Drop-in for the vendor's `_pixel_values_to_embedding`: per-image tensors, same inputs.

        pixel_values [n, 1, 3, B, B]; images_crop [n, 1, N, 3, S, S]; images_spatial_crop [n, 1, 2] (w, h tiles),
        each a tensor or a list of per-image tensors (as vLLM passes them when crop counts differ). As in the
        vendor, an image uses crops iff its crop tensor is not all zeros; it then uses the first w*h of them.
        """
        self._resolve(backend)
        n = _num_images(pixel_values, "pixel_values")
        if _num_images(images_crop, "images_crop") != n or _num_images(images_spatial_crop, "images_spatial_crop") != n:
            raise ValueError(f"forward_vendor: pixel_values, images_crop and images_spatial_crop must have the same "
                             f"number of images, got {n}, {len(images_crop)}, {len(images_spatial_crop)}")
        base = self.config.downsample
        globals_, crops, grids = [], [], []
        for j in range(n):
            g = _check_tensor(pixel_values[j], "pixel_values", (1, 3, None, None))[0]
            if g.shape[-1] != g.shape[-2] or g.shape[-1] % base:
                raise ValueError(f"pixel_values[{j}] is {tuple(g.shape)}: expected square views, a multiple of {base}")
            patches = _check_tensor(images_crop[j], "images_crop", (1, None, 3, None, None))[0]
            sc = torch.as_tensor(images_spatial_crop[j]).reshape(-1)
            if sc.numel() != 2 or sc.is_floating_point():
                raise ValueError(f"images_spatial_crop[{j}] = {sc.tolist()}: expected 2 integers [w_tiles, h_tiles]")
            w, h = int(sc[0]), int(sc[1])
            use_crops = bool(patches.sum().item() != 0)
            if use_crops:
                if w < 1 or h < 1 or patches.shape[0] < w * h:
                    raise ValueError(f"image {j}: grid {w}x{h} needs {max(w * h, 1)} crops, images_crop has "
                                     f"{patches.shape[0]}")
                if patches.shape[-1] != patches.shape[-2] or patches.shape[-1] % base:
                    raise ValueError(f"images_crop[{j}] crops are {tuple(patches.shape[-2:])}: expected square, "
                                     f"a multiple of {base}")
                crops.append(patches[:w * h])
            globals_.append(g)
            grids.append((w, h) if use_crops else (1, 1))
        # views of one size run together (vendor: one SAM/CLIP call per image and per view kind)
        sizes = {g.shape[-1] for g in globals_}
        if len(sizes) != 1 or len({c.shape[-1] for c in crops}) > 1:
            raise ValueError(f"forward_vendor: global views {sorted(sizes)} px and crops "
                             f"{sorted({c.shape[-1] for c in crops})} px: expected one size each")
        B = sizes.pop()
        S = crops[0].shape[-1] if crops else B
        mode = Mode(B, S, bool(crops))
        layouts = [grid_layout(mode, grid) for grid in grids]
        batch = Batch(torch.stack(globals_).float(), torch.cat(crops).float() if crops else torch.zeros(0, 3, S, S),
                      layouts, mode)
        return self.forward(batch, backend).split()


def _check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def _num_images(x, name):
    if isinstance(x, torch.Tensor):
        if x.dim() == 0:
            raise ValueError(f"{name}: got a 0-d tensor, expected one entry per image")
        return x.shape[0]
    if isinstance(x, (list, tuple)):
        return len(x)
    raise TypeError(f"{name} of type {type(x).__name__}: expected a tensor or a list of per-image tensors")


def _check_tensor(x, name, shape):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: entry of type {type(x).__name__}, expected a tensor")
    if not x.is_floating_point():
        raise TypeError(f"{name}: dtype {x.dtype}, expected a floating-point tensor")
    if x.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: per-image shape {tuple(x.shape)}, expected {want}")
    return x


def _drop_unused_keys(state_dict, prefix, *args):
    for key in ("vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_ids"):
        state_dict.pop(prefix + key, None)
