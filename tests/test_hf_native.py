"""`gundam.patch` on transformers' native DeepseekOcr2ForConditionalGeneration and
UnlimitedOcrForConditionalGeneration: the real classes (transformers >= 5.23), built from tiny random configs of
their real structure (SAM with window and global blocks, GQA Qwen2 / CLIP, a MoE language model), on CPU in fp32.

Each host runs one call with three images of different crop counts (one without crops): get_image_features,
the forward's logits and a few greedy tokens of generate, patched against unpatched.
"""
import copy
import pickle

import pytest
import torch

import gundam
from gundam.hosts import patched_encoder
from testutils import assert_close, page

transformers = pytest.importorskip("transformers", reason="transformers not installed (CI installs 5.23.0)")
if not hasattr(transformers, "DeepseekOcr2ForConditionalGeneration") or \
        not hasattr(transformers, "UnlimitedOcrForConditionalGeneration"):
    pytest.skip(f"transformers {transformers.__version__} has no DeepseekOcr2 / UnlimitedOcr classes (5.23.0 has)",
                allow_module_level=True)

VOCAB, IMAGE_TOKEN = 96, 95
SAM = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=256,
           window_size=14, global_attn_indexes=[1], mlp_dim=64)   # pos_embed and rel-pos resized for every view
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            n_shared_experts=1, mlp_layer_types=["dense", "sparse"], bos_token_id=0, eos_token_id=1,
            pad_token_id=2)


def randomized(model, seed):
    """Every floating parameter random (the init leaves pos_embed, rel-pos at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if p.dim() == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and p.dim() == 1 else 0.0))
    return model.eval()


def ocr2_model(seed=0):
    config = transformers.DeepseekOcr2Config(
        vision_config=dict(
            sam_config=dict(SAM, downsample_channels=[32, 48]),
            encoder_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
        text_config=TEXT, image_token_id=IMAGE_TOKEN)
    return randomized(transformers.DeepseekOcr2ForConditionalGeneration(config), seed)


def unlimited_model(seed=0, **sam):
    config = transformers.UnlimitedOcrConfig(
        vision_config=dict(
            sam_config=dict(SAM, downsample_channels=[32, 48], **sam),
            encoder_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                image_size=224, patch_size=14)),   # a 16x16 position grid: resized for crops
        text_config=dict(TEXT, sliding_window=128), image_token_id=IMAGE_TOKEN)
    return randomized(transformers.UnlimitedOcrForConditionalGeneration(config), seed)


def ocr2_inputs():
    """The real processor (PIL backend): 2x1 crops, none, 3x1 crops of 768 px, 1024 px global views."""
    proc = transformers.DeepseekOcr2ImageProcessorPil()
    images = [page(1536, 768, seed=1), page(500, 300, seed=2), page(2304, 700, seed=3)]
    inputs = dict(proc(images, return_tensors="pt"))
    assert inputs["num_local_patches"].tolist() == [2, 0, 3]
    tokens = [256 + 144 * k + 1 for k in inputs["num_local_patches"].tolist()]
    return inputs, tokens


def unlimited_inputs():
    """What Unlimited-OCR's processor gives (its torchvision backend is not installed here): 1024 px global
    views, 640 px crops flattened across images, grids (columns, rows) 2x1, none, 2x2."""
    g = torch.Generator().manual_seed(4)
    grids, counts = [[2, 1], [1, 1], [2, 2]], [2, 0, 4]
    inputs = dict(pixel_values=torch.rand(3, 3, 1024, 1024, generator=g) * 2 - 1,
                  pixel_values_local=torch.rand(6, 3, 640, 640, generator=g) * 2 - 1,
                  num_local_patches=counts, patches_grid=grids)
    tokens = [16 * 17 + (h * 10 * (w * 10 + 1) if k else 0) + 1 for (w, h), k in zip(grids, counts)]
    return inputs, tokens


HOSTS = {"ocr2": (ocr2_model, ocr2_inputs), "unlimited": (unlimited_model, unlimited_inputs)}


def prompt(tokens):
    """One row: text, every image's tokens (in image order), text."""
    text = torch.randint(3, IMAGE_TOKEN, (8,), generator=torch.Generator().manual_seed(5))
    return torch.cat([text[:4], torch.full((sum(tokens),), IMAGE_TOKEN), text[4:]])[None]


def run(model, inputs, input_ids):
    """(get_image_features' pooler_output, which the forward returns as image_hidden_states; logits; 4 greedy
    tokens) of the host as it is now (patched or not)."""
    with torch.no_grad():
        out = model(input_ids=input_ids, **inputs)
        tokens = model.generate(input_ids=input_ids, **inputs, max_new_tokens=4, do_sample=False)
    return out.image_hidden_states, out.logits, tokens


class Counter:
    def __init__(self):
        self.calls = 0

    def __call__(self, *args):
        self.calls += 1


@pytest.fixture(scope="module", params=list(HOSTS))
def host(request):
    """A host model, its inputs and prompt, and what the unpatched host computes."""
    build, make_inputs = HOSTS[request.param]
    model = build()
    inputs, tokens = make_inputs()
    input_ids = prompt(tokens)
    tower = Counter()
    handle = model.model.vision_tower.register_forward_hook(tower)
    want = run(model, inputs, input_ids)
    handle.remove()
    assert tower.calls == 4                         # 2 calls, each global views and crops separately
    assert [len(t) for t in want[0]] == tokens
    return request.param, model, inputs, input_ids, want


def test_patched_equals_host(host):
    name, model, inputs, input_ids, want = host
    before = dict(model.model.__dict__)
    assert gundam.patch(model) is model
    enc = patched_encoder(model)
    assert enc.family == ("deepseek-ocr2" if name == "ocr2" else "deepseek-ocr")
    # the encoder's parameters are the host's own objects: nothing copied
    host_params = {id(p): p for p in model.parameters()}
    for pname, p in enc.named_parameters():
        assert id(p) in host_params and p.data_ptr() == host_params[id(p)].data_ptr(), pname
    # the vision tower's, the projector's weight and bias, view_separator (and image_newline)
    assert len(list(enc.parameters())) == len(list(model.model.vision_tower.parameters())) + 3 + (name == "unlimited")
    # every call goes through the encoder once (all images together), never through the host's vision tower
    passes, tower = Counter(), Counter()
    enc.register_forward_hook(passes)
    handle = model.model.vision_tower.register_forward_hook(tower)
    got = run(model, inputs, input_ids)
    handle.remove()
    assert (passes.calls, tower.calls) == (2, 0)
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"{name} pooler_output[{i}]")
    assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, what=f"{name} logits")
    assert torch.equal(got[2], want[2]), f"{name} generate: {got[2].tolist()} != {want[2].tolist()}"
    # patching twice only sets the backend (the image without crops, alone, on the torch path)
    gundam.patch(model, backend="torch")
    assert patched_encoder(model) is enc and enc.backend == "torch"
    alone = dict(pixel_values=inputs["pixel_values"][1:2])
    with torch.no_grad():
        (one,) = model.get_image_features(**alone).pooler_output
    assert_close(one, want[0][1], atol=1e-5, rtol=1e-5, what=f"{name} torch backend")
    # unpatch restores the host exactly: its own method, its vision tower again
    gundam.unpatch(model)
    assert dict(model.model.__dict__) == before and patched_encoder(model) is None
    handle = model.model.vision_tower.register_forward_hook(tower)
    with torch.no_grad():
        (one,) = model.get_image_features(**alone).pooler_output
    handle.remove()
    assert tower.calls == 1 and type(model.model).get_image_features.__qualname__.endswith("Model.get_image_features")
    assert_close(one, want[0][1], atol=1e-5, rtol=1e-5, what=f"{name} unpatched, alone")


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_encode_with_their_own_parameters(how):
    model = unlimited_model(seed=1)
    inputs = dict(pixel_values=torch.rand(1, 3, 512, 512) * 2 - 1)          # one image, a 512 px global view
    gundam.patch(model)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        twin.model.multi_modal_projector.bias.add_(1.0)           # the copy's weights only
        got = twin.get_image_features(**inputs).pooler_output
        mine = model.get_image_features(**inputs).pooler_output
    enc = patched_encoder(twin)
    assert enc is not patched_encoder(model) and enc.projector.layers.bias is twin.model.multi_modal_projector.bias
    gundam.unpatch(twin)
    with torch.no_grad():
        want = twin.get_image_features(**inputs).pooler_output
    for a, b, c in zip(got, want, mine):
        assert_close(a, b, atol=1e-5, rtol=1e-5, what=f"{how} copy")
        assert not torch.allclose(a, c)
    assert "get_image_features" not in twin.model.__dict__ and patched_encoder(model) is not None


def test_gradients_reach_the_host_parameters():
    """The host records autograd in get_image_features (the vendor's remote code does not): so does the patch,
    into the same parameters."""
    model = unlimited_model(seed=2).train()
    inputs = dict(pixel_values=torch.rand(1, 3, 512, 512) * 2 - 1)          # one image, a 512 px global view
    watched = {"q_proj": model.model.vision_tower.vision_encoder.encoder.layers[0].self_attn.q_proj.weight,
               "pos_embed": model.model.vision_tower.sam_encoder.pos_embed,
               "image_newline": model.model.image_newline}

    def grads():
        model.zero_grad()
        (out,) = model.get_image_features(**inputs).pooler_output
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return {k: p.grad.clone() for k, p in watched.items()}

    want = grads()
    gundam.patch(model)
    got = grads()
    for k in watched:   # fp32, sums in another order: relative to the gradient's largest magnitude
        assert_close(got[k], want[k], atol=1e-5 * want[k].abs().max().item(), rtol=0, what=f"grad of {k}")


def test_what_the_encoder_cannot_reproduce_is_refused():
    model = ocr2_model(seed=3)
    gundam.patch(model)
    g = torch.Generator().manual_seed(6)
    one = dict(pixel_values=torch.rand(1, 3, 1024, 1024, generator=g), pixel_values_local=torch.rand(1, 3, 768, 768),
               num_local_patches=[1])
    with pytest.raises(ValueError, match="image 0 has a single local patch"):
        model.get_image_features(**one)
    with pytest.raises(ValueError, match="global views of 768 px"):
        model.get_image_features(pixel_values=torch.rand(1, 3, 768, 768), num_local_patches=[0])
    with pytest.raises(ValueError, match=r"get_image_features\(output_hidden_states=True\)"):
        model.get_image_features(pixel_values=one["pixel_values"], output_hidden_states=True)
    for call in (model.get_image_features, model.model.get_image_features):   # the outer one makes the tuple
        with pytest.raises(ValueError, match=r"get_image_features\(return_dict=False\)"):
            call(pixel_values=one["pixel_values"], return_dict=False)
    with pytest.raises(ValueError, match=r"num_local_patches=\[2\] for 1 images and 1 local patches"):
        model.get_image_features(**dict(one, num_local_patches=[2]))
    rope = model.model.vision_tower.vision_encoder.rotary_emb
    rope.inv_freq = rope.inv_freq.to(torch.bfloat16)           # what model.to(torch.bfloat16) does to it
    with pytest.raises(ValueError, match="inv_freq is torch.bfloat16"):
        model.get_image_features(pixel_values=one["pixel_values"])
    gundam.unpatch(model)
    # Unlimited-OCR: a 1x1 grid of one crop; a SAM eps the neck does not use
    model = unlimited_model(seed=4)
    gundam.patch(model)
    glob = torch.rand(1, 3, 1024, 1024)
    with pytest.raises(ValueError, match="image 0 has a single local patch"):
        model.get_image_features(pixel_values=glob, pixel_values_local=torch.rand(1, 3, 640, 640),
                                 num_local_patches=[1], patches_grid=[[1, 1]])
    with pytest.raises(ValueError, match="2 local patches for patches_grid 1x1"):
        model.get_image_features(pixel_values=glob, pixel_values_local=torch.rand(2, 3, 640, 640),
                                 num_local_patches=[2], patches_grid=[[1, 1]])
    with pytest.raises(ValueError, match=r"layer_norm_eps=1e-05 while the neck's LayerNorms use 1e-06"):
        gundam.patch(unlimited_model(seed=5, layer_norm_eps=1e-5))
