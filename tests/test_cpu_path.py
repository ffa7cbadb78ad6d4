"""The CPU fast path (backend "cpu", what "auto" runs off CUDA) against the torch reference path: both families,
several images with different crop grids in one batch, windows that need padding; fp64 (a different computation
of the same math: it must agree to rounding), fp32 to 1e-4 of the fp64 reference, bf16 no worse than the
reference path in bf16."""
import pytest
import torch

import gundam.model
from gundam import EncoderConfig, GundamEncoder, preprocess
from gundam.encoder import resolve_backend
from testutils import OCR2_TINY, OCR2_TINY_MODE, TINY, TINY_MODE, assert_close, page, randomize

FAMILIES = {"ocr": (TINY, TINY_MODE), "ocr2": (OCR2_TINY, OCR2_TINY_MODE)}


def pages(mode, seed):
    # grids 2x1, none (1x1), 1x3 and 3x2 in one batch; sizes that are not multiples of anything
    sizes = [(1300, 650), (500, 300), (700, 2100), (1950, 1300)]
    return preprocess([page(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)], mode)


def encoders(family, seed):
    cfg, mode = FAMILIES[family]
    enc = randomize(GundamEncoder(cfg), seed=seed).eval()
    return enc, pages(mode, seed)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("steps", ["whole", "small"])
def test_fast_path_equals_the_reference_in_fp64_and_fp32(family, steps, monkeypatch):
    if steps == "small":   # views a few at a time, attention scores a few query rows of one head at a time
        monkeypatch.setattr(gundam.model, "CPU_VIEW_TOKENS", 300)
        monkeypatch.setattr(gundam.model, "CPU_SCORE_ELEMENTS", 1000)
    enc, batch = encoders(family, seed=3)
    assert len({g for g in batch.grids}) == 4
    enc = enc.double()
    with torch.inference_mode():
        want = enc(batch, backend="torch").embeddings
        got = enc(batch, backend="cpu").embeddings
        scale = want.abs().max().item()
        assert_close(got, want, atol=1e-10 * scale, rtol=0, what=f"{family} fp64")
        enc = enc.float()
        got32 = enc(batch, backend="cpu").embeddings
    assert got32.dtype == torch.float32
    assert_close(got32, want, atol=1e-4 * scale, rtol=0, what=f"{family} fp32 vs fp64")


@pytest.mark.parametrize("family", FAMILIES)
def test_fast_path_in_bf16_is_no_worse_than_the_reference_path(family):
    enc, batch = encoders(family, seed=5)
    with torch.inference_mode():
        want = enc.double()(batch, backend="torch").embeddings
        enc = enc.bfloat16()
        ref_err = (enc(batch, backend="torch").embeddings.double() - want).abs()
        err = (enc(batch, backend="cpu").embeddings.double() - want).abs()
    msg = f"bf16 fast path: max {err.max():.3e} mean {err.mean():.3e}; reference path {ref_err.max():.3e} " \
          f"{ref_err.mean():.3e}"
    assert err.mean() <= 1.5 * ref_err.mean() and err.max() <= 2 * ref_err.max(), msg
    assert err.mean() <= 0.02 * want.abs().mean(), msg


def test_fast_path_leaves_inputs_and_weights_alone():
    enc, batch = encoders("ocr", seed=9)
    pixels = [t.clone() for t in (batch.global_views, batch.crops)]
    weights = {k: v.clone() for k, v in enc.state_dict().items()}
    with torch.inference_mode():
        first = enc(batch, backend="cpu").embeddings
        second = enc(batch, backend="cpu").embeddings
    assert torch.equal(first, second)
    assert torch.equal(batch.global_views, pixels[0]) and torch.equal(batch.crops, pixels[1])
    assert all(torch.equal(v, weights[k]) for k, v in enc.state_dict().items())


def test_while_autograd_records_the_cpu_backend_is_the_torch_path():
    # no backward formula for oneDNN's inner product: training runs the reference path, gradients included
    enc, batch = encoders("ocr", seed=11)
    grads = {}
    for backend in ("torch", "cpu"):
        enc.zero_grad()
        out = enc(batch, backend=backend).embeddings
        (out.square().mean()).backward()
        grads[backend] = {k: p.grad.clone() for k, p in enc.named_parameters() if p.grad is not None}
    assert grads["torch"].keys() == grads["cpu"].keys() and len(grads["torch"]) > 10
    assert all(torch.equal(grads["torch"][k], grads["cpu"][k]) for k in grads["torch"])


def test_auto_is_the_fast_path_on_a_cpu():
    assert resolve_backend("auto", "cpu") == "cpu"
    assert resolve_backend("cpu", "cpu") == "cpu"
    with pytest.raises(ValueError, match="backend='fast'"):
        resolve_backend("fast", "cpu")


def test_fast_path_at_the_real_widths():
    # the real encoder's widths, windows (14, padded on the 40x40 crop grid and the 64x64 global one), heads and
    # CLIP's 24 layers, on one 2x1 page: fp32 against the reference within 1e-4 of the output's scale
    enc = GundamEncoder(EncoderConfig.deepseek_ocr()).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    batch = preprocess(page(1280, 640, seed=1), "gundam")
    assert batch.grids == [(2, 1)]
    with torch.inference_mode():
        want = enc(batch, backend="torch").embeddings
        got = enc(batch, backend="cpu").embeddings
    assert_close(got, want, atol=1e-4 * want.abs().max().item(), rtol=0, what="real widths, fp32")
