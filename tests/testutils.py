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
from benchutil import (MICRO, OCR2_TINY, OCR2_TINY_MODE, SMALL, SMALL_MODE, TINY, TINY_MODE, TRAIN,  # noqa: E402,F401
                       TRAIN_MODE)

# (dtype, atol, rtol) rows for kernel-vs-reference tests on CPU (the interpreter has no bf16 arithmetic).
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-2, 1e-2)]

# The `attention` fixture (conftest.py) with its kernel case only under `-m slow`, for tests whose subject is
# not the attention backward (the kernel trains in the default suite in tests/test_train_triton.py).
ATTENTION_KERNEL_SLOW = pytest.mark.parametrize(
    "attention", [pytest.param("kernel", marks=pytest.mark.slow), "torch-reference"], indirect=True)

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
