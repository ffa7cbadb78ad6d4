"""A `GundamEncoder` built around a host model's own encoder parameters: the same `nn.Parameter` objects, so
no tensor is copied (memory unchanged) and whatever updates the host's parameters updates the encoder.

The hosts' encoder modules are the vendor's classes (or ports of them) with the vendor's parameter names, which
are this project's names too (`sam_model.*`, `vision_model.*`, `projector.layers.*`, `image_newline`,
`view_seperator`). The encoder's shape (depth, widths, window, global blocks, heads) is read from the host's
parameters, so any DeepEncoder-shaped host is taken, the real one and small ones alike.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from gundam.config import ClipConfig, EncoderConfig, ProjectorConfig, SamConfig
from gundam.encoder import GundamEncoder
from gundam.weights import UNUSED_KEYS

MODULES = ("sam_model", "vision_model", "projector")
VECTORS = ("image_newline", "view_seperator")


def owns_encoder(module) -> bool:
    """True for a module holding DeepEncoder the vendor's way (a DeepSeek-OCR model of some host)."""
    return (all(isinstance(getattr(module, name, None), nn.Module) for name in MODULES)
            and all(isinstance(getattr(module, name, None), torch.Tensor) for name in VECTORS))


def host_parameters(owner) -> dict[str, nn.Parameter]:
    """The host's encoder parameters by the vendor's names (the encoder's state-dict keys)."""
    params = {f"{part}.{name}": p for part in MODULES for name, p in getattr(owner, part).named_parameters()}
    for name in VECTORS:
        p = getattr(owner, name)
        if not isinstance(p, nn.Parameter):
            raise TypeError(f"gundam.patch: the host's {name} is a {type(p).__name__}, expected an nn.Parameter")
        params[name] = p
    return params


def shared_encoder(owner, backend: str) -> tuple[GundamEncoder, dict[str, nn.Parameter]]:
    """A GundamEncoder whose parameters are the host's; also returns the host parameters it holds."""
    params = host_parameters(owner)
    _refuse_tensor_parallel(owner)
    try:
        config = host_config(owner, params)
    except KeyError as e:
        raise ValueError(f"gundam.patch: the host's encoder has no parameter {e}: expected DeepEncoder's "
                         f"(sam_model.*, vision_model.*, projector.layers.*)") from None
    except ValueError as e:
        raise ValueError(f"gundam.patch: the host's encoder is not DeepEncoder-shaped ({e})") from None
    return build_around(params, config, backend)


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


def host_config(owner, params) -> EncoderConfig:
    """The encoder's shape, read from the host's parameter shapes (head counts and LayerNorm eps from the
    modules where they say)."""
    shape = lambda name: tuple(params[name].shape)
    E, _, P, _ = shape("sam_model.patch_embed.proj.weight")
    G = shape("sam_model.pos_embed")[1]                                  # pretrained patch grid
    depth = _count(params, "sam_model.blocks.{}.norm1.weight")
    rel = [shape(f"sam_model.blocks.{i}.attn.rel_pos_h") for i in range(depth)]  # (2S-1, head_dim)
    global_blocks = tuple(i for i, (L, _) in enumerate(rel) if L == 2 * G - 1)
    window = next(((L + 1) // 2 for L, _ in rel if L != 2 * G - 1), SamConfig.window_size)
    sam_block = owner.sam_model.blocks[0]
    sam = SamConfig(
        img_size=G * P, patch_size=P, embed_dim=E, depth=depth,
        num_heads=getattr(sam_block.attn, "num_heads", E // rel[0][1]),
        mlp_ratio=shape("sam_model.blocks.0.mlp.lin1.weight")[0] / E,
        out_chans=shape("sam_model.neck.0.weight")[0], window_size=window, global_attn_indexes=global_blocks,
        net_2_chans=shape("sam_model.net_2.weight")[0], net_3_chans=shape("sam_model.net_3.weight")[0],
        layer_norm_eps=getattr(sam_block.norm1, "eps", SamConfig.layer_norm_eps))
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
    for name, module in owner.vision_model.named_modules():
        tp = getattr(module, "tp_size", 1)
        if isinstance(tp, int) and tp > 1:
            raise ValueError(f"gundam.patch: vision_model.{name} is split across {tp} tensor-parallel ranks; "
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
