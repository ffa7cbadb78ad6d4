"""`GundamEncoder`: the DeepEncoder as one module, for a batch of images in any mix of crop grids.

    enc = gundam.GundamEncoder.from_pretrained("DeepSeek-OCR/", dtype=torch.bfloat16, device="cuda")
    out = enc(gundam.preprocess(["page1.png", "page2.png"]))   # EncoderOutput
    per_image = out.split()                                    # [tokens_i, 1280] each

`forward_vendor` is a drop-in for the vendor's `_pixel_values_to_embedding`. `backend` picks the pure-torch
path ("torch"), the packed Triton path ("triton") or Triton on CUDA and torch on other devices ("auto"). Both
train: gradients flow through the Triton kernels' backward passes as through the torch path.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from gundam.config import EncoderConfig
from gundam.graphs import CapturedEncoder
from gundam.images import Batch, check_pixel_values, normalize
from gundam.model import build_modules, encode, encode_views
from gundam.output import EncoderOutput, StageTimer
from gundam.packed import encode_packed
from gundam.vendor import vendor_batch
from gundam.weights import UNUSED_KEYS, load_encoder_state_dict, resolve_device, resolve_dtype

BACKENDS = ("auto", "torch", "triton")


def check_backend(backend) -> str:
    """`backend` if it names one (BACKENDS), else a one-line ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend, device) -> str:
    """What `backend` runs as on `device`: "auto" is Triton on CUDA and torch elsewhere, for inference and
    training alike (the kernels have their backward passes); "triton" off CUDA needs Triton's interpreter."""
    backend = check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' on device {device.type!r} needs Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 in the environment before Python starts (or use backend='torch')")
    return backend


class GundamEncoder(nn.Module):
    """SAM ViT-B + CLIP-L + projector with the vendor's parameter names, plus `image_newline`/`view_seperator`."""

    def __init__(self, config: EncoderConfig | None = None, backend: str = "auto"):
        super().__init__()
        if config is not None and not isinstance(config, EncoderConfig):
            raise TypeError(f"config of type {type(config).__name__}: expected an EncoderConfig (or None for "
                            f"DeepSeek-OCR's)")
        self.config = config = config or EncoderConfig.deepseek_ocr()
        self.backend = check_backend(backend)
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
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        with torch.device("meta"):
            enc = cls(config, backend=backend)
        state = load_encoder_state_dict(path, enc, device=device, dtype=dtype, strict=strict)
        enc.load_state_dict(state, assign=True)
        return enc.eval()

    @classmethod
    def build(cls, weights=None, *, config: EncoderConfig | None = None, dtype: torch.dtype | str = "auto",
              device=None, backend: str = "auto", seed: int = 0) -> "GundamEncoder":
        """The encoder a command names: the checkpoint `weights` (see from_pretrained), or random weights drawn
        from `seed` when it is None (every process builds the same; the caller's random state is kept).
        dtype "auto": bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise; device None: CUDA when
        there is one, else the CPU."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        if weights is not None:
            return cls.from_pretrained(weights, dtype=dtype, device=device, backend=backend, config=config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(config, backend=backend).to(device, dtype).eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.projector.layers.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.projector.layers.weight.device

    def _resolve(self, backend):
        return resolve_backend(backend or self.backend, self.device)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Activation checkpointing per SAM block and CLIP layer (transformers' convention): while training,
        each block's activations are recomputed in the backward instead of kept."""
        if gradient_checkpointing_kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r}: expected None "
                             f"(non-reentrant checkpointing is always used)")
        self.sam_model.gradient_checkpointing = self.vision_model.transformer.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.sam_model.gradient_checkpointing = self.vision_model.transformer.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.sam_model.gradient_checkpointing

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
        self.check_batch(batch)
        timer = StageTimer(self.device)
        encode_fn = encode_packed if backend == "triton" else encode
        return EncoderOutput(encode_fn(self, batch, timer), batch.offsets, timer)

    def capture(self, batch: Batch, warmup: int = 2):
        """The Triton forward for batches shaped like `batch` (same modes and crop grids, in order), captured in
        a CUDA graph: `graph = enc.capture(batch); out = graph(next_batch)`. See gundam.graphs."""
        return CapturedEncoder(self, batch, warmup)

    def pixels(self, views: torch.Tensor) -> torch.Tensor:
        """Batch pixels (uint8 or normalised float) -> normalised, on this encoder's device and dtype."""
        return normalize(views.to(self.device, non_blocking=True), self.dtype)

    def pixel_groups(self, batch: Batch) -> list[torch.Tensor]:
        """The batch's views by size, as both paths take them: global views [n, 3, B, B], then the crops
        [n_crops, 3, S, S] when there are any; normalised, on this encoder's device and dtype."""
        return [self.pixels(batch.global_views)] + ([self.pixels(batch.crops)] if batch.crops.shape[0] else [])

    def check_batch(self, batch: Batch):
        """Float pixels must be normalised and finite (checked where they are, before the copy to this
        encoder's device); meta pixels go only to a meta encoder."""
        check_pixel_values(batch.global_views, "global_views", self.device)
        check_pixel_values(batch.crops, "crops", self.device)

    @torch.no_grad()
    def forward_vendor(self, pixel_values, images_crop, images_spatial_crop, backend: str | None = None):
        """Drop-in for the vendor's `_pixel_values_to_embedding`: the same inputs, one [tokens_i, n_embed] tensor
        per image. Takes the per-image layout (pixel_values [n, 1, 3, B, B], images_crop [n, 1, N, 3, S, S],
        images_spatial_crop [n, 1, 2], tensors or per-image lists; crops iff not all zeros, as the vendor) and
        vLLM's flat layout (pixel_values [n, 3, B, B], images_crop [sum of crops, 3, S, S], images_spatial_crop
        [n, 2]; an image has w*h crops when its grid is not 1x1). See gundam.vendor."""
        self._resolve(backend)
        return self.forward(vendor_batch(pixel_values, images_crop, images_spatial_crop, self.config), backend).split()



def _drop_unused_keys(state_dict, prefix, *args):
    for key in UNUSED_KEYS:
        state_dict.pop(prefix + key, None)
