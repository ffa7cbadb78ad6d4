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
    with `AutoModel.from_config(..., trust_remote_code=True)`: full-size encoder with random weights, a 2-layer
    language model. Patched, its forward needs no CUDA, matches the unpatched model's and `generate` gives the
    same tokens.
"""
import os
import sys

import pytest
import torch

import gundam
from gundam import GundamEncoder, preprocess
from gundam.hosts import patched_encoder
from gundam.hosts.hf import CudaCallsTo
from testutils import TINY, TINY_MODE, assert_close, empty_module, page, randomize

REPO = os.environ.get("GUNDAM_DEEPSEEK_OCR_REPO")
HF = os.environ.get("GUNDAM_DEEPSEEK_OCR_HF")
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


def test_hf_remote_code(monkeypatch):
    if not HF:
        pytest.skip("set GUNDAM_DEEPSEEK_OCR_HF to the HF repository deepseek-ai/DeepSeek-OCR")
    transformers = pytest.importorskip("transformers")
    try:
        import torchvision  # noqa: F401
    except ImportError:
        transforms = empty_module("torchvision.transforms")
        transforms.functional = empty_module("torchvision.transforms.functional", InterpolationMode=None)
        for name, module in [("torchvision", empty_module("torchvision", transforms=transforms)),
                             ("torchvision.transforms", transforms),
                             ("torchvision.transforms.functional", transforms.functional)]:
            monkeypatch.setitem(sys.modules, name, module)
    overrides = dict(num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, vocab_size=1024)
    config = transformers.AutoConfig.from_pretrained(HF, trust_remote_code=True, **overrides)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, trust_remote_code=True, attn_implementation="eager").eval()
    with torch.no_grad():  # the vendor zero-initialises the position tables: random values, so that they count
        for name, p in model.model.named_parameters():
            if "pos_embed" in name or "rel_pos" in name:
                p.normal_(0, 0.02)
    g = torch.Generator().manual_seed(1)
    pixels = lambda *shape: torch.rand(*shape, generator=g) * 2 - 1
    tokens = [273 + 210, 273]          # a 2x1 page, a page without crops (the vendor's zero placeholder)
    images = [(pixels(2, 3, 640, 640), pixels(1, 3, 1024, 1024)), (torch.zeros(1, 3, 1024, 1024), pixels(1, 3, 1024, 1024))]
    L = max(tokens) + 10
    input_ids = torch.randint(2, 1024, (2, L), generator=g)
    mask = torch.zeros(2, L, dtype=torch.bool)
    for i, t in enumerate(tokens):
        mask[i, 5:5 + t] = True
    kwargs = dict(images=images, images_seq_mask=mask, images_spatial_crop=torch.tensor([[2, 1], [1, 1]]))
    one = dict(images=images[:1], images_seq_mask=mask[:1], images_spatial_crop=kwargs["images_spatial_crop"][:1])
    embeds = {}
    model.model.layers[0].register_forward_pre_hook(
        lambda m, args, kw: embeds.__setitem__("h", kw.get("hidden_states", args[0] if args else None).clone()),
        with_kwargs=True)
    with torch.no_grad(), CudaCallsTo(torch.device("cpu")):    # the vendor's forward calls .cuda()
        want = model(input_ids, **kwargs).logits
        want_embeds = embeds["h"]
        want_ids = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False, **one)
    gundam.patch(model, backend="torch")
    assert patched_encoder(model).config == gundam.EncoderConfig.deepseek_ocr()
    with torch.no_grad():
        got = model(input_ids, **kwargs).logits
        got_embeds = embeds["h"]
        got_ids = model.generate(input_ids[:1], max_new_tokens=3, do_sample=False, **one)
    scale = want_embeds.abs().max()
    assert_close(got_embeds / scale, want_embeds / scale, atol=1e-5, rtol=0, what="inputs_embeds / max")
    assert_close(got, want, atol=1e-4, rtol=1e-4, what="logits")
    assert torch.equal(got_ids, want_ids)
