"""The packed Triton path (Triton's interpreter on CPU) against the torch path."""
import pytest
import torch
from torch.overrides import TorchFunctionMode

from gundam import ClipConfig, EncoderConfig, GundamEncoder, Mode, SamConfig, preprocess
from testutils import page, randomize

# Smaller than TINY so the interpreter stays quick: global views 192 px (grid 12, pos/rel tables resized),
# crops 128 px (grid 8); windows of 5 need padding on both; CLIP keeps its real 1024 width.
SMALL = EncoderConfig(
    sam=SamConfig(img_size=128, embed_dim=32, depth=2, num_heads=2, window_size=5, global_attn_indexes=(1,)),
    clip=ClipConfig(num_layers=1, num_attention_heads=16, ffn_hidden_size=64, image_size=28, patch_size=14),
)
MODE = Mode(192, 128, True)


@pytest.fixture(scope="module")
def encoder():
    return randomize(GundamEncoder(SMALL), seed=7).eval()


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 3e-2)])
def test_triton_equals_torch(encoder, dtype, atol):
    # no crops, 2x1, 1x3, 3x2
    batch = preprocess([page(400, 300, 0), page(1300, 650, 1), page(700, 2100, 2), page(1950, 1300, 3)], MODE)
    assert batch.grids == [(1, 1), (2, 1), (1, 3), (3, 2)]
    enc = GundamEncoder(SMALL).eval()
    enc.load_state_dict(encoder.state_dict())
    enc = enc.to(dtype)
    with torch.no_grad():
        ref = encoder(batch, backend="torch")          # fp32 oracle
        got = enc(batch, backend="triton")
    assert torch.equal(got.offsets, ref.offsets)
    assert got.embeddings.dtype == dtype
    err = (got.embeddings.double() - ref.embeddings.double()).abs()
    scale = ref.embeddings.abs().max().item()
    assert err.max() <= atol * scale, f"max {err.max():.3g} mean {err.mean():.3g} (scale {scale:.3g})"
    # newline and separator rows are copied, not computed: exact
    for out, lay in zip(got.split(), batch.layouts):
        assert torch.equal(out[-1], enc.view_seperator)
        qb = 3
        assert torch.equal(out[-2], enc.image_newline) and torch.equal(out[-2 - (qb + 1)], enc.image_newline)


class CountOps(TorchFunctionMode):
    """Records every torch function and tensor method the forward calls."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.ops.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


class CountLaunches:
    """Stands in for a @triton.jit kernel: records `kernel[grid](...)` launches without running them."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append(self.name)


def count(encoder, batch, monkeypatch):
    from gundam.kernels import attention, layernorm, layout
    log = []
    for mod in (attention, layernorm, layout):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, CountLaunches(name, log))
    with torch.no_grad(), CountOps() as ops:
        encoder(batch, backend="triton")
    monkeypatch.undo()
    return log, ops.ops


def test_launch_count_independent_of_images_and_crops(encoder, monkeypatch):
    one = preprocess([page(1300, 650, 0)], MODE)
    four = preprocess([page(1950, 1300, 1), page(700, 2100, 2), page(1000, 1000, 3), page(1300, 650, 4)], MODE)
    assert one.grids == [(2, 1)] and four.grids == [(3, 2), (1, 3), (2, 2), (2, 1)]
    for batch in (one, four):  # warm the per-size table caches: the counts below are of steady state
        count(encoder, batch, monkeypatch)
    launches_1, ops_1 = count(encoder, one, monkeypatch)
    launches_4, ops_4 = count(encoder, four, monkeypatch)
    assert len(launches_1) > 0 and "_attention_kernel" in launches_1
    assert launches_1 == launches_4, (launches_1, launches_4)
    assert ops_1 == ops_4, f"torch ops: {len(ops_1)} for 1 image, {len(ops_4)} for 4"


def test_triton_on_cpu_needs_interpreter(encoder, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        encoder(preprocess([page(300, 300, 0)], MODE), backend="triton")


@pytest.mark.slow
def test_triton_real_config_tiny_views():
    """The real encoder's structure (12 heads of 64, 12 SAM blocks, 24 CLIP layers, 2048 -> 1280 projector) on
    tiny views: ~3 minutes in the interpreter, so opt-in (`pytest -m slow`)."""
    enc = randomize(GundamEncoder(EncoderConfig()), seed=3).eval()
    batch = preprocess([page(1300, 650, 5), page(300, 200, 6)], MODE)
    with torch.no_grad():
        ref = enc(batch, backend="torch")
        got = enc(batch, backend="triton")
    err = (got.embeddings - ref.embeddings).abs()
    scale = ref.embeddings.abs().max().item()
    assert err.max() <= 1e-5 * scale, f"max {err.max():.3g} mean {err.mean():.3g} (scale {scale:.3g})"


def test_triton_refuses_autograd(encoder):
    enc = GundamEncoder(SMALL)   # parameters require grad, as after construction
    with pytest.raises(RuntimeError, match="inference-only"):
        enc(preprocess([page(300, 300, 0)], MODE), backend="triton")
