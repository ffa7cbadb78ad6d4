"""transformers' native classes: `DeepseekOcr2ForConditionalGeneration` (DeepSeek-OCR 2) and
`UnlimitedOcrForConditionalGeneration` (baidu/Unlimited-OCR: DeepEncoder's SAM + CLIP under other names).

Read (behaviour only) in transformers 5.23.0, models/deepseek_ocr2 and models/unlimited_ocr (modeling,
configuration, image processing). The inner `DeepseekOcr2Model` / `UnlimitedOcrModel` holds the encoder:
`vision_tower.sam_encoder` (SAM), `vision_tower.vision_encoder` (DeepSeek-OCR 2: Qwen2 as an encoder, with the
query tables `vision_tower.query_768_resolution` / `query_1024_resolution`; Unlimited-OCR: CLIP),
`multi_modal_projector`, `view_separator` and (Unlimited-OCR) `image_newline`.
`get_image_features(pixel_values [n, 3, B, B], pixel_values_local [all crops, 3, S, S] or None,
num_local_patches [n], patches_grid [n x (columns, rows)], Unlimited-OCR only)` runs the vision tower on the
global views, then on all crops, projects them, and returns `pooler_output`: one tensor per image, laid out as
the vendor lays it out (DeepSeek-OCR 2: crop by crop, the global view, the separator; Unlimited-OCR: the crops'
grid rows, the global rows, each row followed by image_newline, then the separator). `forward` concatenates them
and scatters them at the image tokens; `generate` calls `model.base_model.get_image_features` once, before the
prefill, with the model arguments its signature names.

Compared with the vendor's math (DESIGN.md sections 3 and 11), the native classes compute the same, except:
- Unlimited-OCR's CLIP keeps separate q_proj, k_proj, v_proj (the vendor fuses them in qkv_proj), and one
  layer_norm_eps for pre_layrnorm and the layers: the encoder holds the three weights as they are
  (`SplitQkvClipAttention`) and takes the eps from the config;
- SAM's neck LayerNorms have eps 1e-6 whatever `layer_norm_eps` says: a config whose eps differs is refused;
- an image with exactly one crop (a processor run with min_patches=1) is laid out as one crop (Unlimited-OCR: a
  1x1 grid with newlines); the vendor never cuts a 1x1 grid, and this encoder has no such layout: refused;
- DeepSeek-OCR 2's processor with crop_to_patches=False makes 768 px global views, which the vendor never
  makes: refused (this encoder's DeepSeek-OCR 2 global views are the query_1024 table's, 1024 px);
- the DeepSeek-OCR 2 mask (visual tokens attend to each other, query i to every visual token and queries 0..i)
  is the vendor's prefix mask, built by `create_causal_mask` with `block_sequence_ids`; RoPE is the default
  one over positions 0..2m-1, from the `inv_freq` buffer: one that is not float32 (a model cast with `.to()`)
  or not rope_theta's is refused, as are other RoPE types, activations, attention implementations and, while
  training, attention dropout.

The patch replaces `get_image_features` on the inner model's instance with an object whose signature is the
host's (generate reads it): all images of the call in one encoder pass, the host's pooler_output within rounding.
The encoder's other outputs are not kept (its tokens never exist unprojected on the Triton path), so
`last_hidden_state` and the `local_*` fields are None, and asking for hidden states, attentions or a tuple
(`return_dict=False`) is refused. Unlike the vendor's remote code, which encodes under no_grad, the host records
autograd: so does the patch (the encoder trains through it).
"""
from __future__ import annotations

import inspect
import math
import re
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from gundam.config import ClipConfig, EncoderConfig, Ocr2Config, ProjectorConfig, Qwen2Config, SamConfig
from gundam.model import ClipAttention, fast_linear, kernels
from gundam.hosts.shared import build_around
from gundam.vendor import vendor_batch

VERSION = "transformers 5.23.0"   # what was read
# the inner model classes, (module, class name) -> (get_image_features' parameters after self and before
# **kwargs, the output class it returns, from the same module)
CLASSES = {
    ("transformers.models.deepseek_ocr2.modeling_deepseek_ocr2", "DeepseekOcr2Model"):
        (("pixel_values", "pixel_values_local", "num_local_patches"), "DeepseekOcr2ModelOutputWithPooling"),
    ("transformers.models.unlimited_ocr.modeling_unlimited_ocr", "UnlimitedOcrModel"):
        (("pixel_values", "pixel_values_local", "num_local_patches", "patches_grid"),
         "UnlimitedOcrModelOutputWithPooling"),
}
# native parameter names -> the encoder's (the vendor's), first match wins; applied to the names under the inner
# model (the language model's are never read)
RENAMES = [(re.compile(a), b) for a, b in [
    (r"vision_tower\.sam_encoder\.patch_embed\.projection\.", "sam_model.patch_embed.proj."),
    (r"vision_tower\.sam_encoder\.pos_embed$", "sam_model.pos_embed"),
    (r"vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"sam_model.blocks.\1.norm\2."),
    (r"vision_tower\.sam_encoder\.layers\.(\d+)\.", r"sam_model.blocks.\1."),                  # attn.*, mlp.*
    (r"vision_tower\.sam_encoder\.neck\.conv1\.", "sam_model.neck.0."),
    (r"vision_tower\.sam_encoder\.neck\.layer_norm1\.", "sam_model.neck.1."),
    (r"vision_tower\.sam_encoder\.neck\.conv2\.", "sam_model.neck.2."),
    (r"vision_tower\.sam_encoder\.neck\.layer_norm2\.", "sam_model.neck.3."),
    (r"vision_tower\.sam_encoder\.proj\.conv1\.", "sam_model.net_2."),
    (r"vision_tower\.sam_encoder\.proj\.conv2\.", "sam_model.net_3."),
    # Unlimited-OCR's CLIP
    (r"vision_tower\.vision_encoder\.embeddings\.", "vision_model.embeddings."),
    (r"vision_tower\.vision_encoder\.pre_layrnorm\.", "vision_model.pre_layrnorm."),
    (r"vision_tower\.vision_encoder\.encoder\.layers\.", "vision_model.transformer.layers."),
    # DeepSeek-OCR 2's Qwen2 and its query tables
    (r"vision_tower\.vision_encoder\.(layers|norm)\.", r"qwen2_model.model.model.\1."),
    (r"vision_tower\.query_768_resolution\.", "qwen2_model.query_768."),
    (r"vision_tower\.query_1024_resolution\.", "qwen2_model.query_1024."),
    (r"multi_modal_projector\.", "projector.layers."),
    (r"view_separator$", "view_seperator"),
]]
VECTORS = ("view_separator", "image_newline")
ATTENTION = ("eager", "sdpa")     # the attention implementations whose math was read (the same up to rounding)


def host_class(module):
    """The native class `module` is (or derives from), or None."""
    return next((c for c in type(module).__mro__ if (c.__module__, c.__name__) in CLASSES), None)


def is_host(module) -> bool:
    return host_class(module) is not None


def is_ocr2(owner) -> bool:
    return host_class(owner).__name__ == "DeepseekOcr2Model"


def replacements(model, owner, state):
    features = Ocr2ImageFeatures if is_ocr2(owner) else UnlimitedImageFeatures
    return [(owner, "get_image_features", features(state))]


def host_parameters(owner) -> dict[str, nn.Parameter]:
    """The host's encoder parameters by the encoder's (the vendor's) names."""
    named = [*owner.vision_tower.named_parameters(prefix="vision_tower"),
             *owner.multi_modal_projector.named_parameters(prefix="multi_modal_projector"),
             *((name, getattr(owner, name)) for name in VECTORS if hasattr(owner, name))]
    return {_rename(name): p for name, p in named}


def _rename(name: str) -> str:
    for pattern, repl in RENAMES:
        if pattern.match(name):
            return pattern.sub(repl, name, count=1)
    return name    # not the encoder's: reported as unexpected when the encoder is built


def shared_encoder(owner, backend: str):
    """A GundamEncoder whose parameters are the host's (see gundam.hosts.shared.build_around); also returns the
    host parameters it holds. What the encoder cannot reproduce is refused here, before anything is patched."""
    cls = host_class(owner)
    want = CLASSES[(cls.__module__, cls.__name__)][0]
    got = tuple(p for p in inspect.signature(cls.get_image_features).parameters if p not in ("self", "kwargs"))
    if got != want:
        raise TypeError(f"gundam.patch: {cls.__name__}.get_image_features takes {list(got)}, expected {list(want)} "
                        f"(read at {VERSION})")
    check_host(owner)
    params = host_parameters(owner)
    devices = sorted({str(p.device) for p in params.values()})
    if len(devices) > 1:
        raise ValueError(f"gundam.patch: the host's vision tower is spread over {', '.join(devices)}; GundamEncoder "
                         f"needs it on one device")
    try:
        config = ocr2_config(owner) if is_ocr2(owner) else unlimited_config(owner)
    except (ValueError, TypeError) as e:
        raise ValueError(f"gundam.patch: the host's encoder is not DeepEncoder-shaped ({e})") from None
    adapt = None if is_ocr2(owner) else split_clip_qkv
    return build_around(params, config, backend, adapt)


def sam_config(owner, net_3: int) -> SamConfig:
    s = owner.config.vision_config.sam_config
    neck_eps = owner.vision_tower.sam_encoder.neck.layer_norm1.eps
    if s.layer_norm_eps != neck_eps:   # the native neck hard-codes its eps; this encoder has one eps for both
        raise ValueError(f"sam_config.layer_norm_eps={s.layer_norm_eps} while the neck's LayerNorms use "
                         f"{neck_eps}; the encoder uses one eps for SAM's blocks and neck")
    if s.hidden_act != "gelu" or not (s.qkv_bias and s.use_abs_pos and s.use_rel_pos):
        raise ValueError(f"sam_config hidden_act={s.hidden_act!r}, qkv_bias={s.qkv_bias}, use_abs_pos="
                         f"{s.use_abs_pos}, use_rel_pos={s.use_rel_pos}: expected 'gelu' and True for all three")
    down = list(s.downsample_channels)
    if len(down) != 2 or down[1] != net_3:
        raise ValueError(f"sam_config.downsample_channels={down}: expected [net_2, {net_3}]")
    return SamConfig(img_size=s.image_size, patch_size=s.patch_size, embed_dim=s.hidden_size,
                     depth=s.num_hidden_layers, num_heads=s.num_attention_heads, mlp_ratio=s.mlp_dim / s.hidden_size,
                     out_chans=s.output_channels, window_size=s.window_size,
                     global_attn_indexes=tuple(s.global_attn_indexes), net_2_chans=down[0], net_3_chans=down[1],
                     layer_norm_eps=s.layer_norm_eps)


def _projector(owner) -> ProjectorConfig:
    p = owner.multi_modal_projector
    return ProjectorConfig(input_dim=p.in_features, n_embed=p.out_features)


def ocr2_config(owner) -> Ocr2Config:
    e = owner.config.vision_config.encoder_config
    if e.hidden_act != "silu":
        raise ValueError(f"encoder_config.hidden_act={e.hidden_act!r}: expected 'silu'")
    tower = owner.vision_tower
    rope = tower.vision_encoder.rotary_emb
    theta = e.rope_parameters["rope_theta"]
    head_dim = e.hidden_size // e.num_attention_heads
    # the default RoPE's inverse frequencies, as the encoder computes them (gundam.model.rope_tables)
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if rope.rope_type != "default" or rope.attention_scaling != 1.0 or not (
            rope.inv_freq.is_meta or torch.equal(rope.inv_freq.cpu(), inv_freq)):
        raise ValueError(f"the vision encoder's RoPE (rope_type={rope.rope_type!r}, attention_scaling="
                         f"{rope.attention_scaling}) is not the default one of rope_theta={theta}")
    sides = [math.isqrt(t.num_embeddings) for t in (tower.query_768_resolution, tower.query_1024_resolution)]
    qwen2 = Qwen2Config(hidden_size=e.hidden_size, num_hidden_layers=e.num_hidden_layers,
                        num_attention_heads=e.num_attention_heads, num_key_value_heads=e.num_key_value_heads,
                        intermediate_size=e.intermediate_size, rms_norm_eps=e.rms_norm_eps, rope_theta=theta)
    # the query tables' rows are the views' tokens: 64 px per token along a side
    return Ocr2Config(sam=sam_config(owner, e.hidden_size), qwen2=qwen2, projector=_projector(owner),
                      base_size=64 * sides[1], image_size=64 * sides[0])


def unlimited_config(owner) -> EncoderConfig:
    e = owner.config.vision_config.encoder_config
    if e.hidden_act != "quick_gelu":
        raise ValueError(f"encoder_config.hidden_act={e.hidden_act!r}: expected 'quick_gelu'")
    clip = ClipConfig(hidden_size=e.hidden_size, num_layers=e.num_hidden_layers,
                      num_attention_heads=e.num_attention_heads, ffn_hidden_size=e.intermediate_size,
                      image_size=e.image_size, patch_size=e.patch_size,
                      layernorm_epsilon=e.layer_norm_eps, pre_layernorm_epsilon=e.layer_norm_eps)
    return EncoderConfig(sam=sam_config(owner, e.hidden_size), clip=clip, projector=_projector(owner))


def check_host(owner):
    """What the host computes that the encoder would not, checked on every call (each is an attribute read):
    another attention implementation, attention dropout while training, a RoPE buffer cast away from float32."""
    vc = owner.config.vision_config
    for name in ("sam_config", "encoder_config"):
        impl = getattr(vc, name)._attn_implementation
        if impl not in ATTENTION:
            raise ValueError(f"gundam.patch: the host's {name} runs attn_implementation={impl!r}, expected one of "
                             f"{', '.join(ATTENTION)}")
        dropout = getattr(vc, name).attention_dropout
        if owner.vision_tower.training and dropout:
            raise ValueError(f"gundam.patch: the host's {name}.attention_dropout={dropout} while training; "
                             f"GundamEncoder has no dropout (set it to 0, or unpatch)")
    if getattr(vc.encoder_config, "is_causal", True) is False:
        raise ValueError("gundam.patch: the host's encoder_config.is_causal=False (a bidirectional mask), expected "
                         "the vendor's")
    if is_ocr2(owner):
        inv_freq = owner.vision_tower.vision_encoder.rotary_emb.inv_freq
        if inv_freq.dtype != torch.float32:
            raise ValueError(f"gundam.patch: the host's vision RoPE inv_freq is {inv_freq.dtype} (the model was cast "
                             f"with .to()?): the encoder computes RoPE in float32, as the vendor")


class SplitQkvClipAttention(ClipAttention):
    """CLIP's attention with separate q_proj, k_proj and v_proj (Unlimited-OCR's native port) instead of the
    vendor's fused qkv_proj: the same math in three matmuls, so the encoder holds the host's three weights as
    they are (fusing them would copy them)."""

    def __init__(self, hidden_size: int, num_heads: int):
        nn.Module.__init__(self)
        self.num_heads = num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(hidden_size, hidden_size) for _ in range(4))

    def _heads(self, x, linear):
        """x [B, N, C] -> q, k, v [B, heads, N, d]."""
        B, N, C = x.shape
        return [linear(p, x).view(B, N, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj,
                                                                                      self.v_proj)]

    def forward(self, x):
        B, N, C = x.shape
        o = F.scaled_dot_product_attention(*self._heads(x, lambda layer, t: layer(t)))   # [B, heads, N, d]
        return self.out_proj(o.transpose(1, 2).reshape(B, N, C))

    def forward_cpu(self, x):
        B, N, C = x.shape
        o = F.scaled_dot_product_attention(*self._heads(x, fast_linear))
        return fast_linear(self.out_proj, o.transpose(1, 2).reshape(B, N, C))

    def forward_packed(self, x: torch.Tensor, seg) -> torch.Tensor:
        T, C = x.shape
        qkv = torch.stack([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=1)       # [T, 3, C]
        return self.out_proj(kernels().attention.attention(qkv.view(T, 3, self.num_heads, -1), seg))


def split_clip_qkv(enc):
    """The encoder's CLIP attention modules as SplitQkvClipAttention (called on the meta device)."""
    cfg = enc.config.clip
    for layer in enc.vision_model.transformer.layers:
        layer.self_attn = SplitQkvClipAttention(cfg.hidden_size, cfg.num_attention_heads)


# ----------------------------------------------------------------------------------------------------------
# the patched get_image_features

class ImageFeatures:
    """`get_image_features`, patched: every image of the call in one encoder pass, returned as the host returns
    them (its output class, `pooler_output` one tensor per image). An object, not a closure (see
    gundam.hosts.shared.PixelValuesToEmbedding)."""

    def __init__(self, state):
        self.state = state    # gundam.hosts.Patch; state.owner is the DeepseekOcr2Model / UnlimitedOcrModel

    def features(self, pixel_values, pixel_values_local, num_local_patches, patches_grid, kwargs):
        owner = self.state.owner
        return_dict = kwargs.pop("return_dict", None)
        asked = sorted(k for k, v in kwargs.items() if v is not None and v is not False)
        if asked:
            raise ValueError(f"gundam.patch: get_image_features({', '.join(f'{k}={kwargs[k]!r}' for k in asked)}): "
                             f"{POOLER_ONLY}")
        if not (owner.config.return_dict if return_dict is None else return_dict):
            refuse_tuple()
        check_host(owner)
        enc = self.state.current()
        if enc.family == "deepseek-ocr2" and pixel_values.dim() == 4 and pixel_values.shape[-1] != enc.mode.base_size:
            raise ValueError(f"gundam.patch: DeepSeek-OCR 2 global views of {pixel_values.shape[-1]} px (the "
                             f"processor's crop_to_patches=False makes them {enc.mode.image_size} px): GundamEncoder "
                             f"takes the vendor's {enc.mode.base_size} px global views only")
        n = pixel_values.shape[0]
        counts = _crop_counts(n, pixel_values_local, num_local_patches)
        grids = _ocr2_grids(counts) if is_ocr2(owner) else _unlimited_grids(counts, patches_grid)
        crops = pixel_values_local if pixel_values_local is not None else pixel_values[:0]
        # the flat layout of forward_vendor; not forward_vendor itself, which runs under no_grad: the host records
        # autograd here. DeepSeek-OCR 2 encoders take their own mode, DeepSeek-OCR ones any (as forward_vendor)
        batch = vendor_batch(pixel_values, crops, torch.tensor(grids, dtype=torch.long), enc.config,
                             enc.mode if enc.family == "deepseek-ocr2" else None)
        return pooler_only_output(host_class(owner))(pooler_output=list(enc(batch).split()))


POOLER_ONLY = ("the patched encoder returns pooler_output only (its output's tuple form, which starts with "
               "last_hidden_state for the host, is refused); gundam.unpatch(model) for the host's other outputs")


class PoolerOnly:
    """Put before the host's output class: the patched method fills pooler_output only, so the output's tuple
    form (`return_dict=False`, `output[0]`), which starts with last_hidden_state for the host, would put another
    field at each position. Refused instead (the host's ForConditionalGeneration makes the tuple itself)."""

    def to_tuple(self):
        refuse_tuple()


def refuse_tuple():
    raise ValueError(f"gundam.patch: get_image_features(return_dict=False) or output[int]: {POOLER_ONLY}")


_OUTPUTS = {}


def pooler_only_output(cls):
    """The output class of `cls.get_image_features`, with PoolerOnly first (made once per class)."""
    if cls not in _OUTPUTS:
        host = getattr(sys.modules[cls.__module__], CLASSES[(cls.__module__, cls.__name__)][1])
        _OUTPUTS[cls] = type(host.__name__, (PoolerOnly, host), {"__module__": __name__})
    return _OUTPUTS[cls]


class Ocr2ImageFeatures(ImageFeatures):
    def __call__(self, pixel_values, pixel_values_local=None, num_local_patches=None, **kwargs):
        return self.features(pixel_values, pixel_values_local, num_local_patches, None, kwargs)


class UnlimitedImageFeatures(ImageFeatures):
    def __call__(self, pixel_values, pixel_values_local=None, num_local_patches=None, patches_grid=None, **kwargs):
        return self.features(pixel_values, pixel_values_local, num_local_patches, patches_grid, kwargs)


def _crop_counts(n, pixel_values_local, num_local_patches) -> list[int]:
    """Crops per image: none without pixel_values_local (the host then ignores num_local_patches)."""
    if pixel_values_local is None:
        return [0] * n
    if num_local_patches is None:
        raise ValueError("gundam.patch: get_image_features got pixel_values_local without num_local_patches")
    counts = [int(k) for k in (num_local_patches.tolist() if isinstance(num_local_patches, torch.Tensor)
                               else num_local_patches)]
    if len(counts) != n or sum(counts) != pixel_values_local.shape[0] or min(counts) < 0:
        raise ValueError(f"gundam.patch: num_local_patches={counts} for {n} images and {pixel_values_local.shape[0]} "
                         f"local patches: expected one count per image, summing to the patches")
    return counts


def _one_crop(i):
    return ValueError(f"gundam.patch: image {i} has a single local patch (a processor run with min_patches=1?): "
                      f"the vendor never crops to a 1x1 grid and GundamEncoder has no such layout")


def _ocr2_grids(counts) -> list[tuple[int, int]]:
    """DeepSeek-OCR 2 lays crops out one after another, whatever the grid: k crops as a k x 1 grid."""
    for i, k in enumerate(counts):
        if k == 1:
            raise _one_crop(i)
    return [(k, 1) if k else (1, 1) for k in counts]


def _unlimited_grids(counts, patches_grid) -> list[tuple[int, int]]:
    """Unlimited-OCR stitches the crops by patches_grid (columns, rows); an image without crops is laid out
    without them whatever its grid says, as the host does."""
    grids = []
    for i, k in enumerate(counts):
        if not k:
            grids.append((1, 1))
            continue
        if patches_grid is None or len(patches_grid) <= i:
            raise ValueError(f"gundam.patch: image {i} has {k} local patches and no patches_grid entry")
        w, h = (int(v) for v in patches_grid[i])
        if w * h != k:
            raise ValueError(f"gundam.patch: image {i} has {k} local patches for patches_grid {w}x{h}, expected "
                             f"{w * h}")
        if k == 1:
            raise _one_crop(i)
        grids.append((w, h))
    return grids
