"""Training through the packed Triton path (Triton's interpreter on CPU): its parameter gradients are the torch
path's, with and without activation checkpointing, and they come from the kernels' backward passes.

The training tests run twice (the `attention` fixture, conftest.py): with the real attention kernel ("kernel")
and with `attention_reference` standing in for it ("torch-reference": autograd through torch ops). The second
checks the rest of training (the packed pass, LayerNorm and layout backward, checkpointing) independently of
the attention backward.
"""
import pytest
import torch

from gundam import GundamEncoder, preprocess
from testutils import (ATTENTION_KERNEL_SLOW, OCR2_TRAIN, OCR2_TRAIN_MODE, TRAIN as CFG, TRAIN_MODE as MODE, assert_close,
                       log_launches, page, randomize, train_images as images)



# (dtype, tolerance relative to each gradient's largest magnitude): fp64 leaves only rounding; fp32 differs by
# the order of the summations (measured ~2e-6 worst)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-4}
OUTPUT_TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5}   # the same, for the embeddings


@pytest.fixture(scope="module")
def weights():
    return randomize(GundamEncoder(CFG), seed=3).state_dict()


def log_all_launches(monkeypatch, log):
    from gundam.kernels import activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu
    log_launches(monkeypatch, log, (activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu))


def graph_nodes(t: torch.Tensor) -> list[str]:
    """Names of every autograd node t depends on."""
    seen, todo, names = set(), [t.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        todo += [n for n, _ in node.next_functions]
    return names


def gradients(weights, batch, backend, dtype, checkpointing=False, on_output=None, config=CFG):
    """{name: gradient} of a fixed random projection of the embeddings, and the embeddings."""
    enc = GundamEncoder(config)
    enc.load_state_dict(weights)
    enc = enc.to(dtype)
    if checkpointing:
        enc.gradient_checkpointing_enable()
    out = enc(batch, backend=backend).embeddings
    if on_output:
        on_output(out)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(dtype)
    (out * w).sum().backward()
    return {n: p.grad for n, p in enc.named_parameters()}, out.detach()


def compare(got, want, tol):
    """Every parameter's gradient, relative to its largest magnitude; prints the worst."""
    missing = [n for n, g in got.items() if g is None]
    assert not missing, f"no gradient for {missing}"
    errs = sorted(((got[n].double() - g.double()).abs().max().item() / g.double().abs().max().item(), n)
                  for n, g in want.items())
    print(f"worst relative gradient errors: {errs[-3:]}")
    for n, g in want.items():
        assert_close(got[n], g, tol * g.abs().max().item(), 0, n)


def check_training(weights, attention, monkeypatch, n_images, dtype):
    batch = preprocess(images(n_images), MODE)
    want, ref = gradients(weights, batch, "torch", dtype)
    launches, nodes = [], []
    log_all_launches(monkeypatch, launches)
    got, out = gradients(weights, batch, "triton", dtype,
                         on_output=lambda out: (nodes.extend(graph_nodes(out)), launches.append(("backward", None))))
    assert_close(out, ref, OUTPUT_TOLERANCE[dtype] * ref.abs().max().item(), 0, "embeddings")
    compare(got, want, TOLERANCE[dtype])

    # through the kernels, not a torch fallback: LayerNorm and layout backward ran as Triton launches; with the
    # kernel, attention's backward too, and no torch attention is in the graph
    sam, clip = CFG.sam.depth, CFG.clip.num_layers
    assert nodes.count("LayerNormFunctionBackward") == 2 * sam + 1 + 2 * clip, nodes
    assert nodes.count("ProjectLayoutFunctionBackward") == 1
    names = [name for name, _ in launches]
    backward = names[names.index("backward") + 1:]
    assert backward.count("_layer_norm_bwd_kernel") == 2 * sam + 1 + 2 * clip, backward
    if attention == "kernel":
        assert nodes.count("AttentionFunctionBackward") == sam + clip, nodes
        assert not [n for n in nodes if "Softmax" in n or "ScaledDotProduct" in n], nodes
        assert {"_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel", "_relpos_bwd_kernel"} <= set(backward)


@pytest.mark.parametrize("dtype", [torch.float64])
def test_gradients_equal_the_torch_path(weights, attention, monkeypatch, dtype):
    check_training(weights, attention, monkeypatch, 2, dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gradients_equal_the_torch_path_three_grids(weights, attention, monkeypatch, dtype):
    check_training(weights, attention, monkeypatch, 3, dtype)


@ATTENTION_KERNEL_SLOW
def test_checkpointing_gives_the_same_gradients(weights, attention, monkeypatch):
    # the packed path with checkpointing against the torch path without (which the test above equals to the
    # packed path without); the blocks really are recomputed: every block's LayerNorms launch twice
    batch = preprocess(images(2), MODE)
    want, _ = gradients(weights, batch, "torch", torch.float64)
    launches = []
    log_all_launches(monkeypatch, launches)
    got, _ = gradients(weights, batch, "triton", torch.float64, checkpointing=True)
    compare(got, want, TOLERANCE[torch.float64])
    blocks = 2 * (CFG.sam.depth + CFG.clip.num_layers)
    assert [name for name, _ in launches].count("_layer_norm_kernel") == 2 * blocks + 1, launches   # + CLIP's pre-LayerNorm, once


def test_inference_stays_in_place(weights, monkeypatch):
    # without autograd the MLP activations run in place: no copy of the [T, 4C] hidden state
    from gundam.kernels import activation
    calls, real = [], activation.quick_gelu_
    monkeypatch.setattr(activation, "quick_gelu_", lambda x, **kw: calls.append(tuple(x.shape)) or real(x, **kw))
    enc = GundamEncoder(CFG)
    enc.load_state_dict(weights)
    batch = preprocess(images(1), MODE)
    with torch.no_grad():
        got = enc(batch, backend="triton").embeddings
        want = enc(batch, backend="torch").embeddings
    assert calls == [(sum(1 + q * q for q in [2, 1, 1]), CFG.clip.ffn_hidden_size)] * CFG.clip.num_layers, calls
    assert_close(got, want, 1e-5 * want.abs().max().item(), 0, "embeddings")


@pytest.mark.parametrize("checkpointing", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_ocr2_gradients_equal_the_torch_path(monkeypatch, checkpointing):
    # DeepSeek-OCR 2: SAM, the Qwen2 layers (RMSNorm, prefix attention, SiLU-and-multiply) and the projector
    # + layout, every gradient from the kernels' backward passes; a 1x2 image and one without crops
    weights = randomize(GundamEncoder(OCR2_TRAIN), seed=6).state_dict()
    batch = preprocess([page(810, 1700, 33), page(500, 333, 32)], OCR2_TRAIN_MODE)
    assert batch.grids == [(1, 2), (1, 1)]
    want, ref = gradients(weights, batch, "torch", torch.float64, config=OCR2_TRAIN)
    launches, nodes = [], []
    log_all_launches(monkeypatch, launches)
    got, out = gradients(weights, batch, "triton", torch.float64, checkpointing, config=OCR2_TRAIN,
                         on_output=lambda out: (nodes.extend(graph_nodes(out)), launches.append(("backward", None))))
    assert_close(out, ref, OUTPUT_TOLERANCE[torch.float64] * ref.abs().max().item(), 0, "embeddings")
    compare(got, want, TOLERANCE[torch.float64])

    sam, layers = OCR2_TRAIN.sam.depth, OCR2_TRAIN.qwen2.num_hidden_layers
    names = [name for name, _ in launches]
    backward = names[names.index("backward") + 1:]
    assert backward.count("_rms_norm_bwd_kernel") == 2 * layers + 1, backward
    assert backward.count("_silu_mul_bwd_kernel") == layers, backward
    assert {"_prefix_attention_bwd_dq_kernel", "_prefix_attention_bwd_dkdv_kernel"} <= set(backward)
    if checkpointing:   # every layer's forward ran twice: in the forward and again in the backward
        assert names.count("_rms_norm_kernel") == 2 * 2 * layers + 1, names
        assert names.count("_prefix_attention_kernel") == 2 * layers, names
    else:
        assert nodes.count("RMSNormFunctionBackward") == 2 * layers + 1, nodes
        assert nodes.count("PrefixAttentionFunctionBackward") == layers, nodes
        assert nodes.count("SiluMulFunctionBackward") == layers, nodes
        assert nodes.count("AttentionFunctionBackward") == sam, nodes
        assert nodes.count("ProjectLayoutFunctionBackward") == 1, nodes
        assert not [n for n in nodes if "Softmax" in n or "ScaledDotProduct" in n], nodes
