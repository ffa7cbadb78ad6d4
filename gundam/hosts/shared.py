"""A `GundamEncoder` built around a host model's own encoder parameters: the same `nn.Parameter` objects, so
no tensor is copied (memory unchanged) and whatever updates the host's parameters updates the encoder.

The hosts' encoder modules are the vendor's classes (or ports of them) with the vendor's parameter names, which
are this project's names too: DeepSeek-OCR's `sam_model.*`, `vision_model.*`, `projector.layers.*`,
`image_newline`, `view_seperator`; DeepSeek-OCR 2's `sam_model.*`, `qwen2_model.*` (transformers' Qwen2Model
under `qwen2_model.model.model`, the query tables `qwen2_model.query_768` / `query_1024`), `projector.layers.*`,
`view_seperator`. The encoder's shape (depth, widths, window, global blocks, heads) is read from the host's
parameters, so any DeepEncoder-shaped host is taken, the real one and small ones alike.

Linears the host has packed away: vLLM's CPU platform repacks every vLLM linear after loading
(`UnquantizedLinearMethod.process_weights_after_loading` -> `dispatch_cpu_unquantized_gemm(layer,
remove_weight=True)`: the weight goes into a oneDNN or sgl-kernel handle, `layer.weight` becomes an empty
parameter and `layer.cpu_linear` runs the product). CLIP's `qkv_proj`, `out_proj`, `fc1`, `fc2` are vLLM linears
(SAM's and the projector's are torch's). The encoder then calls those host layers themselves (`HostLinear`): the
same packed weights the host computes with, no copy and no unpacking.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gundam.config import ClipConfig, EncoderConfig, Ocr2Config, ProjectorConfig, Qwen2Config, SamConfig
from gundam.encoder import GundamEncoder
from gundam.model import ClipAttention, ClipLayer
from gundam.weights import UNUSED_KEYS

# family -> (the modules and the vectors a host model holds its encoder in, by the vendor's names)
PARTS = {"deepseek-ocr": (("sam_model", "vision_model", "projector"), ("image_newline", "view_seperator")),
         "deepseek-ocr2": (("sam_model", "qwen2_model", "projector"), ("view_seperator",))}
MODULES, VECTORS = PARTS["deepseek-ocr"]
# CLIP's linears that a host may run for the encoder (HostLinear), relative to a layer of vision_model.transformer
HOST_RUN = ("self_attn.qkv_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def encoder_family(module) -> str | None:
    """Which encoder a module holds the vendor's way: "deepseek-ocr" (DeepEncoder), "deepseek-ocr2" (DeepEncoder
    V2), or None (not a DeepSeek-OCR model of some host)."""
    for family, (modules, vectors) in PARTS.items():
        if (all(isinstance(getattr(module, name, None), nn.Module) for name in modules)
                and all(isinstance(getattr(module, name, None), torch.Tensor) for name in vectors)):
            return family
    return None


def owns_encoder(module) -> bool:
    """True for a module holding DeepEncoder or DeepEncoder V2 the vendor's way."""
    return encoder_family(module) is not None


def host_parameters(owner) -> dict[str, nn.Parameter]:
    """The host's encoder parameters by the vendor's names (the encoder's state-dict keys); the linears the host
    runs itself (`host_run_linears`) are left out, their weights are not there to share."""
    modules, vectors = PARTS[encoder_family(owner)]
    run = tuple(f"{name}." for name in host_run_linears(owner))
    params = {f"{part}.{name}": p for part in modules for name, p in getattr(owner, part).named_parameters()
              if not (run and f"{part}.{name}".startswith(run))}
    for name in vectors:
        p = getattr(owner, name)
        if not isinstance(p, nn.Parameter):
            raise TypeError(f"gundam.patch: the host's {name} is a {type(p).__name__}, expected an nn.Parameter")
        params[name] = p
    return params


def host_run_linears(owner) -> dict[str, nn.Module]:
    """CLIP's linears whose weight the host has packed into its own format, by the vendor's names: vLLM's CPU
    platform leaves an empty `weight` and a `cpu_linear` that computes with the packed one. Any other module
    with such a weight is refused (the encoder runs only CLIP's four linears through the host)."""
    vision = getattr(owner, "vision_model", None) if encoder_family(owner) == "deepseek-ocr" else None
    out = {}
    for name, m in vision.named_modules() if vision is not None else ():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.numel() == 0 and callable(getattr(m, "cpu_linear", None)):
            parts = name.split(".")
            if not (len(parts) == 5 and parts[:2] == ["transformer", "layers"] and parts[2].isdigit()
                    and ".".join(parts[3:]) in HOST_RUN):
                raise ValueError(f"gundam.patch: the host has packed vision_model.{name}.weight away (empty, run "
                                 f"by its cpu_linear); GundamEncoder runs only CLIP's "
                                 f"{', '.join(HOST_RUN)} through the host's layers")
            out[f"vision_model.{name}"] = m
    return out


def shared_encoder(owner, backend: str) -> tuple[GundamEncoder, dict[str, nn.Parameter]]:
    """A GundamEncoder whose parameters are the host's; also returns the host parameters it holds."""
    params = host_parameters(owner)
    run = host_run_linears(owner)
    _refuse_tensor_parallel(owner)
    family = encoder_family(owner)
    try:
        config = host_config(owner, params, run) if family == "deepseek-ocr" else ocr2_host_config(owner, params)
    except KeyError as e:
        names = "sam_model.*, vision_model.*" if family == "deepseek-ocr" else "sam_model.*, qwen2_model.*"
        raise ValueError(f"gundam.patch: the host's encoder has no parameter {e}: expected "
                         f"{'DeepEncoder' if family == 'deepseek-ocr' else 'DeepEncoder V2'}'s ({names}, "
                         f"projector.layers.*)") from None
    except ValueError as e:
        raise ValueError(f"gundam.patch: the host's encoder is not "
                         f"{'DeepEncoder' if family == 'deepseek-ocr' else 'DeepEncoder V2'}-shaped ({e})") from None
    return build_around(params, config, backend, (lambda enc: run_through_host(enc, run)) if run else None)


def build_around(params: dict[str, nn.Parameter], config, backend: str, adapt=None):
    """A GundamEncoder of `config` whose parameters are `params` (the host's, by the encoder's own parameter
    names), and the host parameters it holds. `adapt(enc)` may first swap modules for variants that hold the
    host's tensors as the host stores them (gundam.hosts.hf_native: CLIP's separate q/k/v projections)."""
    with torch.device("meta"):  # no memory: every parameter is replaced by the host's below
        enc = GundamEncoder(config, backend=backend)
        if adapt is not None:
            adapt(enc)
    ours = dict(enc.named_parameters())
    missing, extra = sorted(ours.keys() - params.keys()), sorted(params.keys() - ours.keys() - set(UNUSED_KEYS))
    if missing or extra:
        kind = "DeepSeek-OCR 2's" if enc.family == "deepseek-ocr2" else "DeepEncoder's"
        raise ValueError(f"gundam.patch: the host's encoder parameters are not {kind}: missing "
                         f"{missing[:3] or 'none'}, unexpected {extra[:3] or 'none'}")
    for name, mine in ours.items():
        p = params[name]
        if p.shape != mine.shape:
            raise ValueError(f"gundam.patch: the host's {name} has shape {list(p.shape)}, expected "
                             f"{list(mine.shape)}")
        module, _, leaf = name.rpartition(".")
        enc.get_submodule(module).register_parameter(leaf, p)
    return enc.eval(), {name: params[name] for name in ours}


def shares(encoder_params: dict[str, nn.Parameter], current: dict[str, nn.Parameter]) -> bool:
    """True while the host still holds (`current`, its `host_parameters`) the very parameter objects the encoder
    was built around (a host whose parameters were replaced, e.g. by `load_state_dict(..., assign=True)`, needs a
    new encoder)."""
    return all(current.get(name) is p for name, p in encoder_params.items())


def host_config(owner, params, run=None) -> EncoderConfig:
    """The encoder's shape, read from the host's parameter shapes (head counts and LayerNorm eps from the
    modules where they say; a linear the host runs (`run`) has its shape in its own attributes)."""
    run = run or {}

    def shape(name):
        module = run.get(name.removesuffix(".weight"))
        return (module.output_size, module.input_size) if module is not None else tuple(params[name].shape)

    sam = sam_host_config(owner, params)
    H = shape("vision_model.pre_layrnorm.weight")[0]
    clip_grid = math.isqrt(shape("vision_model.embeddings.position_embedding.weight")[0] - 1)
    clip_layer = owner.vision_model.transformer.layers[0]
    clip = ClipConfig(
        hidden_size=H, num_layers=_count(params, "vision_model.transformer.layers.{}.layer_norm1.weight"),
        num_attention_heads=getattr(clip_layer.self_attn, "num_heads", H // 64),
        ffn_hidden_size=shape("vision_model.transformer.layers.0.mlp.fc1.weight")[0],
        image_size=ClipConfig.patch_size * clip_grid, patch_size=ClipConfig.patch_size,
        layernorm_epsilon=getattr(clip_layer.layer_norm1, "eps", ClipConfig.layernorm_epsilon),
        pre_layernorm_epsilon=getattr(owner.vision_model.pre_layrnorm, "eps", ClipConfig.pre_layernorm_epsilon))
    n_embed, input_dim = shape("projector.layers.weight")
    return EncoderConfig(sam, clip, ProjectorConfig(input_dim=input_dim, n_embed=n_embed))


def sam_host_config(owner, params) -> SamConfig:
    """SAM's shape, read from the host's parameters (the same module in both families)."""
    shape = lambda name: tuple(params[name].shape)
    E, _, P, _ = shape("sam_model.patch_embed.proj.weight")
    G = shape("sam_model.pos_embed")[1]                                  # pretrained patch grid
    depth = _count(params, "sam_model.blocks.{}.norm1.weight")
    rel = [shape(f"sam_model.blocks.{i}.attn.rel_pos_h") for i in range(depth)]  # (2S-1, head_dim)
    global_blocks = tuple(i for i, (L, _) in enumerate(rel) if L == 2 * G - 1)
    window = next(((L + 1) // 2 for L, _ in rel if L != 2 * G - 1), SamConfig.window_size)
    sam_block = owner.sam_model.blocks[0]
    return SamConfig(
        img_size=G * P, patch_size=P, embed_dim=E, depth=depth,
        num_heads=getattr(sam_block.attn, "num_heads", E // rel[0][1]),
        mlp_ratio=shape("sam_model.blocks.0.mlp.lin1.weight")[0] / E,
        out_chans=shape("sam_model.neck.0.weight")[0], window_size=window, global_attn_indexes=global_blocks,
        net_2_chans=shape("sam_model.net_2.weight")[0], net_3_chans=shape("sam_model.net_3.weight")[0],
        layer_norm_eps=getattr(sam_block.norm1, "eps", SamConfig.layer_norm_eps))


QWEN2 = "qwen2_model.model.model"   # transformers' Qwen2Model inside the vendor's Qwen2Decoder2Encoder


def ocr2_host_config(owner, params) -> Ocr2Config:
    """DeepEncoder V2's shape: SAM's and the projector's from the parameters, Qwen2's from the parameters and
    the host's transformers Qwen2Model (heads, eps, RoPE), the view sizes from the query tables (one row per
    output token, 64 px per token along a side)."""
    shape = lambda name: tuple(params[name].shape)
    qwen = owner.qwen2_model.model.model
    if isinstance(getattr(qwen, "cfg", None), Qwen2Config):    # this project's own modules (gundam.model)
        c = qwen.cfg
        theta, eps = c.rope_theta, c.rms_norm_eps
    else:                                                       # transformers' Qwen2Model, as the vendor's
        c = qwen.config
        theta, eps = None, getattr(qwen.norm, "variance_epsilon", c.rms_norm_eps)
    hidden = shape(f"{QWEN2}.layers.0.self_attn.q_proj.weight")[1]
    heads, kv_heads = c.num_attention_heads, c.num_key_value_heads
    head_dim = hidden // heads
    if shape(f"{QWEN2}.layers.0.self_attn.k_proj.weight")[0] != kv_heads * head_dim:
        raise ValueError(f"k_proj has {shape(f'{QWEN2}.layers.0.self_attn.k_proj.weight')[0]} rows for "
                         f"num_key_value_heads={kv_heads} of head_dim {head_dim}")
    if theta is None:
        if c.hidden_act != "silu":
            raise ValueError(f"the Qwen2 encoder's hidden_act={c.hidden_act!r}, expected 'silu'")
        impl = getattr(c, "_attn_implementation", None)
        if impl not in (None, "eager", "sdpa"):
            raise ValueError(f"the Qwen2 encoder runs attn_implementation={impl!r}, expected eager or sdpa")
        theta = check_default_rope(qwen.rotary_emb, c, head_dim)
    qwen2 = Qwen2Config(hidden_size=hidden, num_hidden_layers=_count(params, f"{QWEN2}.layers.{{}}.input_layernorm.weight"),
                        num_attention_heads=heads, num_key_value_heads=kv_heads,
                        intermediate_size=shape(f"{QWEN2}.layers.0.mlp.gate_proj.weight")[0],
                        rms_norm_eps=eps, rope_theta=theta)
    n_embed, input_dim = shape("projector.layers.weight")
    sides = [math.isqrt(shape(f"qwen2_model.{t}.weight")[0]) for t in ("query_768", "query_1024")]
    return Ocr2Config(sam=sam_host_config(owner, params), qwen2=qwen2,
                      projector=ProjectorConfig(input_dim=input_dim, n_embed=n_embed),
                      base_size=64 * sides[1], image_size=64 * sides[0])


def check_default_rope(rope, config, head_dim: int) -> float:
    """transformers' rotary embedding `rope` is the default RoPE of the config's rope_theta, with float32
    inverse frequencies as the encoder computes them (gundam.model.rope_tables); returns rope_theta."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError("the Qwen2 encoder's config has no rope_theta")
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if getattr(rope, "rope_type", "default") != "default" or getattr(rope, "attention_scaling", 1.0) != 1.0 or not (
            rope.inv_freq.is_meta or (rope.inv_freq.dtype == torch.float32 and torch.equal(rope.inv_freq.cpu(), inv_freq))):
        raise ValueError(f"the vision encoder's RoPE (rope_type={getattr(rope, 'rope_type', None)!r}, inv_freq "
                         f"{rope.inv_freq.dtype}) is not the default float32 one of rope_theta={theta}")
    return float(theta)


def _count(params, pattern) -> int:
    n = 0
    while pattern.format(n) in params:
        n += 1
    if not n:
        raise KeyError(pattern.format(0))
    return n


def _refuse_tensor_parallel(owner):
    """vLLM splits CLIP's linears across tensor-parallel ranks (each rank holds 1/tp of qkv_proj, out_proj,
    fc1, fc2); GundamEncoder needs whole weights, and gathering them would copy the encoder on every rank."""
    for part in PARTS[encoder_family(owner)][0]:
        for name, module in getattr(owner, part).named_modules():
            tp = getattr(module, "tp_size", 1)
            if isinstance(tp, int) and tp > 1:
                raise ValueError(f"gundam.patch: {part}.{name} is split across {tp} tensor-parallel ranks; "
                                 f"GundamEncoder needs the whole encoder on each device: serve with "
                                 f"tensor_parallel_size=1, or leave this model unpatched")


class PixelValuesToEmbedding:
    """The hosts' `_pixel_values_to_embedding(pixel_values, images_crop, images_spatial_crop)` (vLLM; SGLang adds
    `has_local_crops`, which its processor sets exactly where the grid has crops: not needed), patched: every
    image in one pass of the patch's encoder. An object, not a closure: a copied or unpickled model's patched
    method encodes with that model's own parameters (`state` is copied along with it)."""

    def __init__(self, state):
        self.state = state    # gundam.hosts.Patch

    def __call__(self, pixel_values, images_crop, images_spatial_crop, has_local_crops=None):
        return self.state.current().forward_vendor(pixel_values, images_crop, images_spatial_crop)


# ----------------------------------------------------------------------------------------------------------
# CLIP's linears run by the host (vLLM's CPU platform)

class HostLinear(nn.Module):
    """One of CLIP's linears, computed by the host's own layer (its weight is packed into the host's format):
    `layer(x)`, the output without vLLM's (output, bias) pairing. The host's layer is held as a plain
    attribute, not a submodule, so the encoder's parameters stay the shared ones and nothing moves with it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        object.__setattr__(self, "layer", layer)

    def forward(self, x):
        out = self.layer(x)
        return out[0] if isinstance(out, tuple) else out


class HostRunClipAttention(ClipAttention):
    """CLIP's attention whose linears may be HostLinear: the CPU path calls the modules (its default reads
    the weights for oneDNN itself)."""

    def forward_cpu(self, x):
        return self.forward(x)


class HostRunClipLayer(ClipLayer):
    def forward_cpu(self, x):
        """`forward` on the CPU path, x [B, N, C] updated in place, every linear through its module."""
        x += self.self_attn.forward_cpu(self.layer_norm1(x))
        x += self.mlp(self.layer_norm2(x))
        return x


def run_through_host(enc, run: dict[str, nn.Module]):
    """The encoder's CLIP linears named in `run` (vendor names) as HostLinear around the host's layers (called
    on the meta device, before the shared parameters are put in)."""
    layers = set()
    for name, layer in run.items():
        parent, _, leaf = name.rpartition(".")
        setattr(enc.get_submodule(parent), leaf, HostLinear(layer))
        layers.add(int(name.split(".")[3]))
    for i in layers:
        layer = enc.vision_model.transformer.layers[i]
        layer.__class__, layer.self_attn.__class__ = HostRunClipLayer, HostRunClipAttention
