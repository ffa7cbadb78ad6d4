"""The packed Triton path (Triton's interpreter on CPU) against the torch path, for both encoder families."""
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from gundam import EncoderConfig, GundamEncoder, preprocess
from testutils import (OCR2_TINY, OCR2_TINY_MODE, OCR2_TRAIN, OCR2_TRAIN_MODE, SMALL, SMALL_MODE as MODE, assert_close,
                       page, randomize)



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


@pytest.fixture(scope="module")
def ocr2_weights():
    return randomize(GundamEncoder(OCR2_TINY), seed=9).state_dict()


def ocr2_encoder(weights, dtype=torch.float32, config=OCR2_TINY):
    enc = GundamEncoder(config)
    enc.load_state_dict(weights)
    return enc.to(dtype).eval()


def ocr2_pages():
    """3x2 crops, none, 1x2 (OCR2_TINY_MODE crops images above 768 px)."""
    return preprocess([page(1000, 700, 31), page(500, 333, 32), page(810, 1700, 33)], OCR2_TINY_MODE)


def check_ocr2(weights, batch, dtype, tol, config=OCR2_TINY):
    with torch.no_grad():
        ref = ocr2_encoder(weights, torch.float64, config)(batch, backend="torch")      # fp64 oracle
        enc = ocr2_encoder(weights, dtype, config)
        got = enc(batch, backend="triton")
    assert torch.equal(got.offsets, ref.offsets) and got.embeddings.dtype == dtype
    assert_close(got.embeddings, ref.embeddings, tol * ref.embeddings.abs().max().item(), 0, f"embeddings {dtype}")
    for out in got.split():      # the separator row is copied, not computed: exact
        assert torch.equal(out[-1], enc.view_seperator)


def test_ocr2_triton_equals_torch():
    # the whole encoder (OCR2_TRAIN: quick in the interpreter), every view of two images (one 1x2, one without
    # crops: 128 px crops, 192 px global views) in one pass; fp64 leaves only the order of the sums
    batch = preprocess([page(810, 1700, 33), page(500, 333, 32)], OCR2_TRAIN_MODE)
    assert batch.grids == [(1, 2), (1, 1)]
    weights = randomize(GundamEncoder(OCR2_TRAIN), seed=8).state_dict()
    check_ocr2(weights, batch, torch.float64, 1e-12, OCR2_TRAIN)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5), (torch.float16, 3e-2)])
def test_ocr2_triton_equals_torch_three_grids(ocr2_weights, dtype, tol):
    batch = ocr2_pages()
    assert batch.grids == [(3, 2), (1, 1), (1, 2)]
    check_ocr2(ocr2_weights, batch, dtype, tol)


def qwen2_packed(enc, batch, dtype):
    """The Qwen2 encoder's packed pass alone (the query rows [sum of m, C]) on random SAM features for the
    batch's views, and the torch path's on the same features (fp64)."""
    from gundam.packed import make_plan, signature
    plan = make_plan(signature(batch), enc.config.sam.window_size, enc.device)
    g = torch.Generator().manual_seed(5)
    C = OCR2_TINY.qwen2.hidden_size
    feats = [torch.randn(len(views), C, q, q, generator=g, dtype=torch.float64)
             for views, q in ((batch.global_views, 4), (batch.crops, 3)) if len(views)]
    with torch.no_grad():
        want = torch.cat([enc.double().qwen2_model(f).reshape(-1, C) for f in feats])
        got = enc.to(dtype).qwen2_model.forward_packed([f.to(dtype) for f in feats], plan)
    return got, want, plan


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 3e-2)])
def test_ocr2_qwen2_packed_dtypes(ocr2_weights, dtype, tol):
    # the Qwen2 part in the kernels' 32- and 16-bit arithmetic, every view of three images in one pass
    got, want, _ = qwen2_packed(ocr2_encoder(ocr2_weights), ocr2_pages(), dtype)
    assert got.dtype == dtype
    assert_close(got, want, tol * want.abs().max().item(), 0, f"query rows {dtype}")


def test_ocr2_last_layer_runs_on_the_query_rows(ocr2_weights):
    # o_proj (and the MLP after it) of the last layer sees only the query rows: sum of m over the views
    enc = ocr2_encoder(ocr2_weights)
    batch = ocr2_pages()
    rows = []
    for layer in enc.qwen2_model.model.model.layers:
        layer.self_attn.o_proj.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    got, want, plan = qwen2_packed(enc, batch, torch.float64)
    m = [16] * 3 + [9] * sum(batch.n_crops)                 # 4x4 global grids, 3x3 crop grids
    assert plan.seg_prefix.view_lengths == tuple(m)
    layers = OCR2_TINY.qwen2.num_hidden_layers
    assert rows[-layers:] == [2 * sum(m)] * (layers - 1) + [sum(m)], rows
    assert_close(got, want, 1e-12 * want.abs().max().item(), 0, "query rows")


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


def stub_kernels(monkeypatch, log):
    """Every @triton.jit kernel of gundam.kernels replaced by a CountLaunches that appends to `log`."""
    from gundam.kernels import activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu
    for mod in (activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, CountLaunches(name, log))


def count(encoder, batch, monkeypatch):
    log = []
    stub_kernels(monkeypatch, log)
    with torch.no_grad(), CountOps() as ops:
        encoder(batch, backend="triton")
    monkeypatch.undo()
    return log, ops.ops


@pytest.mark.parametrize("family", ["deepseek-ocr", "deepseek-ocr2"])
def test_launch_count_independent_of_images_and_crops(encoder, ocr2_weights, monkeypatch, family):
    mode = MODE if family == "deepseek-ocr" else OCR2_TINY_MODE
    one = preprocess([page(1300, 650, 0)], mode)
    four = preprocess([page(1950, 1300, 1), page(700, 2100, 2), page(1000, 1000, 3), page(1300, 650, 4)], mode)
    assert one.grids == [(2, 1)] and four.grids == [(3, 2), (1, 3), (2, 2), (2, 1)]
    encoder = encoder if family == "deepseek-ocr" else ocr2_encoder(ocr2_weights)
    for batch in (one, four):  # warm the per-size table caches: the counts below are of steady state
        count(encoder, batch, monkeypatch)
    launches_1, ops_1 = count(encoder, one, monkeypatch)
    launches_4, ops_4 = count(encoder, four, monkeypatch)
    assert len(launches_1) > 0 and "_attention_kernel" in launches_1
    if family == "deepseek-ocr2":
        layers = OCR2_TINY.qwen2.num_hidden_layers
        assert launches_1.count("_prefix_attention_kernel") == layers, launches_1
        assert launches_1.count("_rms_norm_kernel") == 2 * layers + 1, launches_1
        assert launches_1.count("_silu_mul_kernel") == layers, launches_1
    assert launches_1 == launches_4, (launches_1, launches_4)
    assert ops_1 == ops_4, f"torch ops: {len(ops_1)} for 1 image, {len(ops_4)} for 4"


class DeviceReads(TorchDispatchMode):
    """Records every op that makes the host wait for a device value: reading a scalar out of a device tensor
    (.item(), int(), bool(), .tolist()) or copying device memory to the host (.cpu(), .to("cpu"))."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        on_device = [a.device for a in args if isinstance(a, torch.Tensor) and a.device.type != "cpu"]
        if func is torch.ops.aten._local_scalar_dense.default and on_device:
            self.reads.append(str(func))
        elif on_device and isinstance(out, torch.Tensor) and out.device.type == "cpu":
            self.reads.append(f"{func} {on_device[0]} -> cpu")
        return out


@pytest.mark.parametrize("family", ["deepseek-ocr", "deepseek-ocr2"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_forward_never_waits_for_the_device(monkeypatch, backend, family):
    # The whole host path on the meta device, which holds no values: any read of a device value would either
    # be recorded or fail. Kernel launches are recorded, not run. The first call (which builds the plan on
    # the host and uploads it) and a repeated call are both checked.
    config, mode = (SMALL, MODE) if family == "deepseek-ocr" else (OCR2_TINY, OCR2_TINY_MODE)
    with torch.device("meta"):
        enc = GundamEncoder(config).eval()
    batch = preprocess([page(1300, 650, 0), page(300, 200, 1), page(700, 2100, 2)], mode)
    launches = []
    stub_kernels(monkeypatch, launches)
    for _ in range(2):
        with torch.no_grad(), DeviceReads() as mode:
            out = enc(batch, backend=backend)
        assert mode.reads == [], mode.reads
        assert out.embeddings.device.type == "meta"
        assert out.embeddings.shape == (sum(batch.tokens), config.projector.n_embed)
        assert out.offsets.tolist() == [0, *torch.tensor(batch.tokens).cumsum(0).tolist()]
    assert (len(launches) > 0) == (backend == "triton")


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


def test_capture_is_gpu_only(encoder):
    # CUDA-graph capture needs a GPU; on CPU it says so in one line (the capture itself is checked on a GPU)
    with pytest.raises(RuntimeError, match="expected a CUDA device"):
        encoder.capture(preprocess([page(300, 300, 0)], MODE))
