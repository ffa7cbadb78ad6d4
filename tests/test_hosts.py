"""`gundam.patch` / `gundam.unpatch` on each host's DeepSeek-OCR class.

No host package is a dependency of this project: where one is importable, its real class is checked for the
methods and signatures the patch relies on; the behaviour is tested on stand-ins that follow each host's
contract (tests/host_standins.py), on CPU with the torch backend, at the tiny test size.
"""
import copy
import inspect
import io
import pickle
from types import SimpleNamespace
from importlib.metadata import entry_points
from typing import ClassVar, Literal, Protocol, runtime_checkable

import pytest
import torch
import torch.nn as nn

import gundam
from gundam import preprocess
from gundam.hosts import hf, patched_encoder
from host_standins import (DeepseekOCR2Model, DeepseekOCRModel, HFDeepseekOCRForCausalLM, SglangDeepseekOCRForCausalLM,
                           SglangUnlimitedOCRForCausalLM, VllmDeepseekOCRForCausalLM, add_encoder, image_tokens,
                           sglang_item)
from testutils import OCR2_TINY, OCR2_TINY_MODE, TINY_MODE, assert_close, page

S, B = TINY_MODE.image_size, TINY_MODE.base_size
CPU_ONLY = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def batch():
    """Grids 2x1, none, 3x2: different crop counts in one batch."""
    sizes = [(1300, 650), (500, 300), (1950, 1300)]
    return preprocess([page(w, h, seed=10 + i) for i, (w, h) in enumerate(sizes)], TINY_MODE)


def per_image(batch):
    return list(zip(batch.global_views, torch.split(batch.crops, batch.n_crops), batch.grids))


def check(got, want, what):
    assert len(got) == len(want), what
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"{what}, image {i}")


def host_parameters(owner):
    return {k: p for k, p in owner.named_parameters() if k.split(".")[0] in
            ("sam_model", "vision_model", "qwen2_model", "projector", "image_newline", "view_seperator")}


def assert_shares_parameters(owner, model):
    """Every encoder parameter is the host's own object (same storage): nothing copied, and the host's module
    tree is unchanged (the encoder is not registered as a submodule)."""
    enc = patched_encoder(model)
    mine, host = dict(enc.named_parameters()), host_parameters(owner)
    assert mine.keys() == host.keys()
    for name, p in mine.items():
        assert p is host[name] and p.data_ptr() == host[name].data_ptr(), name
    assert not list(enc.buffers())
    assert all(m is not enc for m in model.modules())


# ---------------------------------------------------------------------------------------------------------
# Hugging Face remote code

def hf_inputs(batch, text=3):
    """One image per batch row (as `images` tuples), rows padded to one length: input_ids, images,
    images_seq_mask, images_spatial_crop. A row without crops carries the vendor's zero placeholder."""
    tokens, L = batch.tokens, max(batch.tokens) + 2 * text
    input_ids = torch.randint(1, 40, (len(tokens), L), generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(len(tokens), L, dtype=torch.bool)
    images = []
    for i, (glob, crops, _) in enumerate(per_image(batch)):
        mask[i, text:text + tokens[i]] = True
        images.append((crops if len(crops) else torch.zeros(1, 3, B, B), glob[None]))
    return input_ids, images, mask, torch.tensor([list(g) for g in batch.grids])


def test_hf_patched_equals_vendor(batch):
    model = HFDeepseekOCRForCausalLM(seed=1).eval()
    input_ids, images, mask, spatial = hf_inputs(batch)
    kwargs = dict(images=images, images_seq_mask=mask, images_spatial_crop=spatial)
    with torch.no_grad():
        with hf.CudaCallsTo(torch.device("cpu")):      # the vendor's forward moves the mask with .cuda()
            want = model.model(input_ids, **kwargs)[0]
        assert gundam.patch(model, backend="torch") is model
        got = model.model(input_ids, **kwargs)[0]     # no .cuda() left: runs on a CPU as it is
        text = model.model.embed_tokens(input_ids)
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="HF inputs_embeds")
    assert torch.equal(got[~mask], text[~mask])        # text rows untouched
    assert_shares_parameters(model.model, model)
    # a decode step (one token) encodes nothing, as the vendor
    with torch.no_grad():
        step = model.model(input_ids[:, :1], **kwargs)[0]
    assert torch.equal(step, model.model.embed_tokens(input_ids[:, :1]))


def test_hf_remote_code_of_deepseek_ocr2():
    """DeepSeek-OCR 2's remote code (DeepseekOCR2Model): rows of 2x1 crops, none, 3x1, one encoder pass."""
    model = DeepseekOCR2Model(seed=9).eval()
    ocr2 = preprocess([page(w, h, seed=50 + i) for i, (w, h) in enumerate([(1300, 650), (500, 300), (2000, 650)])],
                      OCR2_TINY_MODE)
    input_ids, images, mask, spatial = hf_inputs(ocr2)
    kwargs = dict(images=images, images_seq_mask=mask, images_spatial_crop=spatial)
    with torch.no_grad(), hf.CudaCallsTo(torch.device("cpu")):
        want = model(input_ids, **kwargs)[0]
    gundam.patch(model, backend="torch")
    enc = patched_encoder(model)
    assert enc.family == "deepseek-ocr2" and enc.config == OCR2_TINY
    with torch.no_grad():
        got = model(input_ids, **kwargs)[0]
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="HF DeepSeek-OCR 2 inputs_embeds")
    assert not torch.equal(got[mask], model.embed_tokens(input_ids)[mask])
    assert_shares_parameters(model, model)
    gundam.unpatch(model)
    assert "forward" not in model.__dict__


def test_hf_infer_runs_on_cpu(batch):
    model = HFDeepseekOCRForCausalLM(seed=2).eval()
    input_ids, images, mask, spatial = hf_inputs(batch)
    one = dict(input_ids=input_ids[0], images=images[:1], images_seq_mask=mask[0], images_spatial_crop=spatial[:1])
    if CPU_ONLY:
        with pytest.raises((AssertionError, RuntimeError)):   # the vendor's .cuda() calls
            model.infer(**one)
    with torch.no_grad(), hf.CudaCallsTo(torch.device("cpu")):
        want = model(one["input_ids"][None], images=one["images"], images_seq_mask=one["images_seq_mask"][None],
                     images_spatial_crop=one["images_spatial_crop"])
    gundam.patch(model)
    assert_close(model.infer(**one), want, atol=1e-4, rtol=1e-5, what="infer logits")
    gundam.unpatch(model)
    assert "infer" not in model.__dict__ and "forward" not in model.model.__dict__


def test_hf_host_updates_reach_the_encoder(batch):
    """In-place updates of the host's parameters (an optimizer step) and replaced parameters
    (load_state_dict(assign=True)) are both what the patched model encodes with."""
    model = HFDeepseekOCRForCausalLM(seed=3).eval()
    input_ids, images, mask, spatial = hf_inputs(batch)
    kwargs = dict(images=images, images_seq_mask=mask, images_spatial_crop=spatial)
    fresh = HFDeepseekOCRForCausalLM(seed=3).eval()
    gundam.patch(model, backend="torch")
    gundam.patch(fresh, backend="torch")
    with torch.no_grad():
        before = model.model(input_ids, **kwargs)[0]
        model.model.sam_model.pos_embed.add_(0.5)                 # in place: cached tables must follow
        fresh.model.sam_model.pos_embed.add_(0.5)
        after = model.model(input_ids, **kwargs)[0]
        state = {k: v.clone() for k, v in model.state_dict().items()}
        state["model.projector.layers.bias"] += 1.0
        model.load_state_dict(state, assign=True)                 # new parameter objects
        fresh.model.projector.layers.bias.add_(1.0)
        replaced = model.model(input_ids, **kwargs)[0]
        want = fresh.model(input_ids, **kwargs)[0]
    assert not torch.allclose(before, after)
    assert_close(replaced, want, atol=1e-5, rtol=1e-5, what="after load_state_dict(assign=True)")
    assert_shares_parameters(model.model, model)


def test_hf_rows_with_images_are_read_from_the_mask(batch):
    """The vendor encodes nothing when the first row's global view sums to 0 (a page that is half black, half
    white); the patched forward encodes every row whose images_seq_mask has image positions."""
    model = HFDeepseekOCRForCausalLM(seed=8).eval()
    input_ids, images, mask, spatial = hf_inputs(batch)
    glob = torch.ones_like(images[0][1])
    glob[..., ::2, :] = -1
    images[0] = (images[0][0], glob)
    assert float(glob.double().sum()) == 0
    gundam.patch(model, backend="torch")
    with torch.no_grad():
        got = model.model(input_ids, images=images, images_seq_mask=mask, images_spatial_crop=spatial)[0]
        want = model.model.embed_tokens(input_ids).clone()
        for i, (crops, g) in enumerate(images):
            has_crops = tuple(spatial[i].tolist()) != (1, 1)
            want[i][mask[i]] = image_tokens(model.model, crops if has_crops else None, g[0], spatial[i])
    assert_close(got, want, atol=1e-5, rtol=1e-5, what="rows with a zero-sum first global view")
    # a row without image positions is not encoded (a text-only row beside rows with images)
    mask[1] = False
    with torch.no_grad():
        text_row = model.model(input_ids, images=images, images_seq_mask=mask, images_spatial_crop=spatial)[0][1]
    assert torch.equal(text_row, model.model.embed_tokens(input_ids)[1])


# ---------------------------------------------------------------------------------------------------------
# vLLM

@runtime_checkable
class SupportsEncoderCudaGraph(Protocol):
    """vLLM's runtime-checkable protocol, as far as the stand-in implements it."""
    supports_encoder_cudagraph: ClassVar[Literal[True]] = True

    def get_encoder_cudagraph_config(self): ...

    def encoder_cudagraph_forward(self, values, path="default"): ...


def test_vllm_flat_layout(batch):
    model = VllmDeepseekOCRForCausalLM(seed=4).eval()
    spatial = torch.tensor([list(g) for g in batch.grids])
    kwargs = dict(pixel_values=batch.global_views, images_crop=batch.crops, images_spatial_crop=spatial)
    with torch.no_grad():
        want = model.embed_multimodal(**kwargs)
    assert isinstance(model, SupportsEncoderCudaGraph)
    gundam.patch(model, backend="torch")
    check(model.embed_multimodal(**kwargs), want, "vLLM flat layout")
    # the vendor's own vLLM class passes the per-image layout to the same method
    check(model._pixel_values_to_embedding(*batch.to_vendor()), want, "vLLM per-image layout")
    assert not isinstance(model, SupportsEncoderCudaGraph)      # eager path: the patched one
    assert_shares_parameters(model, model)
    gundam.unpatch(model)
    assert isinstance(model, SupportsEncoderCudaGraph) and type(model) is VllmDeepseekOCRForCausalLM
    assert "_pixel_values_to_embedding" not in model.__dict__


def test_vllm_tensor_parallel_is_refused():
    model = VllmDeepseekOCRForCausalLM()
    attn = model.vision_model.transformer.layers[0].self_attn
    attn.qkv_proj = nn.Linear(1024, 3 * 1024 // 2)            # rank 0 of 2 holds half of the heads
    attn.qkv_proj.tp_size = 2
    with pytest.raises(ValueError, match="split across 2 tensor-parallel ranks"):
        gundam.patch(model)
    del attn.qkv_proj.tp_size                                   # a shard without the attribute: the shapes say it
    with pytest.raises(ValueError, match=r"qkv_proj.weight has shape \[1536, 1024\], expected \[3072, 1024\]"):
        gundam.patch(model)
    assert "_pixel_values_to_embedding" not in model.__dict__


def test_vllm_plugin_entry_point(monkeypatch):
    (ep,) = [ep for ep in entry_points(group="vllm.general_plugins") if ep.name == "gundam"]
    assert ep.value == "gundam.hosts.vllm:register"
    monkeypatch.delenv("GUNDAM_PATCH_VLLM", raising=False)
    assert ep.load()() is None                                  # off unless asked: imports nothing of vLLM


# ---------------------------------------------------------------------------------------------------------
# SGLang

def test_sglang_items_with_different_crop_counts(batch):
    items = [sglang_item(g, c, grid, S) for g, c, grid in per_image(batch)]
    unlimited = SglangUnlimitedOCRForCausalLM(seed=5).eval()
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        unlimited.get_image_feature(items)                      # Unlimited-OCR's own batching
    for model in (SglangDeepseekOCRForCausalLM(seed=5).eval(), unlimited):
        want = [model.get_image_feature([item]) for item in items]  # item by item
        gundam.patch(model, backend="torch")
        got = model.get_image_feature(items)
        assert_close(got, torch.cat(want), atol=1e-5, rtol=1e-5, what=f"{type(model).__name__} items")
        check(model._pixel_values_to_embedding(*batch.to_vendor()), want, "SGLang per-image layout")
        assert_shares_parameters(model, model)


def test_sglang_items_of_several_images(batch):
    """SGLang's processors put all images of a request in one item: feature [k, 3, B, B], images_crop [1, all
    their crops, 3, S, S], images_spatial_crop [1, k, 2], has_local_crops (Unlimited-OCR: one per image)."""
    model = SglangUnlimitedOCRForCausalLM(seed=6).eval()
    images = per_image(batch)                                   # 2x1 (2 crops), none, 3x2 (6 crops)
    two = SimpleNamespace(feature=torch.stack([images[0][0], images[1][0]]), images_crop=images[0][1][None],
                          images_spatial_crop=torch.tensor([[list(images[0][2]), list(images[1][2])]]),
                          has_local_crops=[True, False])
    one = sglang_item(*images[2], S)
    with torch.no_grad():
        want = [image_tokens(model, c if len(c) else None, g, grid) for g, c, grid in images]
    gundam.patch(model, backend="torch")
    assert_close(model.get_image_feature([two, one]), torch.cat(want), atol=1e-5, rtol=1e-5, what="k-image items")
    pv, ic, sc = batch.to_vendor()
    check(model._pixel_values_to_embedding(pv, ic, sc, has_local_crops=[True, False, True]), want, "flags")
    bad = SimpleNamespace(**dict(vars(two), images_spatial_crop=torch.tensor([[[2, 1]]])))
    with pytest.raises(ValueError, match=r"item 0 has 2 images and images_spatial_crop \[1, 1, 2\]"):
        model.get_image_feature([bad])
    bad = SimpleNamespace(**dict(vars(two), images_crop=images[2][1][None]))
    with pytest.raises(ValueError, match="item 0 holds 6 crops, its images_spatial_crop asks for 2"):
        model.get_image_feature([bad])


# ---------------------------------------------------------------------------------------------------------
# every host

HOSTS = {"hf": HFDeepseekOCRForCausalLM, "vllm": VllmDeepseekOCRForCausalLM, "sglang": SglangDeepseekOCRForCausalLM}


@pytest.mark.parametrize("host", HOSTS)
def test_patch_twice_and_unpatch(host):
    model = HOSTS[host]()
    owner = model.model if host == "hf" else model
    before = dict(owner.__dict__), dict(model.__dict__)
    gundam.patch(model, backend="torch")
    patched = dict(owner.__dict__)
    enc = patched_encoder(model)
    gundam.patch(model, backend="auto")                         # harmless: same encoder, new backend
    assert patched_encoder(model) is enc and enc.backend == "auto"
    assert owner.__dict__.keys() == patched.keys()
    gundam.unpatch(model)
    gundam.unpatch(model)                                       # a model that is not patched: unchanged
    assert (dict(owner.__dict__), dict(model.__dict__)) == before
    assert patched_encoder(model) is None


def owner_of(host, model):
    return model.model if host == "hf" else model


def encode_through(host, model, batch, patched=True):
    """What the host's image path gives for `batch`: HF's inputs_embeds, vLLM's and SGLang's image tokens."""
    with torch.no_grad(), hf.CudaCallsTo(torch.device("cpu")):   # the vendor's HF forward calls .cuda()
        if host == "hf":
            input_ids, images, mask, spatial = hf_inputs(batch)
            return model.model(input_ids, images=images, images_seq_mask=mask, images_spatial_crop=spatial)[0]
        if host == "vllm":
            spatial = torch.tensor([list(g) for g in batch.grids])
            return torch.cat(model.embed_multimodal(pixel_values=batch.global_views, images_crop=batch.crops,
                                                    images_spatial_crop=spatial))
        items = [sglang_item(g, c, grid, S) for g, c, grid in per_image(batch)]
        if patched:
            return model.get_image_feature(items)
        return torch.cat([model.get_image_feature([item]) for item in items])   # the host's own: item by item


def torch_roundtrip(model):
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
@pytest.mark.parametrize("host", HOSTS)
def test_patched_model_copies_and_pickles(host, how):
    """A copy of a patched model is a patched model around the copy's own parameters (not the original's), and
    its unpatch restores the host's methods; the original stays as it was."""
    batch = preprocess(page(1300, 650, seed=10), TINY_MODE)     # one image, 2x1 crops
    model = HOSTS[host](seed=7).eval()
    gundam.patch(model, backend="torch")
    before = encode_through(host, model, batch)
    twin = {"deepcopy": copy.deepcopy, "pickle": lambda m: pickle.loads(pickle.dumps(m)),
            "torch.save": torch_roundtrip}[how](model)
    owner = owner_of(host, twin)
    assert type(twin) is type(model) and patched_encoder(twin) is not None
    with torch.no_grad():
        owner.projector.layers.bias.add_(1.0)                   # the copy's weights only
    got = encode_through(host, twin, batch)
    assert torch.equal(encode_through(host, model, batch), before)
    fresh = HOSTS[host](seed=7).eval()                          # the host's own code with the same change
    with torch.no_grad():
        owner_of(host, fresh).projector.layers.bias.add_(1.0)
    assert_close(got, encode_through(host, fresh, batch, patched=False), atol=1e-5, rtol=1e-5, what=f"{how} copy")
    assert_shares_parameters(owner, twin)
    gundam.unpatch(twin)
    assert patched_encoder(twin) is None and type(twin) is HOSTS[host]
    for module in (twin, owner):
        assert not {"forward", "infer", "_pixel_values_to_embedding", "_process_image_input"} & module.__dict__.keys()
    assert patched_encoder(model) is not None                   # the original is still patched


def test_not_a_deepseek_ocr_model():
    with pytest.raises(TypeError, match="Linear is not a DeepSeek-OCR model"):
        gundam.patch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="got a str, expected a DeepSeek-OCR model"):
        gundam.patch("deepseek-ai/DeepSeek-OCR")
    half = VllmDeepseekOCRForCausalLM()
    del half.projector                                          # encoder parts missing: not recognised
    with pytest.raises(TypeError, match="not a DeepSeek-OCR model"):
        gundam.patch(half)
    with pytest.raises(ValueError, match="backend"):
        gundam.patch(VllmDeepseekOCRForCausalLM(), backend="gpu")
    # HF remote code of another model (e.g. Unlimited-OCR's UnlimitedOCRModel): its forward was not read
    other = type("UnlimitedOCRModel", (nn.Module,), {"forward": DeepseekOCRModel.forward})()
    add_encoder(other, seed=0)
    with pytest.raises(TypeError, match="UnlimitedOCRModel is not a DeepSeek-OCR model"):
        gundam.patch(other)


def test_host_that_is_not_deepencoder_shaped():
    model = VllmDeepseekOCRForCausalLM()
    model.projector.extra = nn.Linear(2, 2)                     # a parameter DeepEncoder does not have
    with pytest.raises(ValueError, match=r"unexpected \['projector.extra.bias'"):
        gundam.patch(model)


# ---------------------------------------------------------------------------------------------------------
# the real host classes, where installed

@pytest.mark.parametrize("module,cls,extra", [
    ("vllm.model_executor.models.deepseek_ocr", "DeepseekOCRForCausalLM", []),
    ("sglang.srt.models.deepseek_ocr", "DeepseekOCRForCausalLM", ["has_local_crops"]),
    ("sglang.srt.models.unlimited_ocr", "UnlimitedOCRForCausalLM", ["has_local_crops"]),
])
def test_real_host_class_has_what_the_patch_replaces(module, cls, extra):
    """(tests/test_real_sglang.py and tests/test_real_vllm.py check much more, where those hosts are installed.)"""
    cls = getattr(pytest.importorskip(module), cls)
    for name in ["_pixel_values_to_embedding", "_process_image_input"]:
        assert callable(getattr(cls, name, None)), name
    params = list(inspect.signature(cls._pixel_values_to_embedding).parameters)
    assert params[1:] == ["pixel_values", "images_crop", "images_spatial_crop", *extra]
