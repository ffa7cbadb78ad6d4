"""Against DeepSeek-OCR 2's own code (opt-in: slow, CPU; skipped unless GUNDAM_DEEPSEEK_OCR2_REPO is set).

GUNDAM_DEEPSEEK_OCR2_REPO: a checkout of github.com/deepseek-ai/DeepSeek-OCR-2 (read at 2f3699e). Its
DeepSeek-OCR2-master/DeepSeek-OCR2-vllm code is imported as is, with stand-ins for what it imports but these
tests do not use:
- `config`: the vendor's config.py constants, read from its source (its last line loads a tokenizer from the
  hub); `flash_attn` (imported by the SAM file, unused) when it is not installed;
- `torchvision.transforms`: ToTensor stands in as "the image's uint8 [3, H, W]" and Normalize as the identity,
  so the vendor processor's pixels are compared before normalising (the normalisation, x/255 then
  (x - 0.5)/0.5, is checked in tests/test_ocr2.py); torchvision's wheels do not import beside every torch;
- the processor's tokenizer: a character-level stand-in (only the token layout is compared).
Checked: the vendor's `count_tiles` and its vLLM token count (`get_num_image_tokens`, source from
deepseek_ocr2.py) on thousands of sizes; its processor's views (`tokenize_with_images`: `dynamic_preprocess`
crops, padded global view, tile counts, tokens) on images in several PIL modes; and the vendor's own encoder
modules (SAM from its `_build_sam` at the real widths with 3 blocks, Qwen2 from
`build_qwen2_decoder_as_encoder(decoder_layer=2)` at the real widths, the linear `MlpProjector`), random weights
saved as a checkpoint with the `model.` prefix and loaded by `GundamEncoder.from_pretrained`: `forward_vendor`
(both layouts) equals the vendor's `_pixel_values_to_embedding` (deepseek_ocr2.py, its source run as is, with
its bfloat16 casts reading float32 for an fp32 comparison) on a 3x2-crop page and an image without crops; and
a small encoder of the vendor's classes at the real view sizes (SMALL) against backend="triton" in Triton's
interpreter: outputs and every parameter gradient (autograd through the vendor's modules and its method with
its torch.no_grad() lifted) for three images with different crop grids in one call.
The encoder checks need transformers 4.46-4.52 (the vendor pins 4.46.3): from 4.53 on, the vendor's Qwen2 runs
a plain causal mask instead of its prefix mask, silently, so there is no reference to compare with.

    GUNDAM_DEEPSEEK_OCR2_REPO=/path/to/DeepSeek-OCR-2 pytest -m slow tests/test_ocr2_vendor.py
"""
import ast
import functools
import importlib
import importlib.machinery
import os
import random
import sys
import time
import types

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

from gundam import MODES, GundamEncoder, Ocr2Config, count_image_tokens, crop_grid, preprocess
from gundam.config import ProjectorConfig, Qwen2Config, SamConfig
from gundam.images import image_views
from testutils import (EDGE_SIZES, Float32ForBfloat16, assert_close, empty_module, in_mode, midpoint_sizes, page,
                       randomize)
from vendor_model import LiftNoGrad

REPO = os.environ.get("GUNDAM_DEEPSEEK_OCR2_REPO")
pytestmark = pytest.mark.slow
OCR2 = MODES["ocr2"]
# The vendor's encoder at its real widths, with 3 SAM blocks (window, global, window) and 2 Qwen2 layers.
CONFIG = Ocr2Config(sam=SamConfig(depth=3, global_attn_indexes=(1,), net_3_chans=896),
                    qwen2=Qwen2Config(num_hidden_layers=2))
# A small encoder of the vendor's classes at the real view sizes (the vendor's Qwen2 picks its query table by the
# token count, 256 or 144, so the views stay 1024 and 768 px): SAM 32 wide with a window and a global block,
# its neck narrowed, a 2-layer Qwen2 of 6 query heads on 2 kv heads; for the Triton path in the interpreter.
SMALL = Ocr2Config(sam=SamConfig(embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,), out_chans=16,
                                 net_2_chans=24, net_3_chans=96),
                   qwen2=Qwen2Config(hidden_size=96, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                                     intermediate_size=160),
                   projector=ProjectorConfig(input_dim=96, n_embed=40))




class ToUint8:
    """Stands in for torchvision's ToTensor: the RGB image as uint8 [3, H, W]."""

    def __call__(self, image):
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class Identity:
    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, x):
        return x


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class CharTokenizer:
    """The processor's tokenizer stand-in: one id per character, never the image token's id (3)."""
    bos_token_id, eos_token_id, pad_token_id = 0, 1, 2

    def encode(self, text, add_special_tokens=False):
        return [10 + ord(c) % 1000 for c in text]


class AttrDict(dict):
    """What the vendor passes its projector (addict.Dict): keys read as attributes."""
    __getattr__ = dict.__getitem__


def function_source(path, name):
    """The top-level or method `def name` of a source file, as a module of its own."""
    tree = ast.parse(open(path).read())
    fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)
    return compile(ast.Module([fn], []), os.path.basename(path), "exec")


def vendor_constants(path):
    """config.py's literal assignments (BASE_SIZE, IMAGE_SIZE, CROP_MODE, MIN_CROPS, MAX_CROPS, PROMPT, ...)."""
    out = {}
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


@pytest.fixture(scope="module")
def vendor():
    """The vendor's modules, imported from the checkout with the stand-ins above; removed afterwards."""
    if not REPO:
        pytest.skip("set GUNDAM_DEEPSEEK_OCR2_REPO to a DeepSeek-OCR-2 checkout")
    pytest.importorskip("transformers")    # the processor file imports it (any version does for preprocessing)
    code = os.path.join(REPO, "DeepSeek-OCR2-master", "DeepSeek-OCR2-vllm")
    if not os.path.isfile(os.path.join(code, "deepseek_ocr2.py")):
        pytest.fail(f"GUNDAM_DEEPSEEK_OCR2_REPO={REPO!r}: no DeepSeek-OCR2-master/DeepSeek-OCR2-vllm/deepseek_ocr2.py")
    constants = vendor_constants(os.path.join(code, "config.py"))
    assert (constants["BASE_SIZE"], constants["IMAGE_SIZE"], constants["CROP_MODE"]) == (1024, 768, True)
    assert (constants["MIN_CROPS"], constants["MAX_CROPS"]) == (2, 6)
    before = set(sys.modules)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(code)
        mp.setitem(sys.modules, "config", empty_module("config", TOKENIZER=None, **constants))
        transforms = empty_module("torchvision.transforms", ToTensor=ToUint8, Normalize=Identity, Compose=Compose)
        mp.setitem(sys.modules, "torchvision", empty_module("torchvision", transforms=transforms))
        mp.setitem(sys.modules, "torchvision.transforms", transforms)
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            mp.setitem(sys.modules, "flash_attn", empty_module("flash_attn", flash_attn_qkvpacked_func=None))
        ns = types.SimpleNamespace(code=code, constants=constants,
                                   image_process=importlib.import_module("process.image_process"),
                                   sam=importlib.import_module("deepencoderv2.sam_vary_sdpa"),
                                   linear=importlib.import_module("deepencoderv2.build_linear"))
        yield ns
    for name in set(sys.modules) - before:
        if name.split(".")[0] in ("process", "deepencoderv2"):
            del sys.modules[name]


def many_sizes():
    rng = random.Random(2026)
    sizes = [(rng.randint(1, 6000), rng.randint(1, 6000)) for _ in range(4000)]
    sizes += [(rng.randint(600, 2400), rng.randint(600, 2400)) for _ in range(2000)]
    return sizes + EDGE_SIZES + midpoint_sizes()


def test_grids_and_token_counts_equal_the_vendors(vendor):
    ip = vendor.image_process
    namespace = {"math": __import__("math"), "count_tiles": ip.count_tiles, **vendor.constants}
    exec(function_source(os.path.join(vendor.code, "deepseek_ocr2.py"), "get_num_image_tokens"), namespace)
    vendor_tokens = namespace["get_num_image_tokens"]
    host = types.SimpleNamespace(get_hf_processor=lambda: None)   # called, result unused
    checked = 0
    for w, h in many_sizes():
        want_grid = (1, 1) if w <= 768 and h <= 768 else tuple(ip.count_tiles(w, h, image_size=768))
        assert crop_grid(w, h, "ocr2") == want_grid, (w, h)
        assert count_image_tokens(w, h, "ocr2") == vendor_tokens(host, image_width=w, image_height=h), (w, h)
        if want_grid != (1, 1):
            # count_tiles with its defaults (the processor's call) is the same function of the size
            assert tuple(ip.count_tiles(w, h)) == want_grid
            checked += 1
    assert checked > 5000


def vendor_processor(vendor):
    """The vendor's DeepseekOCR2Processor with the tokenizer stand-in (its __init__ wants the real tokenizer
    class, so the fields it sets are set here, with the same values)."""
    ip = vendor.image_process
    proc = ip.DeepseekOCR2Processor.__new__(ip.DeepseekOCR2Processor)
    proc.image_size, proc.base_size = vendor.constants["IMAGE_SIZE"], vendor.constants["BASE_SIZE"]
    proc.patch_size, proc.downsample_ratio = 16, 4
    proc.image_mean = proc.image_std = (0.5, 0.5, 0.5)
    proc.normalize = True
    proc.image_transform = ip.ImageTransform(mean=proc.image_mean, std=proc.image_std, normalize=True)
    proc.tokenizer = CharTokenizer()
    proc.image_token, proc.image_token_id, proc.ignore_id = "<image>", 3, -100
    return proc


@pytest.mark.parametrize("pil_mode", ["RGB", "RGBA", "L", "P", "CMYK"])
def test_processor_views_equal_the_vendors(vendor, pil_mode):
    proc = vendor_processor(vendor)
    sizes = {"RGB": [(1650, 1100), (1, 5000), (768, 768)], "RGBA": [(769, 768), (500, 333)],
             "L": [(700, 1500), (2480, 3508)], "P": [(1000, 800), (300, 900)], "CMYK": [(333, 2000), (1500, 1800)]}
    for w, h in sizes[pil_mode]:
        img = in_mode(page(w, h, seed=w + h, cell=11), pil_mode, seed=w)
        # the vendor's scripts open images as RGB; gundam converts any mode itself
        input_ids, pixel_values, images_crop, seq_mask, spatial, num_tokens, shapes = \
            proc.tokenize_with_images([img.convert("RGB")], bos=True, eos=True, cropping=True)[0]
        glob, crops, lay = image_views(img, OCR2)
        assert spatial.tolist() == [list(lay.grid)] and shapes == [(w, h)], (w, h)
        assert num_tokens == [lay.tokens] == [count_image_tokens(w, h, "ocr2")] and int(seq_mask.sum()) == lay.tokens
        assert pixel_values.dtype == torch.uint8 and torch.equal(pixel_values, glob[None]), f"{w}x{h} global view"
        if lay.n_crops:
            assert images_crop.dtype == torch.uint8 and torch.equal(images_crop, crops[None]), f"{w}x{h} crops"
        else:
            assert crops.shape[0] == 0 and images_crop.shape == (1, 1, 3, 768, 768) and not images_crop.any()
        # dynamic_preprocess on its own: the same crops in the same (row-major) order
        if lay.n_crops:
            raw, ratio = vendor.image_process.dynamic_preprocess(img.convert("RGB"), image_size=768)
            assert tuple(ratio) == lay.grid and len(raw) == lay.n_crops
            for i, crop in enumerate(raw):
                assert torch.equal(ToUint8()(crop), crops[i]), f"{w}x{h} crop {i}"


def transformers_for_the_mask():
    transformers = pytest.importorskip("transformers")
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    if not (4, 46) <= (major, minor) <= (4, 52):
        pytest.skip(f"transformers {transformers.__version__}: the vendor's Qwen2 applies its prefix mask only on "
                    f"4.46-4.52 (on 4.53+ it silently runs a causal mask); use transformers==4.46.3, its pin")
    return transformers


def vendor_sam(vendor, s: SamConfig) -> nn.Module:
    """The vendor's SAM as its `_build_sam` makes it, at s's sizes; at other neck widths than the vendor's
    hard-coded 256 -> 512 -> 896, its own ImageEncoderViT with net_2 / net_3 rebuilt at s's widths."""
    if (s.out_chans, s.net_2_chans, s.net_3_chans) == (256, 512, 896):
        return vendor.sam._build_sam(encoder_embed_dim=s.embed_dim, encoder_depth=s.depth,
                                     encoder_num_heads=s.num_heads,
                                     encoder_global_attn_indexes=list(s.global_attn_indexes))
    sam = vendor.sam.ImageEncoderViT(
        depth=s.depth, embed_dim=s.embed_dim, img_size=s.img_size, mlp_ratio=s.mlp_ratio,
        norm_layer=functools.partial(nn.LayerNorm, eps=s.layer_norm_eps), num_heads=s.num_heads,
        patch_size=s.patch_size, qkv_bias=True, use_rel_pos=True, global_attn_indexes=list(s.global_attn_indexes),
        window_size=s.window_size, out_chans=s.out_chans)
    sam.net_2 = nn.Conv2d(s.out_chans, s.net_2_chans, kernel_size=3, stride=2, padding=1, bias=False)
    sam.net_3 = nn.Conv2d(s.net_2_chans, s.net_3_chans, kernel_size=3, stride=2, padding=1, bias=False)
    return sam


def build_vendor_model(vendor, cfg: Ocr2Config, seed: int, path) -> tuple[nn.Module, GundamEncoder]:
    """(the vendor's modules at cfg's sizes with random weights, GundamEncoder loaded from their checkpoint)."""
    transformers_for_the_mask()
    from deepencoderv2.qwen2_d2e import build_qwen2_decoder_as_encoder
    fn = next(n for n in ast.walk(ast.parse(open(os.path.join(vendor.code, "deepseek_ocr2.py")).read()))
              if isinstance(n, ast.FunctionDef) and n.name == "_pixel_values_to_embedding")
    namespace = {"torch": Float32ForBfloat16("torch"), "NestedTensors": list,
                 "PRINT_NUM_VIS_TOKENS": vendor.constants["PRINT_NUM_VIS_TOKENS"]}
    exec(compile(ast.Module([fn], []), "deepseek_ocr2.py", "exec"), namespace)
    plain = namespace["_pixel_values_to_embedding"]
    exec(compile(ast.Module([ast.fix_missing_locations(LiftNoGrad().visit(fn))], []), "deepseek_ocr2.py", "exec"),
         namespace)
    q, p = cfg.qwen2, cfg.projector

    class VendorModel(nn.Module):
        """The vendor's vLLM model class as far as encoding goes: its modules, its method (and the method with
        its torch.no_grad() lifted, as a fine-tuning host runs it)."""
        _pixel_values_to_embedding = plain
        pixel_values_to_embedding_with_grad = namespace["_pixel_values_to_embedding"]

        def __init__(self):
            super().__init__()
            self.sam_model = vendor_sam(vendor, cfg.sam)
            self.qwen2_model = build_qwen2_decoder_as_encoder(
                decoder_layer=q.num_hidden_layers, hidden_dimension=q.hidden_size,
                num_attention_heads=q.num_attention_heads, num_key_value_heads=q.num_key_value_heads,
                intermediate_size=q.intermediate_size)
            self.projector = vendor.linear.MlpProjector(AttrDict(projector_type="linear", input_dim=p.input_dim,
                                                                 n_embed=p.n_embed))
            self.view_seperator = nn.Parameter(torch.zeros(p.n_embed))

    model = randomize(VendorModel(), seed=seed).eval()
    with torch.no_grad():   # randomize scales a tensor by its first row's size: pos_embed would be ~5e-4
        model.sam_model.pos_embed.normal_(0, 0.1, generator=torch.Generator().manual_seed(seed + 1))
    save_file({"model." + k: v.contiguous() for k, v in model.state_dict().items()}, path)
    ours = GundamEncoder.from_pretrained(path, config=cfg)
    assert set(ours.state_dict()) == set(model.state_dict())
    return model, ours


@pytest.fixture(scope="module")
def vendor_model(vendor, tmp_path_factory):
    """(the vendor's modules at the real widths, GundamEncoder loaded from their checkpoint, seconds to build)."""
    t0 = time.perf_counter()
    model, ours = build_vendor_model(vendor, CONFIG, 21, tmp_path_factory.mktemp("ocr2") / "model.safetensors")
    return model, ours, time.perf_counter() - t0


def test_qwen2_equals_the_vendors(vendor_model):
    """The Qwen2 part alone at the real widths, both view sizes, several views (no SAM: quick)."""
    model, ours, _ = vendor_model
    g = torch.Generator().manual_seed(3)
    for side, n in ((12, 3), (16, 2)):
        x = torch.randn(n, 896, side, side, generator=g)
        with torch.no_grad():
            want = model.qwen2_model(x)
            got = ours.qwen2_model(x)
        assert want.shape == (n, side * side, 896)
        assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5, what=f"qwen2, {side}x{side} views")


def test_forward_vendor_equals_the_vendors_code(vendor_model):
    model, ours, build_s = vendor_model
    batch = preprocess([page(1650, 1100, 51), page(700, 500, 52)], OCR2)   # 3x2 crops; none
    assert batch.grids == [(3, 2), (1, 1)] and batch.tokens == [257 + 6 * 144, 257]
    pv, ic, sc = batch.to_vendor()                     # [2, 1, 3, 1024, 1024], [2, 1, 6, 3, 768, 768], [2, 1, 2]
    t0 = time.perf_counter()
    want = model._pixel_values_to_embedding(pv, ic, sc)
    t_vendor = time.perf_counter() - t0
    t0 = time.perf_counter()
    per_image = ours.forward_vendor(pv, ic, sc)
    t_ours = time.perf_counter() - t0
    flat = ours.forward_vendor(batch.global_views, batch.crops, torch.tensor([list(g) for g in batch.grids]))
    print(f"\nbuild + load {build_s:.1f} s; vendor's _pixel_values_to_embedding {t_vendor:.1f} s, "
          f"forward_vendor {t_ours:.1f} s (8 views: 6 crops of 768, 2 global views of 1024)")
    for what, got in (("per-image layout", per_image), ("flat layout", flat)):
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert b.shape == (batch.tokens[i], 1280)
            err = (a - b).abs().max().item() / b.abs().max().item()
            print(f"{what}, image {i}: max |difference| / max |vendor| = {err:.2e}")
            assert_close(a, b, atol=1e-4 * b.abs().max().item(), rtol=1e-4, what=f"{what}, image {i}")


def test_triton_equals_the_vendors_small_encoder(vendor, tmp_path):
    """backend="triton" (Triton's interpreter, fp32) against the vendor's own modules at SMALL's sizes: three
    images with different crop grids in one call; the embeddings to 1e-4 relative and every parameter gradient
    to 1e-4 of its largest magnitude, against autograd through the vendor's modules (its method with
    torch.no_grad() lifted)."""
    model, ours = build_vendor_model(vendor, SMALL, 31, tmp_path / "model.safetensors")
    model.train(), ours.train()      # nothing differs in training (no dropout): autograd records
    batch = preprocess([page(1650, 800, 61), page(700, 500, 62), page(800, 1650, 63)], OCR2)
    assert batch.grids == [(2, 1), (1, 1), (1, 2)]
    pv, ic, sc = batch.to_vendor()
    t0 = time.perf_counter()
    want = model.pixel_values_to_embedding_with_grad(pv, ic, sc)
    g = torch.Generator().manual_seed(5)
    dout = [torch.randn(o.shape, generator=g) for o in want]
    sum((o * d).sum() for o, d in zip(want, dout)).backward()
    t_vendor = time.perf_counter() - t0
    t0 = time.perf_counter()
    got = ours(batch, backend="triton").split()
    sum((o * d).sum() for o, d in zip(got, dout)).backward()
    print(f"\nvendor's modules {t_vendor:.1f} s, triton in the interpreter {time.perf_counter() - t0:.1f} s "
          f"(forward and backward; 4 crops of 768 px, 3 global views of 1024 px)")
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert b.shape == (batch.tokens[i], SMALL.projector.n_embed)
        print(f"image {i}: max |difference| / max |vendor| = {(a - b).abs().max().item() / b.abs().max().item():.2e}")
        assert_close(a.detach(), b.detach(), atol=1e-4 * b.abs().max().item(), rtol=1e-4, what=f"image {i}")
    vendor_params = dict(model.named_parameters())
    errs = []
    for name, p in ours.named_parameters():
        want_grad = vendor_params[name].grad
        assert p.grad is not None and want_grad is not None, f"{name}: no gradient"
        scale = want_grad.abs().max().item()
        errs.append(((p.grad - want_grad).abs().max().item() / scale, name))
        assert_close(p.grad, want_grad, 1e-4 * scale, 0, f"d{name}")
    print(f"worst relative gradient errors: {sorted(errs)[-3:]}")
