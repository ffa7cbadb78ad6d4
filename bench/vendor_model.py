"""The vendor's DeepSeek-OCR encoder, built from a checkout of github.com/deepseek-ai/DeepSeek-OCR: its own module
classes (DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepencoder) at a config's sizes and its own per-image
`_pixel_values_to_embedding` (deepseek_ocr.py, the function's source run as is). Used by bench/cpu.py (the
vendor's time on this machine) and tests/test_real_hosts.py (the vendor's results). Needs `easydict` (the
vendor's CLIP imports it); flash_attn is not needed (its CLIP runs SDPA) and is stood in for when absent.
"""
import ast
import importlib.machinery
import os
import sys
import types

import torch
import torch.nn as nn

from gundam.config import EncoderConfig


def empty_module(name, **attrs):
    """A module object standing in for a package the vendor's code imports but nothing here needs."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__dict__.update(attrs)
    return module


class Float32ForBfloat16(types.ModuleType):
    """`torch` for the vendor's function source, with `torch.bfloat16` reading float32 (the vendor casts crops to
    bfloat16; fp32 comparisons and fp32 timings need them left in float32)."""

    def __getattr__(self, name):
        return torch.float32 if name == "bfloat16" else getattr(torch, name)


class LiftNoGrad(ast.NodeTransformer):
    """Replaces each `with torch.no_grad():` block by its body (the vendor's method, as a fine-tuning host)."""

    def visit_With(self, node):
        self.generic_visit(node)
        return node.body if ast.unparse(node.items[0].context_expr) == "torch.no_grad()" else node


def vendor_code(repo: str) -> str:
    """The folder of the vendor's vLLM code in a checkout, importable (flash_attn stood in for when absent)."""
    code = os.path.join(repo, "DeepSeek-OCR-master", "DeepSeek-OCR-vllm")
    if not os.path.isdir(os.path.join(code, "deepencoder")):
        raise ValueError(f"repo={repo!r}: not a DeepSeek-OCR checkout (no DeepSeek-OCR-master/DeepSeek-OCR-vllm/"
                         "deepencoder in it)")
    if code not in sys.path:
        sys.path.insert(0, code)
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        sys.modules["flash_attn"] = empty_module("flash_attn", flash_attn_qkvpacked_func=None, flash_attn_func=None)
    return code


def vendor_methods(repo: str, float32: bool):
    """The vendor's `_pixel_values_to_embedding` as written, and with its `torch.no_grad()` lifted. float32: its
    cast of the crops to bfloat16 reads float32."""
    source = open(os.path.join(vendor_code(repo), "deepseek_ocr.py")).read()
    fn = next(n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)
              and n.name == "_pixel_values_to_embedding")
    namespace = {"torch": Float32ForBfloat16("torch") if float32 else torch, "PRINT_NUM_VIS_TOKENS": False,
                 "NestedTensors": list}
    exec(compile(ast.Module([fn], []), "deepseek_ocr.py", "exec"), namespace)
    plain = namespace["_pixel_values_to_embedding"]
    exec(compile(ast.Module([ast.fix_missing_locations(LiftNoGrad().visit(fn))], []), "deepseek_ocr.py", "exec"),
         namespace)
    return plain, namespace["_pixel_values_to_embedding"]


def vendor_model(repo: str, cfg: EncoderConfig, float32: bool = True) -> nn.Module:
    """The vendor's vLLM model class as far as encoding goes: its modules at cfg's sizes (random init; load an
    encoder's state dict into it, the names are the same) and its method."""
    vendor_code(repo)
    from deepencoder.build_linear import MlpProjector
    from deepencoder.clip_sdpa import VitModel
    from deepencoder.sam_vary_sdpa import ImageEncoderViT
    from easydict import EasyDict
    plain, with_grad = vendor_methods(repo, float32)
    s, c, p = cfg.sam, cfg.clip, cfg.projector

    class VendorModel(nn.Module):
        _pixel_values_to_embedding = plain
        pixel_values_to_embedding_with_grad = with_grad

        def __init__(self):
            super().__init__()
            self.sam_model = ImageEncoderViT(
                depth=s.depth, embed_dim=s.embed_dim, img_size=s.img_size, mlp_ratio=s.mlp_dim / s.embed_dim,
                num_heads=s.num_heads, norm_layer=lambda d: nn.LayerNorm(d, eps=s.layer_norm_eps),
                patch_size=s.patch_size, qkv_bias=True, use_rel_pos=True,
                global_attn_indexes=list(s.global_attn_indexes), window_size=s.window_size, out_chans=s.out_chans)
            self.vision_model = VitModel(cfg=EasyDict(
                num_layers=c.num_layers, hidden_size=c.hidden_size, num_heads=c.num_attention_heads,
                num_attention_heads=c.num_attention_heads, ffn_hidden_size=c.ffn_hidden_size, seq_length=256,
                max_position_embeddings=256, use_flash_attn=False, understand_projector_stride=2, hidden_dropout=0.0,
                attention_dropout=0.0, no_persist_layer_norm=False, layernorm_epsilon=c.layernorm_epsilon,
                pre_layernorm_epsilon=c.pre_layernorm_epsilon, image_size=c.image_size, patch_size=c.patch_size,
                recompute_list=[]))
            self.projector = MlpProjector(EasyDict(projector_type="linear", input_dim=p.input_dim, n_embed=p.n_embed))
            self.image_newline = nn.Parameter(torch.zeros(p.n_embed))
            self.view_seperator = nn.Parameter(torch.zeros(p.n_embed))

        def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
            return inputs_embeds

    return VendorModel()


def vendor_like(repo: str, encoder, float32: bool = True) -> nn.Module:
    """vendor_model with `encoder`'s weights (a GundamEncoder of the DeepSeek-OCR family), in its dtype."""
    model = vendor_model(repo, encoder.config, float32)
    missing, unexpected = model.load_state_dict(encoder.state_dict(), strict=False)
    unused = {"vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.position_ids"}
    if unexpected or not set(missing) <= unused:
        raise ValueError(f"the vendor's modules do not take this encoder's weights: missing "
                         f"{sorted(set(missing) - unused)}, unexpected {sorted(unexpected)}")
    return model.to(encoder.dtype).eval()
