"""`GundamEncoder`: the DeepEncoder as one module, for a batch of images in any mix of crop grids.

    enc = gundam.GundamEncoder.from_pretrained("DeepSeek-OCR/", dtype=torch.bfloat16, device="cuda")
    out = enc(gundam.preprocess(["page1.png", "page2.png"]))   # EncoderOutput
    per_image = out.split()                                    # [tokens_i, 1280] each

`forward_vendor` is a drop-in for the vendor's `_pixel_values_to_embedding`. `backend` picks the pure-torch
path ("torch"), the packed Triton path ("triton"), the CPU fast path ("cpu") or Triton on CUDA and the CPU fast
path on other devices ("auto"). Torch and Triton train: gradients flow through the Triton kernels' backward
passes as through the torch path; "cpu" is for inference and runs the torch path while autograd records.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from gundam.config import EncoderConfig, Mode, Ocr2Config, check_mode, family_of, resolve_mode
from gundam.graphs import CapturedEncoder
from gundam.images import Batch, check_pixel_values, normalize, preprocess
from gundam.model import build_modules, encode, encode_views
from gundam.output import TIMED_STAGES, EncoderOutput, StageTimer
from gundam.packed import encode_packed
from gundam.vendor import vendor_batch
from gundam.weights import UNUSED_KEYS, checked_config, load_encoder_state_dict, resolve_device, resolve_dtype

BACKENDS = ("auto", "torch", "triton", "cpu")


def check_backend(backend) -> str:
    """`backend` if it names one (BACKENDS), else a one-line ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: expected one of {', '.join(BACKENDS)}")
    return backend


def resolve_backend(backend, device) -> str:
    """What `backend` runs as on `device`: "auto" is Triton on CUDA (for inference and training alike: the
    kernels have their backward passes) and the CPU fast path elsewhere; "triton" off CUDA needs Triton's
    interpreter."""
    backend = check_backend(backend)
    device = torch.device(device)
    if backend == "auto":
        backend = "triton" if device.type == "cuda" else "cpu"
    if backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"backend='triton' on device {device.type!r} needs Triton's interpreter: set "
                           f"TRITON_INTERPRET=1 in the environment before Python starts (or use backend='torch')")
    return backend


class GundamEncoder(nn.Module):
    """One encoder family's modules with the vendor's parameter names: DeepSeek-OCR's (an EncoderConfig: SAM ViT-B
    + CLIP-L + projector, `image_newline`, `view_seperator`) or DeepSeek-OCR 2's (an Ocr2Config: SAM + Qwen2 as an
    encoder + projector, `view_seperator`)."""

    def __init__(self, config: EncoderConfig | Ocr2Config | None = None, backend: str = "auto"):
        super().__init__()
        self.config = config = config if config is not None else EncoderConfig.deepseek_ocr()
        self.family = family_of(config)
        self.backend = check_backend(backend)
        for name, module in build_modules(config).items():
            setattr(self, name, module)
        n = config.projector.n_embed
        std = 1 / torch.sqrt(torch.tensor(n, dtype=torch.float32))
        if self.family == "deepseek-ocr":
            self.image_newline = nn.Parameter(torch.randn(n) * std)
        self.view_seperator = nn.Parameter(torch.randn(n) * std)
        # Vendor checkpoints carry CLIP's unused patch-embedding conv and position ids: drop them on load.
        self._register_load_state_dict_pre_hook(_drop_unused_keys)

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | str = torch.float32, device="cpu", backend: str = "auto",
                        config: EncoderConfig | Ocr2Config | None = None, strict: bool = True) -> "GundamEncoder":
        """Encoder weights from a DeepSeek-OCR or DeepSeek-OCR 2 safetensors checkpoint (file, directory or
        sharded directory); which of the two it is, its keys say.

        dtype: a floating torch dtype or a name ("bfloat16", "bf16", "fp16", ...); device: one this torch has;
        config: the encoder's shape (default: the real encoder of the checkpoint's family).
        strict=False ignores encoder tensors the config does not use (by default they are an error: a deeper
        checkpoint than the config would otherwise load as a silently different model)."""
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        config = checked_config(path, config)
        with torch.device("meta"):
            enc = cls(config, backend=backend)
        state = load_encoder_state_dict(path, enc, device=device, dtype=dtype, strict=strict)
        enc.load_state_dict(state, assign=True)
        return enc.eval()

    @classmethod
    def build(cls, weights=None, *, config: EncoderConfig | Ocr2Config | None = None,
              dtype: torch.dtype | str = "auto", device=None, backend: str = "auto", seed: int = 0) -> "GundamEncoder":
        """The encoder a command names: the checkpoint `weights` (see from_pretrained), or random weights drawn
        from `seed` when it is None (every process builds the same; the caller's random state is kept).
        dtype "auto": bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise; device None: CUDA when
        there is one, else the CPU. For the config of a mode's family: `default_config(mode.family)`."""
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

    @property
    def mode(self) -> Mode:
        """The encoder's default mode, its config's: Gundam for DeepSeek-OCR (which takes any mode of its family),
        `ocr2` at the config's view sizes for DeepSeek-OCR 2 (which takes only those)."""
        return self.config.mode

    def preprocess(self, images, mode: str | Mode | None = None, max_crops: int | None = None) -> Batch:
        """`gundam.preprocess` in this encoder's mode (default `self.mode`; another mode must be of its family)."""
        mode = resolve_mode(self.mode if mode is None else mode, max_crops)
        self.check_mode(mode)
        return preprocess(images, mode)

    def check_mode(self, mode: Mode):
        """Views of `mode` are what this encoder takes, or a one-line ValueError (gundam.config.check_mode)."""
        check_mode(self.config, mode)

    def _resolve(self, backend):
        return resolve_backend(backend or self.backend, self.device)

    def _stacks(self) -> list[nn.Module]:
        """The modules whose blocks checkpoint: SAM, and CLIP's or Qwen2's layers."""
        second = self.qwen2_model.model.model if self.family == "deepseek-ocr2" else self.vision_model.transformer
        return [self.sam_model, second]

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        """Activation checkpointing per SAM block and CLIP (or Qwen2) layer (transformers' convention): while
        training, each block's activations are recomputed in the backward instead of kept."""
        if gradient_checkpointing_kwargs:
            raise ValueError(f"gradient_checkpointing_kwargs={gradient_checkpointing_kwargs!r}: expected None "
                             f"(non-reentrant checkpointing is always used)")
        for stack in self._stacks():
            stack.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        for stack in self._stacks():
            stack.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.sam_model.gradient_checkpointing

    def clear_cache(self):
        """Drop the cached position and rel-pos tables (needed only after writing weights through `.data`)."""
        self.sam_model.tables.clear()
        if self.family == "deepseek-ocr":
            self.vision_model.embeddings.tables.clear()

    def encode_views(self, pixels: torch.Tensor, mark=None) -> torch.Tensor:
        """Views of one size [B, 3, S, S] -> projected tokens [B, (S/64)^2, n_embed]."""
        return encode_views(self, pixels, mark)

    def forward(self, batch: Batch, backend: str | None = None) -> EncoderOutput:
        if not isinstance(batch, Batch):
            raise TypeError(f"batch of type {type(batch).__name__}: expected a gundam.Batch (from gundam.preprocess)")
        backend = self._resolve(backend)
        self.check_batch(batch)
        timer = StageTimer(self.device, TIMED_STAGES[self.family])
        if backend == "triton":
            out = encode_packed(self, batch, timer)
        else:   # the CPU fast path has no backward: while autograd records, the torch path
            out = encode(self, batch, timer, fast=backend == "cpu" and not torch.is_grad_enabled())
        return EncoderOutput(out, batch.offsets, timer)

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
        """The batch's views must be of this encoder's family (and view sizes, for DeepSeek-OCR 2); float pixels
        must be normalised and finite (checked where they are, before the copy to this encoder's device); meta
        pixels go only to a meta encoder."""
        self.check_mode(batch.mode)
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
        batch = vendor_batch(pixel_values, images_crop, images_spatial_crop, self.config,
                             self.mode if self.family == "deepseek-ocr2" else None)
        return self.forward(batch, backend).split()



def _drop_unused_keys(state_dict, prefix, *args):
    for key in UNUSED_KEYS:
        state_dict.pop(prefix + key, None)
