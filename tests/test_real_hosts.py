"""Against the hosts' real code, where it is on this machine (opt-in: slow, CPU; skipped unless a path is set).

GUNDAM_DEEPSEEK_OCR_REPO: a checkout of github.com/deepseek-ai/DeepSeek-OCR (read at e4ac34e). The vendor's own
    encoder modules (DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepencoder), built at the tiny test size with the
    test encoder's weights, and the vendor's own `_pixel_values_to_embedding` (deepseek_ocr.py, its source run
    as is, except that its cast of the crops to bfloat16 reads float32 here, for an fp32 comparison): both
    layouts of `forward_vendor` and `gundam.patch` on a host made of the vendor's modules agree with it; with
    the method's `torch.no_grad()` lifted (as a fine-tuning host would), every parameter gradient of both
    backends equals the one autograd gives through the vendor's modules.
    Needs `easydict` (the vendor's CLIP imports it); flash_attn is not needed (the vendor's CLIP uses SDPA).
GUNDAM_DEEPSEEK_OCR_HF: the HF repository deepseek-ai/DeepSeek-OCR (its .py files and config.json; no weights)
    and its pinned packages (transformers==4.46.3, addict, easydict, einops; torchvision, which only `infer`'s
    preprocessing uses, is replaced by an empty module when absent). The real `DeepseekOCRForCausalLM`, built
    with `AutoModel.from_config(..., trust_remote_code=True)`: full-size encoder with random weights (the tables
    and biases its init leaves at zero drawn too), a 2-layer language model. Rows of 2x1 and no crops (640 px,
    1024 px global views) in one call: patched, forward needs no CUDA, the inputs_embeds reaching the first
    decoder layer and the logits match the unpatched model's, `generate` gives the same tokens, each call is one
    encoder pass and none through the host's towers, and the encoder holds the host's parameters (its storage).
    Run on the files of gustavoMarajo/ia_ds_ocr 4bcfce2 (its first commit, the files as published: `.cuda()`
    calls and prints in place; modeling_deepseekv2.py, configuration_deepseek_v2.py, deepencoder.py and
    conversation.py are the same blobs in kurokencom/DeepSeekOcrCPUWin 3d57463): inputs_embeds within 1.6e-6 of
    their largest value, logits within 6.8e-6 (2 to 3 min on 2 cores).
GUNDAM_DEEPSEEK_OCR2_HF: the HF repository deepseek-ai/DeepSeek-OCR-2 (config.json, modeling_deepseekocr2.py,
    deepencoderv2.py, modeling_deepseekv2.py, configuration_deepseek_v2.py, conversation.py), the same packages;
    transformers 4.46.3 also because the vendor's Qwen2 mask comes from its override of `_update_causal_mask`,
    which later versions stop calling (the test checks it is called). The same checks on the real
    `DeepseekOCR2ForCausalLM` (SAM and the 24-layer Qwen2 at full size), rows of 2x1, no and 1x3 crops (768 px,
    1024 px global views). Run on files of sen-ye/DeepSeek-OCR2-query-ablation d397ea1: its config.json and
    language-model files (modeling_deepseekv2.py, configuration_deepseek_v2.py, conversation.py: the same blobs
    as the DeepSeek-OCR copy above), its modeling_deepseekocr2.py and deepencoderv2.py with the copy's own
    additions taken back out (ablation hooks, off by default, and two `infer` arguments; an
    `attn_implementation` argument and attention outputs in the Qwen2 part, which then equals the vendor's
    DeepSeek-OCR2-vllm/deepencoderv2/qwen2_d2e.py of deepseek-ai/DeepSeek-OCR-2 2f3699e;
    RealBSMC/OpenNoteVisionLM 0b1e2f7's modeling_deepseekocr2.py differs from the result only where it moves
    tensors with `.to(device)` and drops autocast): inputs_embeds within 1.6e-6 of their largest value, logits
    within 5.1e-6 (7 to 9 min on 2 cores).
"""
import os
import sys
import time

import pytest
import torch

import gundam
from gundam import GundamEncoder, preprocess
from gundam.hosts import patched_encoder
from gundam.hosts.hf import CudaCallsTo
from testutils import TINY, TINY_MODE, Counter, assert_close, empty_module, page, randomize

REPO = os.environ.get("GUNDAM_DEEPSEEK_OCR_REPO")
HF = os.environ.get("GUNDAM_DEEPSEEK_OCR_HF")
OCR2_HF = os.environ.get("GUNDAM_DEEPSEEK_OCR2_HF")
pytestmark = pytest.mark.slow


@pytest.fixture
def vendor():
    if not REPO:
        pytest.skip("set GUNDAM_DEEPSEEK_OCR_REPO to a DeepSeek-OCR checkout")
    pytest.importorskip("easydict")
    from vendor_model import vendor_like
    ours = randomize(GundamEncoder(TINY), seed=7).eval()
    return ours, vendor_like(REPO, ours)


def vendor_inputs(sizes):
    """A batch of pages and the vendor's tensors for it: global views, tile counts and per image the crop list
    it takes (exactly w*h crops, as vLLM passed them; one zero crop for none)."""
    batch = preprocess([page(w, h, seed=20 + i) for i, (w, h) in enumerate(sizes)], TINY_MODE)
    pv, ic, sc = batch.to_vendor()
    crops = torch.split(batch.crops, batch.n_crops)
    lists = [c[None] if len(c) else torch.zeros(1, 1, 3, TINY_MODE.image_size, TINY_MODE.image_size) for c in crops]
    return batch, pv, ic, sc, lists


def test_forward_vendor_equals_the_vendors_code(vendor):
    ours, model = vendor
    sizes = [(1300, 650), (500, 300), (700, 2100), (1950, 1300), (2600, 700)]
    batch, pv, ic, sc, lists = vendor_inputs(sizes)
    with torch.no_grad():
        want = [model._pixel_values_to_embedding(pv[j:j + 1], [lists[j]], sc[j:j + 1])[0] for j in range(len(sizes))]
    flat = torch.tensor([list(g) for g in batch.grids])
    for what, got in [("per-image lists", ours.forward_vendor(list(pv), lists, list(sc))),
                      ("per-image tensors", ours.forward_vendor(pv, ic, sc)),
                      ("flat", ours.forward_vendor(batch.global_views, batch.crops, flat))]:
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"{what}, image {i}")
    gundam.patch(model, backend="torch")    # the vendor's module classes: shape read off them, storage shared
    enc = patched_encoder(model)
    assert enc.config == TINY
    assert {p.data_ptr() for p in enc.parameters()} <= {p.data_ptr() for p in model.parameters()}
    for i, (a, b) in enumerate(zip(model._pixel_values_to_embedding(pv, ic, sc), want, strict=True)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"patched, image {i}")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_equal_the_vendors_modules(vendor, backend):
    # fine-tuning: a 2x1 crop grid and an image without crops in one batch; the Triton backend runs its
    # backward kernels (in the interpreter on CPU)
    ours, model = vendor
    batch, pv, ic, sc, lists = vendor_inputs([(1300, 650), (500, 300)])
    want_out = [model.pixel_values_to_embedding_with_grad(pv[j:j + 1], [lists[j]], sc[j:j + 1])[0] for j in range(2)]
    g = torch.Generator().manual_seed(5)
    dout = [torch.randn(o.shape, generator=g) for o in want_out]
    sum((o * d).sum() for o, d in zip(want_out, dout)).backward()
    got_out = ours(batch, backend=backend).split()     # forward_vendor runs under no_grad, as the vendor's method
    sum((o * d).sum() for o, d in zip(got_out, dout)).backward()
    for i, (a, b) in enumerate(zip(got_out, want_out, strict=True)):
        assert_close(a.detach(), b.detach(), atol=1e-5, rtol=1e-5, what=f"output, image {i}")
    vendor_params = dict(model.named_parameters())
    for name, p in ours.named_parameters():
        want = vendor_params[name].grad
        assert p.grad is not None and want is not None, f"{name}: no gradient"
        # fp32, summations in another order: relative to the gradient's largest magnitude, as on the torch path
        assert_close(p.grad, want, 1e-4 * want.abs().max().item(), 0, f"d{name}")


# the host's encoder, by the vendor's names: DeepSeek-OCR's (vision_model, image_newline) and DeepSeek-OCR 2's
# (qwen2_model) modules and vectors
TOWERS = ("sam_model", "vision_model", "qwen2_model", "projector")
VECTORS = ("image_newline", "view_seperator")
# CLIP's patch embedding, which the vendor's forward bypasses (SAM's features are CLIP's patches)
BYPASSED = {"vision_model.embeddings.patch_embedding.weight", "vision_model.embeddings.patch_embedding.bias"}


def remote_code_model(path, monkeypatch):
    """The HF repository's model class at `path`, built with `AutoModel.from_config(..., trust_remote_code=True)`:
    the full-size encoder with random weights, a 2-layer language model (4 routed experts, 1024 tokens)."""
    transformers = pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except ImportError:    # only `infer`'s preprocessing uses it
        transforms = empty_module("torchvision.transforms")
        transforms.functional = empty_module("torchvision.transforms.functional", InterpolationMode=None)
        for name, module in [("torchvision", empty_module("torchvision", transforms=transforms)),
                             ("torchvision.transforms", transforms),
                             ("torchvision.transforms.functional", transforms.functional)]:
            monkeypatch.setitem(sys.modules, name, module)
    overrides = dict(num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, vocab_size=1024)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, trust_remote_code=True, attn_implementation="eager").eval()
    # the vendor's init leaves the position tables and the biases at zero: random values, so that they count
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if name.split(".")[0] in TOWERS and not p.any():
                p.normal_(0, 0.02)
    return model


def pixels(*shape, generator):
    return torch.rand(*shape, generator=generator) * 2 - 1


def check_patched_equals_unpatched(model, images, grids, tokens, config):
    """One row per image (`images`: the vendor's `(crops, global)` tuples, `grids` its [w, h], `tokens` its
    image positions): `model`'s forward (logits, and inputs_embeds as the first decoder layer gets them) and
    greedy `generate` of the first row, unpatched (with its `.cuda()` calls sent to the CPU) and patched with the
    torch backend (no such help). Patched: one encoder pass per call (generate: its prefill), none through the
    host's encoder modules, the encoder holds the host's parameters; results within fp32 rounding, same tokens."""
    owner = model.model
    g = torch.Generator().manual_seed(1)
    L = max(tokens) + 10
    input_ids = torch.randint(2, 1024, (len(tokens), L), generator=g)
    mask = torch.zeros(len(tokens), L, dtype=torch.bool)
    for i, t in enumerate(tokens):
        mask[i, 5:5 + t] = True
    spatial = torch.tensor(grids)
    kwargs = dict(images=images, images_seq_mask=mask, images_spatial_crop=spatial)
    one = dict(images=images[:1], images_seq_mask=mask[:1], images_spatial_crop=spatial[:1])
    embeds = {}
    owner.layers[0].register_forward_pre_hook(
        lambda m, args, kw: embeds.__setitem__("h", kw.get("hidden_states", args[0] if args else None).clone()),
        with_kwargs=True)
    towers = Counter()
    for name in TOWERS:
        if hasattr(owner, name):
            getattr(owner, name).register_forward_hook(towers)
    start = time.perf_counter()
    with torch.no_grad(), CudaCallsTo(torch.device("cpu")):    # the vendor's forward calls .cuda()
        want = model(input_ids, **kwargs).logits
        want_embeds = embeds["h"]
        want_ids = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False, **one)
    assert towers.calls > 0                                     # the hooks see the host's own encoder
    assert not torch.equal(want_embeds[mask], owner.embed_tokens(input_ids)[mask])   # image tokens went in
    towers.calls = 0
    seconds = [time.perf_counter() - start]
    gundam.patch(model, backend="torch")
    enc = patched_encoder(model)
    assert enc.config == config
    host = {f"{part}.{name}": p for part in TOWERS if hasattr(owner, part)
            for name, p in getattr(owner, part).named_parameters()}
    host.update({name: getattr(owner, name) for name in VECTORS if hasattr(owner, name)})
    mine = {p.data_ptr() for p in enc.parameters()}
    assert mine <= {p.data_ptr() for p in host.values()}                    # the host's storage, nothing copied
    assert {name for name, p in host.items() if p.data_ptr() not in mine} <= BYPASSED
    enc.forward = passes = Counter(enc.forward)                 # forward_vendor calls self.forward
    start = time.perf_counter()
    with torch.no_grad():
        got = model(input_ids, **kwargs).logits
        got_embeds = embeds["h"]
        got_ids = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False, **one)
    seconds.append(time.perf_counter() - start)
    del enc.forward
    assert (passes.calls, towers.calls) == (2, 0)
    scale = want_embeds.abs().max()
    err = ((got_embeds - want_embeds) / scale).abs().max()
    print(f"\n{type(model).__name__}: inputs_embeds / max: max err {err:.1e}; logits: max err "
          f"{(got - want).abs().max():.1e} (largest {want.abs().max():.2f}); tokens {got_ids[0, L:].tolist()}; "
          f"forward + generate: unpatched {seconds[0]:.0f} s, patched {seconds[1]:.0f} s")
    assert_close(got_embeds / scale, want_embeds / scale, atol=1e-5, rtol=0, what="inputs_embeds / max")
    assert_close(got, want, atol=1e-4, rtol=1e-4, what="logits")
    assert torch.equal(got_ids, want_ids)


def test_hf_remote_code(monkeypatch):
    if not HF:
        pytest.skip("set GUNDAM_DEEPSEEK_OCR_HF to the HF repository deepseek-ai/DeepSeek-OCR")
    model = remote_code_model(HF, monkeypatch)
    g = torch.Generator().manual_seed(1)
    # a 2x1 page (640 px crops), a page without crops (the vendor's zero placeholder); 1024 px global views
    images = [(pixels(2, 3, 640, 640, generator=g), pixels(1, 3, 1024, 1024, generator=g)),
              (torch.zeros(1, 3, 1024, 1024), pixels(1, 3, 1024, 1024, generator=g))]
    check_patched_equals_unpatched(model, images, [[2, 1], [1, 1]], [273 + 210, 273],
                                   gundam.EncoderConfig.deepseek_ocr())


def test_hf_remote_code_ocr2(monkeypatch):
    if not OCR2_HF:
        pytest.skip("set GUNDAM_DEEPSEEK_OCR2_HF to the HF repository deepseek-ai/DeepSeek-OCR-2")
    model = remote_code_model(OCR2_HF, monkeypatch)
    # the vendor's Qwen2 takes its prefix mask (image tokens see each other, queries causal) from its override of
    # Qwen2Model._update_causal_mask, which transformers 4.46.3 calls: a version that builds a causal mask
    # instead fails here, not as a mismatch below
    qwen2 = model.model.qwen2_model.model.model
    qwen2._update_causal_mask = masks = Counter(qwen2._update_causal_mask)
    with torch.no_grad():
        model.model.qwen2_model(torch.randn(1, 896, 12, 12))     # SAM's features of a 768 px crop
    del qwen2._update_causal_mask
    assert masks.calls == 1
    g = torch.Generator().manual_seed(1)
    # 2x1, no crops (`infer`'s zero placeholder, at the global view's size), 1x3: 768 px crops, 1024 px global
    # views; per image 144 tokens a crop, 256 the global view, 1 the separator
    images = [(pixels(2, 3, 768, 768, generator=g), pixels(1, 3, 1024, 1024, generator=g)),
              (torch.zeros(1, 3, 1024, 1024), pixels(1, 3, 1024, 1024, generator=g)),
              (pixels(3, 3, 768, 768, generator=g), pixels(1, 3, 1024, 1024, generator=g))]
    check_patched_equals_unpatched(model, images, [[2, 1], [1, 1], [1, 3]], [2 * 144 + 257, 257, 3 * 144 + 257],
                                   gundam.Ocr2Config.deepseek_ocr2())
