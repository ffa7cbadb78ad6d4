"""Configs of the two encoder families, the image modes, and the size facts everything else calls: tokens per
side of a view, which view sizes an encoder takes, the crop limits.

- DeepSeek-OCR's DeepEncoder (`EncoderConfig`): SAM ViT-B -> CLIP-L -> linear projector of both.
- DeepSeek-OCR 2's DeepEncoder V2 (`Ocr2Config`): the same SAM (net_3 512 -> 896) -> a Qwen2-shaped decoder used
  as an encoder over [visual tokens, learned queries] -> linear projector of the queries' outputs.

Field names are the vendor's own constructor/config keywords where the vendor has one, so any encoder the
vendor code can build (including tiny ones for tests) is described by the same words.
"""
from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

MIN_CROPS, MAX_CROPS = 2, 9   # crops per image the vendor allows (min_crops 2; max_crops 6 by default, up to 9)
PATCH_SIZE = 16               # SAM's patch side in px; the vendor's token count (size / 16 / 4) assumes it
NECK_DOWNSAMPLE = 4           # SAM's net_2 and net_3 (stride 2 each) shrink the patch grid 4x per side
TOKEN_PX = PATCH_SIZE * NECK_DOWNSAMPLE   # px per output token along a side: views are multiples of it
MAX_IMAGE_PIXELS = 200_000_000  # larger images are refused: decompression-bomb guard, and the cost model's range


def check_int(value, name: str, lo: int = 1, hi: int | None = None) -> int:
    """`value` as an int (numpy integers too, never bools or floats) within [lo, hi], or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < lo or (hi is not None and value > hi):
        want = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
        raise ValueError(f"{name}={short_repr(value)}: expected {want}")
    return int(value)


def short_repr(value) -> str:
    """repr for error messages, with huge numbers abbreviated (a 400-digit width stays one readable line)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} chars)"


def check_positive(value, name: str) -> float:
    """`value` as a finite positive float (ints and numpy numbers too, never bools), or a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < float("inf"):
        raise ValueError(f"{name}={short_repr(value)}: expected a finite positive number")
    return float(value)


def check_image_size(width, height, name: str = "image") -> tuple[int, int]:
    """(width, height) as positive ints with at most MAX_IMAGE_PIXELS pixels, or a ValueError naming them."""
    w, h = check_int(width, f"{name} width"), check_int(height, f"{name} height")
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} {short_repr(w)}x{short_repr(h)}: {short_repr(w * h)} pixels, expected at most "
                         f"{MAX_IMAGE_PIXELS}")
    return w, h


def tokens_per_side(size: int, name: str = "view size") -> int:
    """Output tokens along a side of a `size` px view (the vendor's ceil(size / 16 / 4), exact here because
    views are multiples of TOKEN_PX); raises for a size the encoder cannot take."""
    return check_view_size(size, name) // TOKEN_PX


def check_view_size(size, name: str = "view size") -> int:
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0 or size % TOKEN_PX:
        raise ValueError(f"{name}={short_repr(size)}: expected a positive multiple of {TOKEN_PX} px")
    return int(size)


@dataclass(frozen=True)
class SamConfig:
    """SAM ViT image encoder, as the vendor's `ImageEncoderViT(...)`, plus the widths of the vendor's
    `net_2` / `net_3` convs (hard-coded there as 256 -> 512 -> 1024)."""
    img_size: int = 1024          # pretrained view size: pos_embed is (img_size/patch_size)^2
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    out_chans: int = 256          # neck width, the input of net_2
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    net_2_chans: int = 512
    net_3_chans: int = 1024       # SAM's output channels: CLIP's token width, half of the projector's input
    layer_norm_eps: float = 1e-6  # blocks' LayerNorms and the neck's LayerNorm2d

    def __post_init__(self):
        if isinstance(self.global_attn_indexes, (str, bytes)) or not hasattr(self.global_attn_indexes, "__iter__"):
            raise ValueError(f"SamConfig.global_attn_indexes={self.global_attn_indexes!r}: expected a tuple of "
                             f"block indices")
        object.__setattr__(self, "global_attn_indexes", tuple(self.global_attn_indexes))
        for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "out_chans", "window_size",
                     "net_2_chans", "net_3_chans"):
            check_int(getattr(self, name), f"SamConfig.{name}")
        if self.patch_size != PATCH_SIZE:   # refused here, not by a later batch: every token count assumes it
            raise ValueError(f"SamConfig.patch_size={self.patch_size}: expected {PATCH_SIZE} (the vendor's token "
                             f"layout counts {TOKEN_PX} px per output token)")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"SamConfig: embed_dim={self.embed_dim} is not a multiple of num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"SamConfig: img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        bad = [i for i in self.global_attn_indexes
               if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"SamConfig.global_attn_indexes={self.global_attn_indexes}: {bad} outside the "
                             f"{self.depth} blocks (0..{self.depth - 1})")
        object.__setattr__(self, "global_attn_indexes", tuple(int(i) for i in self.global_attn_indexes))
        check_positive(self.mlp_ratio, "SamConfig.mlp_ratio")
        check_positive(self.layer_norm_eps, "SamConfig.layer_norm_eps")
        if self.mlp_dim < 1:
            raise ValueError(f"SamConfig.mlp_ratio={self.mlp_ratio}: gives an MLP of {self.mlp_dim} units "
                             f"(embed_dim={self.embed_dim}), expected at least 1")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


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
        for name in ("hidden_size", "num_layers", "num_attention_heads", "ffn_hidden_size", "image_size",
                     "patch_size"):
            check_int(getattr(self, name), f"ClipConfig.{name}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"ClipConfig: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ClipConfig: image_size={self.image_size} is not a multiple of "
                             f"patch_size={self.patch_size}")
        check_positive(self.layernorm_epsilon, "ClipConfig.layernorm_epsilon")
        check_positive(self.pre_layernorm_epsilon, "ClipConfig.pre_layernorm_epsilon")

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

    def __post_init__(self):
        check_int(self.input_dim, "ProjectorConfig.input_dim")
        check_int(self.n_embed, "ProjectorConfig.n_embed")


@dataclass(frozen=True)
class EncoderConfig:
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)

    def __post_init__(self):
        for name, kind in (("sam", SamConfig), ("clip", ClipConfig), ("projector", ProjectorConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"EncoderConfig.{name} of type {type(getattr(self, name)).__name__}: "
                                f"expected a {kind.__name__}")
        # SAM's last conv gives the tokens CLIP consumes; the projector reads both side by side.
        if self.clip.hidden_size != self.sam.net_3_chans:
            raise ValueError(f"ClipConfig.hidden_size={self.clip.hidden_size}: must equal "
                             f"SamConfig.net_3_chans={self.sam.net_3_chans} (SAM's output is CLIP's input)")
        if self.projector.input_dim != self.clip.hidden_size + self.sam.net_3_chans:
            raise ValueError(f"ProjectorConfig.input_dim={self.projector.input_dim}: expected "
                             f"{self.clip.hidden_size + self.sam.net_3_chans} (CLIP hidden + SAM net_3 channels)")

    @staticmethod
    def deepseek_ocr() -> "EncoderConfig":
        """The real DeepSeek-OCR encoder."""
        return EncoderConfig()

    def tokens_per_side(self, size: int, name: str = "view size") -> int:
        """Output tokens along a side of a `size` px view; raises for a size this encoder cannot take."""
        return tokens_per_side(size, name)

    @property
    def mode(self) -> "Mode":
        """The family's default mode, Gundam (this encoder takes every mode of its family)."""
        return MODES["gundam"]


@dataclass(frozen=True)
class Qwen2Config:
    """The Qwen2-0.5B-shaped decoder DeepSeek-OCR 2 runs as an encoder; field names are transformers'
    `Qwen2Config`'s. head_dim = hidden_size / num_attention_heads; RoPE over all of it; q/k/v with bias, o_proj
    without; SwiGLU MLP; RMSNorm before attention, before the MLP and after the last layer."""
    hidden_size: int = 896
    num_hidden_layers: int = 24
    num_attention_heads: int = 14
    num_key_value_heads: int = 2
    intermediate_size: int = 4864
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size"):
            check_int(getattr(self, name), f"Qwen2Config.{name}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"Qwen2Config: hidden_size={self.hidden_size} is not a multiple of "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"Qwen2Config: num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"Qwen2Config: head_dim={self.head_dim} is odd, expected an even size (RoPE rotates "
                             f"pairs)")
        check_positive(self.rms_norm_eps, "Qwen2Config.rms_norm_eps")
        check_positive(self.rope_theta, "Qwen2Config.rope_theta")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class Ocr2Config:
    """DeepSeek-OCR 2's encoder (DeepEncoder V2). base_size / image_size: the global and crop view sizes it
    takes (the vendor's config.py names); its learned query tables `query_1024` and `query_768` have one row per
    output token of those views, (base_size/64)^2 and (image_size/64)^2, whatever the sizes (the names are the
    checkpoint's)."""
    sam: SamConfig = field(default_factory=lambda: SamConfig(net_3_chans=896))
    qwen2: Qwen2Config = field(default_factory=Qwen2Config)
    projector: ProjectorConfig = field(default_factory=lambda: ProjectorConfig(input_dim=896, n_embed=1280))
    base_size: int = 1024
    image_size: int = 768

    def __post_init__(self):
        for name, kind in (("sam", SamConfig), ("qwen2", Qwen2Config), ("projector", ProjectorConfig)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"Ocr2Config.{name} of type {type(getattr(self, name)).__name__}: "
                                f"expected a {kind.__name__}")
        object.__setattr__(self, "base_size", check_view_size(self.base_size, "Ocr2Config.base_size"))
        object.__setattr__(self, "image_size", check_view_size(self.image_size, "Ocr2Config.image_size"))
        if self.base_size == self.image_size:   # the query table is chosen by the view's token count
            raise ValueError(f"Ocr2Config: base_size={self.base_size} equals image_size={self.image_size}, "
                             f"expected two view sizes (each has its own query table)")
        if self.qwen2.hidden_size != self.sam.net_3_chans:
            raise ValueError(f"Qwen2Config.hidden_size={self.qwen2.hidden_size}: must equal "
                             f"SamConfig.net_3_chans={self.sam.net_3_chans} (SAM's output is the encoder's input)")
        if self.projector.input_dim != self.qwen2.hidden_size:
            raise ValueError(f"ProjectorConfig.input_dim={self.projector.input_dim}: expected "
                             f"{self.qwen2.hidden_size} (Qwen2Config.hidden_size)")

    @staticmethod
    def deepseek_ocr2() -> "Ocr2Config":
        """The real DeepSeek-OCR 2 encoder."""
        return Ocr2Config()

    @property
    def mode(self) -> "Mode":
        """The mode this encoder's views come from: DeepSeek-OCR 2's, at this config's view sizes."""
        return dataclasses.replace(MODES["ocr2"], base_size=self.base_size, image_size=self.image_size)

    def tokens_per_side(self, size: int, name: str = "view size") -> int:
        """Output tokens along a side of a `size` px view; raises for a size this encoder cannot take."""
        if size not in (self.base_size, self.image_size):
            raise ValueError(f"{name}={short_repr(size)}: this DeepSeek-OCR 2 encoder takes views of "
                             f"{self.base_size} and {self.image_size} px only (one query table each)")
        return tokens_per_side(size, name)


FAMILIES = ("deepseek-ocr", "deepseek-ocr2")   # DeepEncoder (EncoderConfig), DeepEncoder V2 (Ocr2Config)


def family_of(config) -> str:
    """The encoder family of a config."""
    if isinstance(config, Ocr2Config):
        return "deepseek-ocr2"
    if isinstance(config, EncoderConfig):
        return "deepseek-ocr"
    raise TypeError(f"config of type {type(config).__name__}: expected an EncoderConfig (DeepSeek-OCR) or an "
                    f"Ocr2Config (DeepSeek-OCR 2)")


def check_mode(config, mode: "Mode"):
    """Views of `mode` are what an encoder of `config` takes (its family; DeepSeek-OCR 2: its two view sizes),
    or a one-line ValueError."""
    family = family_of(config)
    if mode.family != family:
        raise ValueError(f"views of a {mode.family} mode ({mode.base_size}/{mode.image_size}) for a {family} "
                         f"encoder: expected a mode of its family")
    if family == "deepseek-ocr2":
        for name in ("base_size", "image_size"):
            if getattr(mode, name) != getattr(config, name):
                raise ValueError(f"mode {name}={getattr(mode, name)}: this DeepSeek-OCR 2 encoder takes "
                                 f"{name}={getattr(config, name)} (Ocr2Config)")


def default_config(family: str):
    """The real encoder of a family."""
    return Ocr2Config.deepseek_ocr2() if family == "deepseek-ocr2" else EncoderConfig.deepseek_ocr()


def _check_crops(min_crops, max_crops, what="Mode"):
    lo = check_int(min_crops, f"{what} min_crops", MIN_CROPS, MAX_CROPS)
    hi = check_int(max_crops, f"{what} max_crops", MIN_CROPS, MAX_CROPS)
    if lo > hi:
        raise ValueError(f"{what} min_crops={lo} > max_crops={hi}: expected "
                         f"{MIN_CROPS} <= min_crops <= max_crops <= {MAX_CROPS}")


@dataclass(frozen=True)
class Mode:
    """How an image becomes views: a `base_size` global view, and `image_size` crops when `crop_mode` is on
    (the crop grid has `min_crops..max_crops` tiles) and the image is larger than `small_image` on a side.
    Sizes are multiples of 64 px (the vendor's token count is size / 64 per side). `family`: whose encoder
    the views are for, which decides the token layout (gundam.layout): DeepSeek-OCR's rows with newlines, or
    DeepSeek-OCR 2's crops, global view and separator without."""
    base_size: int
    image_size: int
    crop_mode: bool
    min_crops: int = MIN_CROPS
    max_crops: int = 6
    small_image: int = 640        # an image with both sides <= this is never cropped (the vendor's 640; OCR 2: 768)
    family: str = "deepseek-ocr"

    def __post_init__(self):
        object.__setattr__(self, "base_size", check_view_size(self.base_size, "Mode.base_size"))
        object.__setattr__(self, "image_size", check_view_size(self.image_size, "Mode.image_size"))
        for name in ("base_size", "image_size"):
            if getattr(self, name) ** 2 > MAX_IMAGE_PIXELS:
                raise ValueError(f"Mode.{name}={short_repr(getattr(self, name))}: expected a view of at most "
                                 f"{MAX_IMAGE_PIXELS} pixels")
        if not isinstance(self.crop_mode, bool):
            raise ValueError(f"Mode.crop_mode={self.crop_mode!r}: expected True or False")
        _check_crops(self.min_crops, self.max_crops)
        object.__setattr__(self, "min_crops", int(self.min_crops))
        object.__setattr__(self, "max_crops", int(self.max_crops))
        object.__setattr__(self, "small_image", check_int(self.small_image, "Mode.small_image"))
        if self.family not in FAMILIES:
            raise ValueError(f"Mode.family={self.family!r}: expected one of {', '.join(FAMILIES)}")

    @property
    def qb(self) -> int:
        """Tokens per side of the global view."""
        return tokens_per_side(self.base_size)

    @property
    def qi(self) -> int:
        """Tokens per side of a crop."""
        return tokens_per_side(self.image_size)


MODES: dict[str, Mode] = {
    "tiny": Mode(512, 512, False),
    "small": Mode(640, 640, False),
    "base": Mode(1024, 1024, False),
    "large": Mode(1280, 1280, False),
    "gundam": Mode(1024, 640, True),
    "gundam-m": Mode(1280, 1024, True),
    "ocr2": Mode(1024, 768, True, small_image=768, family="deepseek-ocr2"),   # DeepSeek-OCR 2
}


def resolve_mode(mode: str | Mode = "gundam", max_crops: int | None = None) -> Mode:
    """A mode name or `Mode`, with `max_crops` (MIN_CROPS..MAX_CROPS) overriding the mode's own when given."""
    if isinstance(mode, str):
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: expected one of {', '.join(MODES)} or a Mode(...)")
        mode = MODES[mode]
    elif not isinstance(mode, Mode):
        raise TypeError(f"mode={mode!r}: expected a mode name or a Mode")
    if max_crops is not None:
        max_crops = check_int(max_crops, "max_crops", MIN_CROPS, MAX_CROPS)
        if max_crops < mode.min_crops:
            raise ValueError(f"max_crops={max_crops} is below the mode's min_crops={mode.min_crops}")
        mode = dataclasses.replace(mode, max_crops=max_crops)
    return mode
