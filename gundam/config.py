"""Configs of the DeepEncoder (SAM ViT-B -> CLIP-L -> linear projector) and the image modes.

Field names are the vendor's own constructor/config keywords, so any encoder the vendor code can build
(including tiny ones for tests) is described by the same words.
"""
from __future__ import annotations

from dataclasses import dataclass, field

MIN_CROPS_LIMIT, MAX_CROPS_LIMIT = 1, 9


@dataclass(frozen=True)
class SamConfig:
    """SAM ViT image encoder, as the vendor's `ImageEncoderViT(...)`; `net_2`/`net_3` are 256->512->1024."""
    img_size: int = 1024          # pretrained view size: pos_embed is (img_size/patch_size)^2
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)

    def __post_init__(self):
        object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
        if self.embed_dim % self.num_heads:
            raise ValueError(f"SamConfig: embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


@dataclass(frozen=True)
class ClipConfig:
    """CLIP-L vision transformer, as the vendor's `vit_model_cfg`. Position grid = image_size // patch_size."""
    hidden_size: int = 1024
    num_layers: int = 24
    num_attention_heads: int = 16
    ffn_hidden_size: int = 4096
    image_size: int = 224
    patch_size: int = 14
    layernorm_epsilon: float = 1e-5
    pre_layernorm_epsilon: float = 1e-5

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ClipConfig: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class ProjectorConfig:
    """The linear projector: cat(CLIP tokens, SAM tokens) -> language-model width."""
    input_dim: int = 2048
    n_embed: int = 1280


@dataclass(frozen=True)
class EncoderConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self):
        # SAM's last conv gives 1024 channels; CLIP consumes them as its tokens.
        if self.clip.hidden_size != 1024:
            raise ValueError(f"ClipConfig.hidden_size={self.clip.hidden_size}: must be 1024, the channels of SAM's net_3")
        if self.projector.input_dim != self.clip.hidden_size + 1024:
            raise ValueError(f"ProjectorConfig.input_dim={self.projector.input_dim}: expected "
                             f"{self.clip.hidden_size + 1024} (CLIP hidden + SAM net_3 channels)")

    @staticmethod
    def deepseek_ocr() -> "EncoderConfig":
        """The real DeepSeek-OCR encoder."""
        return EncoderConfig()

    @property
    def downsample(self) -> int:
        """Pixels per output token along a side: patch size x 4 (net_2 and net_3 halve the grid each)."""
        return self.sam.patch_size * 4


@dataclass(frozen=True)
class Mode:
    """How an image becomes views: a `base_size` global view, and `image_size` crops when `crop_mode` is on."""
    base_size: int
    image_size: int
    crop_mode: bool
    min_crops: int = 2
    max_crops: int = 6

    def __post_init__(self):
        for name in ("base_size", "image_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % 64:
                raise ValueError(f"Mode.{name}={v!r}: expected a positive multiple of 64")
        if not (MIN_CROPS_LIMIT <= self.min_crops <= self.max_crops <= MAX_CROPS_LIMIT):
            raise ValueError(f"Mode crops min={self.min_crops} max={self.max_crops}: expected "
                             f"{MIN_CROPS_LIMIT} <= min_crops <= max_crops <= {MAX_CROPS_LIMIT}")


MODES: dict[str, Mode] = {
    "tiny": Mode(512, 512, False),
    "small": Mode(640, 640, False),
    "base": Mode(1024, 1024, False),
    "large": Mode(1280, 1280, False),
    "gundam": Mode(1024, 640, True),
    "gundam-m": Mode(1280, 1024, True),
}


def resolve_mode(mode: str | Mode = "gundam", max_crops: int | None = None) -> Mode:
    """A mode name or `Mode`, with `max_crops` (2..9) overriding the mode's own when given."""
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)} or a Mode(...)")
        mode = MODES[mode]
    elif not isinstance(mode, Mode):
        raise TypeError(f"mode={mode!r}: expected a mode name or a Mode")
    if max_crops is not None:
        if isinstance(max_crops, bool) or not isinstance(max_crops, int) or not (2 <= max_crops <= MAX_CROPS_LIMIT):
            raise ValueError(f"max_crops={max_crops!r}: expected an integer in 2..{MAX_CROPS_LIMIT}")
        if max_crops < mode.min_crops:
            raise ValueError(f"max_crops={max_crops} is below the mode's min_crops={mode.min_crops}")
        mode = Mode(mode.base_size, mode.image_size, mode.crop_mode, mode.min_crops, max_crops)
    return mode
