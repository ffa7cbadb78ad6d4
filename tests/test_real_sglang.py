"""`gundam.patch` on SGLang's real classes (sglang 0.5.23; skipped where sglang is not installed: CI's venv has it
not, tests/hosts/setup.sh builds an environment that has): `DeepseekOCRForCausalLM` for DeepSeek-OCR and
DeepSeek-OCR 2 (one class, `is_ocr2` from the config) and `UnlimitedOCRForCausalLM`.

Each model is the host's class, built from a tiny config: the language model through the config (a 2-layer MoE
`DeepseekForCausalLM`), the encoder by the host's own builders at a tiny size (the host hard-codes SAM ViT-B,
CLIP-L and a 24-layer Qwen2: the tests swap `build_sam_vit_b`, `build_clip_l` and `build_qwen2_decoder_as_encoder`
of the host's module for ones that call the host's `_build_sam`, `VitModel` and `Qwen2Decoder2Encoder` with
small sizes). Its weights come through the host's `load_weights`, from a random checkpoint under the Hugging
Face names (`model.sam_model.*`, `model.layers.*.q_proj`, ...): the plugin class of gundam.hosts.sglang_model
patches itself there. Images are real pages through gundam's preprocessing (the vendor's), laid out as SGLang's
processors lay out an item; 1024 px global views, 640 px (768 px for DeepSeek-OCR 2) crops.

What SGLang needs on a CPU-only machine: a world-size-1 gloo process group and SGLang's published parallel
config (what its own layer tests set up), and its rotary layer pointed at its native path
(`rotary_embedding.base._is_cpu`: SGLang's CPU engine needs sgl-kernel's CPU build, which is not on PyPI). The
language model is built and loaded but never run (that needs SGLang's scheduler and attention backends).
"""
import inspect
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

sglang = pytest.importorskip("sglang", reason="sglang not installed (tests/hosts/setup.sh builds an env with it)")

import gundam  # noqa: E402
from gundam import preprocess  # noqa: E402
from gundam.hosts import patched_encoder  # noqa: E402
from testutils import Counter, assert_close, hf_checkpoint, page  # noqa: E402

VERSION = "0.5.23"
HIDDEN = 64                    # the language model's width = the projector's n_embed
CLIP = 128                     # tiny CLIP width = SAM's net_3 output (DeepSeek-OCR)
QWEN = 64                      # tiny Qwen2 width = SAM's net_3 output (DeepSeek-OCR 2)


def setup_module():
    if sglang.__version__ != VERSION:
        pytest.skip(f"sglang {sglang.__version__}: these tests follow {VERSION}")


@pytest.fixture(scope="module")
def host():
    """SGLang's modules, with the process set up as SGLang's own layer tests do and the tiny builders in."""
    for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29641", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
        os.environ.setdefault(k, v)
    from sglang.srt.distributed import parallel_state
    from sglang.srt.layers.rotary_embedding import base as rotary
    from sglang.srt.models import deepseek_ocr, unlimited_ocr
    from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish, reset_context
    from sglang.srt.server_args import ServerArgs
    if not torch.distributed.is_initialized():
        parallel_state.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo")
    if not parallel_state.model_parallel_is_initialized():
        reset_context()
        publish(ServerArgs(model_path="dummy", device="cpu", tp_size=1, ep_size=1, pp_size=1), role="test",
                ranks=SpawnRanks(world_rank=0))
        get_parallel().override_permanently(world_group=parallel_state._WORLD)
        parallel_state.initialize_model_parallel(backend="gloo")
    D = deepseek_ocr

    def tiny_sam(checkpoint=None, net_3_out_channels=1024):
        return D._build_sam(encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=2,
                            encoder_global_attn_indexes=[1],
                            net_3_out_channels=CLIP if net_3_out_channels == 1024 else net_3_out_channels)

    def tiny_clip():
        return D.VitModel(cfg=dict(D.vit_model_cfg, num_layers=2, hidden_size=CLIP, num_heads=2,
                                   num_attention_heads=2, ffn_hidden_size=256))

    def tiny_qwen2(hidden_dimension=896, **kwargs):
        return D.Qwen2Decoder2Encoder(decoder_layer=2, hidden_dimension=hidden_dimension, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=96, max_query=400)

    mp = pytest.MonkeyPatch()
    mp.setattr(rotary, "_is_cpu", True)
    for module in (deepseek_ocr, unlimited_ocr):
        mp.setattr(module, "build_sam_vit_b", tiny_sam)
        mp.setattr(module, "build_clip_l", tiny_clip, raising=False)
    mp.setattr(deepseek_ocr, "build_qwen2_decoder_as_encoder", tiny_qwen2)
    yield SimpleNamespace(deepseek_ocr=deepseek_ocr, unlimited_ocr=unlimited_ocr)
    mp.undo()


LANGUAGE = dict(vocab_size=128, hidden_size=HIDDEN, intermediate_size=96, moe_intermediate_size=32,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
                n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1, use_mla=False,
                topk_method="greedy", bos_token_id=0, eos_token_id=1)


def config(family):
    if family == "unlimited":
        from sglang.srt.configs.unlimited_ocr import UnlimitedVLConfig
        return UnlimitedVLConfig(tile_tag="2D", language_config=LANGUAGE,
                                 projector_config=dict(projector_type="linear", input_dim=2 * CLIP, n_embed=HIDDEN))
    from sglang.srt.configs.deepseek_ocr import DeepseekVLV2Config
    if family == "ocr2":
        return DeepseekVLV2Config(tile_tag="2D", language_config=LANGUAGE, vision_config=dict(model_name="deepencoderv2"),
                                  projector_config=dict(projector_type="linear", input_dim=QWEN, n_embed=HIDDEN))
    return DeepseekVLV2Config(tile_tag="2D", language_config=LANGUAGE,
                              projector_config=dict(projector_type="linear", input_dim=2 * CLIP, n_embed=HIDDEN))


CLASSES = {"ocr": "DeepseekOCRForCausalLM", "ocr2": "DeepseekOCRForCausalLM", "unlimited": "UnlimitedOCRForCausalLM"}


def build(host, family, plugin, seed=0):
    """The host's class (or gundam's plugin subclass of it, which patches itself in load_weights), loaded with
    `seed`'s checkpoint through the host's load_weights."""
    if plugin:
        from gundam.hosts import sglang_model as module
    else:
        module = host.unlimited_ocr if family == "unlimited" else host.deepseek_ocr
    torch.manual_seed(seed)
    model = getattr(module, CLASSES[family])(config=config(family))
    model.load_weights(hf_checkpoint(model, seed, language_model="model.").items())
    return model.eval()


MODES = {"ocr": "gundam", "ocr2": "ocr2", "unlimited": "gundam"}
SIZES = [(1300, 650), (500, 300), (1950, 1300)]    # grids 2x1, none, 3x2 (DeepSeek-OCR 2: its own grids)


def items(family, sizes=SIZES, groups=None):
    """SGLang items as its processors make them (configs/deepseek_ocr.py, configs/unlimited_ocr.py): per item
    `feature` [k, 3, B, B], `images_crop` [1, all its crops, 3, S, S] (one zero crop when none has crops),
    `images_spatial_crop` [1, k, 2], `has_local_crops` (Unlimited-OCR: one per image; else one for the item)."""
    batch = preprocess([page(w, h, seed=30 + i) for i, (w, h) in enumerate(sizes)], MODES[family])
    S = batch.mode.image_size
    crops = torch.split(batch.crops, batch.n_crops)
    out, start = [], 0
    for k in groups or [1] * len(sizes):             # images per item
        idx, start = range(start, start + k), start + k
        mine = torch.cat([crops[i] for i in idx])
        flags = [tuple(batch.grids[i]) != (1, 1) for i in idx]
        out.append(SimpleNamespace(
            feature=batch.global_views[idx.start:idx.stop], images_crop=(mine if len(mine) else torch.zeros(1, 3, S, S))[None],
            images_spatial_crop=torch.tensor([[list(batch.grids[i]) for i in idx]]),
            has_local_crops=flags if family == "unlimited" else any(flags)))
    return batch, out


class CropsStayFloat32(TorchFunctionMode):
    """The hosts cast the crops to bfloat16 before encoding them (`images_crop[jdx][0].to(torch.bfloat16)`), which
    an fp32 model cannot take (conv2d refuses mixed dtypes): for an fp32 comparison the cast reads fp32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and torch.bfloat16 in (*args[1:], kwargs.get("dtype")):
            return args[0]
        return func(*args, **kwargs)


def counting(enc):
    """Counts the encoder's passes (forward_vendor calls `self.forward`, which hooks do not see)."""
    enc.forward = Counter(enc.forward)
    return enc.forward


def host_tokens(model, family, its):
    """What the unpatched host gives for the items: one call (DeepSeek-OCR goes item by item itself), or item by
    item for Unlimited-OCR, whose own batching crashes on different crop counts."""
    with torch.no_grad(), CropsStayFloat32():
        if family == "unlimited":
            return torch.cat([model.get_image_feature([item]) for item in its])
        return model.get_image_feature(its)


@pytest.mark.parametrize("family", list(CLASSES))
def test_patched_equals_host(host, family):
    want_model = build(host, family, plugin=False)
    model = build(host, family, plugin=True)           # patched by its load_weights
    enc = patched_encoder(model)
    assert enc is not None and enc.family == ("deepseek-ocr2" if family == "ocr2" else "deepseek-ocr")
    assert getattr(model, "is_ocr2", False) == (family == "ocr2")
    ids = {id(p): p for p in model.parameters()}
    assert all(id(p) in ids for p in enc.parameters())  # the host's own parameter objects, nothing copied
    batch, its = items(family)
    if family == "unlimited":                           # the host's own batching of items with different crops
        with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"), torch.no_grad():
            want_model.get_image_feature(its)
    want = host_tokens(want_model, family, its)
    assert want.shape[0] == sum(batch.tokens)
    passes, towers = counting(enc), Counter()
    handles = [getattr(model, name).register_forward_hook(towers) for name in ("sam_model", "projector")]
    with torch.no_grad():
        got = model.get_image_feature(its)
    for h in handles:
        h.remove()
    del enc.forward
    assert (passes.calls, towers.calls) == (1, 0)       # one encoder pass for all items, none of the host's
    scale = want.abs().max()
    assert_close(got / scale, want / scale, atol=2e-6, rtol=0, what=f"{family}: patched / max")
    # the per-image layout of _pixel_values_to_embedding (what SGLang's _process_image_input passes)
    pv, ic, sc = batch.to_vendor()
    per_image = model._pixel_values_to_embedding(pv, ic, sc, has_local_crops=[tuple(g) != (1, 1) for g in batch.grids])
    assert_close(torch.cat(per_image) / scale, want / scale, atol=2e-6, rtol=0, what=f"{family}: per-image layout")
    gundam.unpatch(model)
    assert not {"_pixel_values_to_embedding", "_process_image_input"} & model.__dict__.keys()
    assert patched_encoder(model) is None
    assert torch.equal(host_tokens(model, family, its), want)    # the host's own code again, its own numbers


def test_unlimited_items_of_several_images(host):
    """Unlimited-OCR's items of k images each (its processor's layout: one crop run per item, a flag per image):
    the patched model encodes them all in one pass and equals the host image by image."""
    want_model = build(host, "unlimited", plugin=False, seed=1)
    model = build(host, "unlimited", plugin=True, seed=1)
    _, grouped = items("unlimited", groups=[2, 1])   # (2x1, none), (3x2)
    _, singles = items("unlimited")
    want = host_tokens(want_model, "unlimited", singles)
    with torch.no_grad():
        got = model.get_image_feature(grouped)
    scale = want.abs().max()
    assert_close(got / scale, want / scale, atol=2e-6, rtol=0, what="k-image items")


def test_bfloat16(host):
    """In bfloat16, as SGLang serves: the patched model equals the host within bf16 rounding."""
    want_model = build(host, "ocr", plugin=False, seed=2).to(torch.bfloat16)
    model = build(host, "ocr", plugin=True, seed=2).to(torch.bfloat16)
    _, its = items("ocr", SIZES[:2])
    with torch.no_grad():
        want = want_model.get_image_feature(its)
        got = model.get_image_feature(its)
    assert got.dtype == want.dtype == torch.bfloat16
    scale = want.float().abs().max()
    err = ((got.float() - want.float()) / scale).abs()
    assert err.max() < 5e-2 and err.mean() < 5e-3, f"bf16: max {err.max():.3g}, mean {err.mean():.3g} of max |x|"


# ---------------------------------------------------------------------------------------------------------
# the stand-ins of tests/host_standins.py follow these classes

def params(fn):
    return [p for p in inspect.signature(fn).parameters if p != "self"]


@pytest.mark.parametrize("standin,real", [("SglangDeepseekOCRForCausalLM", "deepseek_ocr.DeepseekOCRForCausalLM"),
                                          ("SglangUnlimitedOCRForCausalLM", "unlimited_ocr.UnlimitedOCRForCausalLM")])
def test_standins_follow_the_real_classes(host, standin, real):
    import host_standins
    mine = getattr(host_standins, standin)
    module, name = real.split(".")
    cls = getattr(getattr(host, module), name)
    for method in ("_pixel_values_to_embedding", "_process_image_input", "get_image_feature", "forward",
                   "_collect_mm_flag"):
        assert params(getattr(mine, method)) == params(getattr(cls, method)), f"{standin}.{method}"
    family = "unlimited" if "Unlimited" in standin else "ocr"
    real_model, stand_in = build(host, family, plugin=False), mine()
    for attr in ("sam_model", "vision_model", "projector", "image_newline", "view_seperator"):
        assert isinstance(getattr(real_model, attr), nn.Parameter) == isinstance(getattr(stand_in, attr), nn.Parameter)
    assert hasattr(stand_in, "is_ocr2") == hasattr(real_model, "is_ocr2")
    # the stand-ins' item layout is the real processors' (sglang_item): one image, feature [1, 3, B, B]
    from host_standins import sglang_item
    batch, (item,) = items(family, SIZES[:1])
    mine_item = sglang_item(batch.global_views[0], batch.crops, batch.grids[0], batch.mode.image_size)
    for field in ("feature", "images_crop", "images_spatial_crop"):
        assert getattr(mine_item, field).shape == getattr(item, field).shape, field
