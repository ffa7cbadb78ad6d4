"""Shared by the tests: tiny encoder configs (bench/benchutil.py holds them, for the benchmarks' smoke runs
too), random weights and pages, and close-enough assertions."""
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from benchutil import (MICRO, OCR2_TINY, OCR2_TINY_MODE, OCR2_TRAIN, OCR2_TRAIN_MODE, SMALL, SMALL_MODE,  # noqa: E402,F401
                       TINY, TINY_MODE, TRAIN, TRAIN_MODE)
# for the opt-in tests that import the vendor's own code (tests/test_real_hosts.py, tests/test_ocr2_vendor.py)
from vendor_model import Float32ForBfloat16, empty_module  # noqa: E402,F401

# (dtype, atol, rtol) rows for kernel-vs-reference tests on CPU (the interpreter has no bf16 arithmetic).
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-2, 1e-2)]

# The `attention` fixture (conftest.py) with its kernel case only under `-m slow`, for tests whose subject is
# not the attention backward (the kernel trains in the default suite in tests/test_train_triton.py).
ATTENTION_KERNEL_SLOW = pytest.mark.parametrize(
    "attention", [pytest.param("kernel", marks=pytest.mark.slow), "torch-reference"], indirect=True)

class Counter:
    """Counts its calls, passing them on to fn (when given): how often a host ran something."""

    def __init__(self, fn=None):
        self.calls, self.fn = 0, fn

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs) if self.fn is not None else None


def hf_checkpoint(model, seed, language_model):
    """Random weights for a vLLM or SGLang DeepSeek-OCR model under the checkpoint's (Hugging Face) names, which
    the host's load_weights maps onto its own: the encoder's under `model.`; the language model's (the host's
    `<language_model>model.*`, the prefix being SGLang's `model.` or vLLM's `language_model.`) as `model.*`, its
    fused qkv_proj / gate_up_proj split into q/k/v and gate/up; its lm_head as `lm_head`."""
    g = torch.Generator().manual_seed(seed)
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    out = {}
    for name, p in model.named_parameters():
        scale = 0.5 if p.dim() == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
        value = torch.randn(p.shape, generator=g) * scale + (1.0 if "norm" in name and p.dim() == 1 else 0.0)
        if name == language_model + "lm_head.weight":
            out["lm_head.weight"] = value
        elif name.startswith(language_model + "model."):
            hf = "model." + name[len(language_model + "model."):]
            if ".qkv_proj." in hf:
                sizes = [text.num_attention_heads * head_dim] + [text.num_key_value_heads * head_dim] * 2
                for part, v in zip("qkv", value.split(sizes)):
                    out[hf.replace(".qkv_proj.", f".{part}_proj.")] = v
            elif ".gate_up_proj." in hf:
                for part, v in zip(("gate", "up"), value.chunk(2)):
                    out[hf.replace(".gate_up_proj.", f".{part}_proj.")] = v
            else:
                out[hf] = value
        else:
            out["model." + name] = value
    return out


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the vendor init leaves pos_embed and rel-pos at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if p.dim() == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
    return module


def page(w: int, h: int, seed: int, cell: int = 16) -> Image.Image:
    """A random w x h RGB image with structure at `cell` px (smooth enough that resizing matters)."""
    g = torch.Generator().manual_seed(seed)
    arr = (torch.rand(max(1, h // cell), max(1, w // cell), 3, generator=g) * 255).to(torch.uint8).numpy()
    return Image.fromarray(arr).resize((w, h))


def assert_close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float, what: str = ""):
    """allclose in float64, with the max and mean absolute error in the failure message."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    assert torch.allclose(got, want, atol=atol, rtol=rtol), \
        f"{what}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}"


class LoggedKernel:
    """Stands in for a @triton.jit kernel: logs each launch as (kernel name, grid), then runs it."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getitem__(self, grid):
        self.log.append((self.kernel.__name__, grid))
        return self.kernel[grid]


def log_launches(monkeypatch, log, modules, names=None):
    """Every `_*_kernel` of the kernel modules (or only those in `names`) logs its launches into `log`."""
    for mod in modules:
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel") and (names is None or name in names):
                monkeypatch.setattr(mod, name, LoggedKernel(getattr(mod, name), log))


def train_images(n):
    """For TRAIN_MODE: a 1x2 image and one without crops (n=2); and a 2x2 one (n=3)."""
    return [page(650, 1300, 0), page(400, 300, 1), page(1000, 1000, 2)][:n]


# DeepSeek-OCR 2's crop grids and images: the default suite's independent checks and the opt-in vendor test share
# them. Every crop grid the vendor allows (2..6 tiles), enumerated here, not taken from gundam.layout.
GRIDS = [(i, j) for i in range(1, 7) for j in range(1, 7) if 2 <= i * j <= 6]
EDGE_SIZES = [(768, 768), (769, 768), (768, 769), (769, 769), (1, 1), (1, 768), (768, 1), (1, 769), (769, 1),
              (1, 5000), (5000, 1), (1536, 768), (768, 1536), (1000, 800), (800, 1600), (2480, 3508),
              (1500, 1800), (1250, 1000), (2500, 2000), (10**6, 3), (3, 10**6), (4607, 768), (12345, 6789)]


def midpoint_sizes():
    """Sizes whose aspect ratio lies exactly halfway between two neighbouring grid ratios, at many scales
    (so the area rule goes both ways)."""
    ratios = sorted({Fraction(i, j) for i, j in GRIDS})
    sizes = []
    for a, b in zip(ratios, ratios[1:]):
        mid = (a + b) / 2
        for k in range(1, 400):
            w, h = mid.numerator * k, mid.denominator * k
            if max(w, h) > 768 and w * h < 40_000_000:
                sizes.append((w, h))
    return sizes


def in_mode(img: Image.Image, pil_mode: str, seed: int) -> Image.Image:
    """The RGB test page in another PIL mode (16-bit grey spans the whole 0..65535 range)."""
    if pil_mode == "I;16":
        rng = np.random.default_rng(seed)
        grey = np.asarray(img.convert("L"), dtype=np.uint16) * 257 + rng.integers(0, 257, img.size[::-1])
        out = Image.fromarray(grey.astype(np.uint16))
        assert out.mode == "I;16"
        return out
    if pil_mode == "RGBA":
        out = img.copy()
        out.putalpha(Image.fromarray(np.random.default_rng(seed).integers(0, 256, img.size[::-1], dtype=np.uint8)))
        return out
    return img.convert(pil_mode)


def attention_inputs(views, heads, head_dim, seed, *, dtype=torch.float32, rel_scale=0.15, window=None,
                     class_token=False, rel=True, bias=True, tokens=None):
    """Random packed attention inputs for `views` [(offset, H, W)]: (segments, [qkv, rel_pos_h, rel_pos_w,
    qkv_bias], dout). Drawn in fp32 (fp64 for fp64) and cast to dtype; rel-pos tables scaled by rel_scale; rel /
    bias False give None tables / bias; tokens: the buffer's length (default: the last group's end)."""
    from gundam.kernels.segments import build_segments, pack_rel_pos
    g = torch.Generator().manual_seed(seed)
    draw = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=draw)

    seg = build_segments(views, window, class_token=class_token)
    T = tokens if tokens is not None else seg.end_token
    qkv = randn(T, 3, heads, head_dim).to(dtype)
    rh = rw = None
    if rel:
        rh = pack_rel_pos([(randn(2 * s - 1, head_dim) * rel_scale).to(dtype) for s in seg.rel_sizes_h],
                          seg.rel_sizes_h)
        rw = pack_rel_pos([(randn(2 * s - 1, head_dim) * rel_scale).to(dtype) for s in seg.rel_sizes_w],
                          seg.rel_sizes_w)
    qkv_bias = (randn(3 * heads * head_dim) * 0.5).to(dtype) if bias else None
    dout = randn(T, heads * head_dim).to(dtype)
    return seg, [qkv, rh, rw, qkv_bias], dout


def vendor_block_attention(x, w_qkv, b_qkv, rel_pos_h, rel_pos_w, heads, window):
    """SAM's attention the vendor's way (float64): pad + partition windows, qkv linear on the padded grid,
    decomposed rel-pos with the full bias materialised, softmax, unpartition, crop. x: [B, H, W, C]."""
    B, H, W, C = x.shape
    hd = C // heads
    if window:
        ph, pw = -H % window, -W % window
        x = torch.nn.functional.pad(x, (0, 0, 0, pw, 0, ph))
        Hp, Wp = H + ph, W + pw
        x = x.view(B, Hp // window, window, Wp // window, window, C).permute(0, 1, 3, 2, 4, 5)
        x = x.reshape(-1, window, window, C)                                   # [B * nw, S, S, C]
    Bw, S1, S2, _ = x.shape
    N = S1 * S2
    qkv = (x.reshape(Bw, N, C) @ w_qkv.T + b_qkv).reshape(Bw, N, 3, heads, hd).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                    # [Bw, heads, N, hd]
    Rh = rel_pos_h[torch.arange(S1)[:, None] - torch.arange(S1)[None, :] + S1 - 1]   # [S1, S1, hd]
    Rw = rel_pos_w[torch.arange(S2)[:, None] - torch.arange(S2)[None, :] + S2 - 1]
    r_q = q.reshape(Bw, heads, S1, S2, hd)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw)
    bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(Bw, heads, N, N)
    o = torch.softmax(q @ k.transpose(-1, -2) * hd ** -0.5 + bias, dim=-1) @ v   # [Bw, heads, N, hd]
    o = o.transpose(1, 2).reshape(Bw, S1, S2, C)
    if window:
        o = o.view(B, Hp // window, Wp // window, window, window, C).permute(0, 1, 3, 2, 4, 5)
        o = o.reshape(B, Hp, Wp, C)[:, :H, :W]
    return o
