"""The analytic cost model against measured FLOPs (torch path on the meta device), preprocessing and itself."""
import csv
import dataclasses
import functools
import itertools
import json

import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gundam.cli import main, parse_size
from gundam.config import MODES, ClipConfig, EncoderConfig, Mode, SamConfig
from gundam.cost import GPUS, STAGES, estimate
from gundam.encoder import GundamEncoder
from gundam import preprocess
from gundam.layout import image_layout

TOL = 0.005  # relative; the counts are in fact exact

# ----------------------------------------------------------------------------------------------------------
# measurement: the torch path's submodules on the meta device (no memory, no compute), SDPA as explicit math


@functools.lru_cache(maxsize=None)
def meta_encoder(config: EncoderConfig) -> GundamEncoder:
    with torch.device("meta"):
        return GundamEncoder(config).eval()


def _flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@functools.lru_cache(maxsize=None)
def measured_views(config: EncoderConfig, size: int, n: int) -> tuple[int, int, int]:
    """Measured (SAM, CLIP, projector) FLOPs of n views of `size` px."""
    enc = meta_encoder(config)
    x = torch.empty(n, 3, size, size, device="meta")
    out = {}
    sam = _flops(lambda: out.__setitem__("sam", enc.sam_model(x)))
    clip = _flops(lambda: out.__setitem__("clip", enc.vision_model(x, out["sam"])))
    feats = torch.cat([out["clip"][:, 1:], out["sam"].flatten(2).permute(0, 2, 1)], dim=-1)
    return sam, clip, _flops(lambda: enc.projector(feats))


def measured_stages(width, height, mode, max_crops=None, batch=1, config=EncoderConfig()) -> dict[str, int]:
    lay = image_layout(width, height, mode, max_crops)
    g = measured_views(config, lay.mode.base_size, batch)
    c = measured_views(config, lay.mode.image_size, batch * lay.n_crops) if lay.n_crops else (0, 0, 0)
    return {"sam_global": g[0], "clip_global": g[1], "sam_crops": c[0], "clip_crops": c[1],
            "projector_layout": g[2] + c[2]}


def check_against_measured(report, measured):
    rows, bad = [], []
    for name in STAGES:
        a, m = report.stages[name].matmul_flops, measured[name]
        err = abs(a - m) / m if m else float(a != 0)
        rows.append(f"  {name:<17} analytic {a:>17,} measured {m:>17,} rel.err {err:.2e}")
        if err > TOL:
            bad.append(name)
    assert not bad, (f"{report.width}x{report.height} {report.mode}: matmul FLOPs off in {bad}\n" + "\n".join(rows))


SIZES = [(640, 640), (1024, 1024), (1000, 1500), (2000, 3000), (3000, 800)]


@pytest.mark.parametrize("mode", ["gundam", "base", "large", "tiny", "small", "gundam-m"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_flops_match_flop_counter(size, mode):
    report = estimate(*size, mode=mode)
    check_against_measured(report, measured_stages(*size, mode))


@pytest.mark.parametrize("size,max_crops,batch", [((2000, 3000), 9, 1), ((3000, 800), 2, 3), ((700, 2100), 4, 2)])
def test_matmul_flops_match_with_max_crops_and_batch(size, max_crops, batch):
    report = estimate(*size, mode="gundam", max_crops=max_crops, batch=batch)
    check_against_measured(report, measured_stages(*size, "gundam", max_crops, batch))


def test_matmul_flops_match_for_another_config():
    # windows of 12 (padding at both view sizes), other global blocks, a narrower SAM, a shallower CLIP
    cfg = EncoderConfig(sam=SamConfig(embed_dim=256, depth=5, num_heads=4, window_size=12, global_attn_indexes=(1, 4)),
                        clip=ClipConfig(num_layers=3, num_attention_heads=8, ffn_hidden_size=2048))
    for size, mode in (((2000, 3000), "gundam"), ((900, 900), "gundam-m"), ((512, 512), "tiny")):
        report = estimate(*size, mode=mode, config=cfg)
        check_against_measured(report, measured_stages(*size, mode, config=cfg))
    assert report.total.weight_bytes == 2 * sum(p.numel() for p in meta_encoder(cfg).parameters())


def test_weight_bytes_equal_the_modules_parameters():
    enc = meta_encoder(EncoderConfig())
    r = estimate(2000, 3000, "gundam")
    numel = lambda m: sum(p.numel() for p in m.parameters())
    assert r.stages["sam_global"].weight_bytes == r.stages["sam_crops"].weight_bytes == 2 * numel(enc.sam_model)
    assert r.stages["clip_global"].weight_bytes == 2 * numel(enc.vision_model)
    assert r.total.weight_bytes == 2 * numel(enc)
    assert estimate(2000, 3000, "gundam", dtype="fp32").total.weight_bytes == 4 * numel(enc)


def test_neck_widths_come_from_the_config():
    # by hand for a 1024 px view: 64x64 patches of 768 channels -> 1x1 conv to o -> 3x3 conv o -> o; net_2 (3x3/2)
    # to o2 at 32x32; net_3 (3x3/2) to o3 at 16x16. A conv costs 2 * output elements * in channels * kernel area.
    def neck_flops(o, o2, o3):
        return 2 * 64 * 64 * o * 768 + 2 * 64 * 64 * o * o * 9 + 2 * 32 * 32 * o2 * o * 9 + 2 * 16 * 16 * o3 * o2 * 9

    def neck_params(o, o2, o3):  # convs have no bias; two LayerNorm2d of o (weight and bias)
        return 768 * o + o * o * 9 + o * o2 * 9 + o2 * o3 * 9 + 2 * 2 * o

    narrow = EncoderConfig(sam=SamConfig(out_chans=128, net_2_chans=384))
    a, b = estimate(1024, 1024, "base"), estimate(1024, 1024, "base", config=narrow)
    assert (a.stages["sam_global"].matmul_flops - b.stages["sam_global"].matmul_flops
            == neck_flops(256, 512, 1024) - neck_flops(128, 384, 1024))
    assert (a.total.weight_bytes - b.total.weight_bytes
            == 2 * (neck_params(256, 512, 1024) - neck_params(128, 384, 1024)))
    for name in ("clip_global", "projector_layout"):
        assert a.stages[name] == b.stages[name], name


def test_view_size_the_encoder_cannot_take():
    cfg = EncoderConfig(sam=SamConfig(img_size=960, patch_size=48))  # 48 * 4 = 192 px per output token
    with pytest.raises(ValueError, match="base_size=1024: expected a positive multiple of 192 px"):
        estimate(2000, 3000, "gundam", config=cfg)


def test_projector_vendor_bytes_by_hand():
    # Mode(1280, 640) with 2x2 crops: the 20x20 global view and the crops have 400 tokens each; the crops alone
    # pay the vendor's tile permute copy
    r = estimate(2000, 2000, Mode(1280, 640, True))
    assert r.layout.grid == (2, 2)
    e, Din, D = 2, 2048, 1280
    w = (Din * D + D) * e

    def view(t, newlines):  # cat(CLIP, SAM), projector, cat with the newline rows
        return 2 * t * Din * e + (t * Din * e + t * D * e + w) + (t * D * e + D * e + (t + newlines) * D * e)

    rows = 20 * 21 + 20 * 21 + 1
    expected = view(400, 20) + view(400, 20) + 2 * 400 * D * e + 2 * rows * D * e  # + permute copy, final cat
    assert r.stages["projector_layout"].hbm_bytes_vendor == expected


# ----------------------------------------------------------------------------------------------------------
# view layout = preprocessing

@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 6000), height=st.integers(1, 6000), mode=st.sampled_from(sorted(MODES)),
       max_crops=st.one_of(st.none(), st.integers(2, 9)))
def test_stages_follow_the_layout(width, height, mode, max_crops):
    r = estimate(width, height, mode, max_crops)
    lay = image_layout(width, height, mode, max_crops)
    k, m = lay.n_crops, lay.mode
    for name in ("sam_crops", "clip_crops"):
        assert (r.stages[name] == type(r.stages[name])()) == (k == 0), (name, r.stages[name])
    # a crop costs what a global view of its size costs
    if k:
        one = estimate(width, height, Mode(m.image_size, m.image_size, False))
        for part in ("sam", "clip"):
            assert r.stages[f"{part}_crops"].matmul_flops == k * one.stages[f"{part}_global"].matmul_flops
    # the projector sees every token the layout holds except newlines and the separator
    newlines = lay.qb + (lay.grid[1] * lay.qi if k else 0)
    assert r.stages["projector_layout"].matmul_flops == 2 * (lay.tokens - 1 - newlines) * 2048 * 1280


@pytest.mark.parametrize("size,mode", [((640, 640), "gundam"), ((641, 200), "gundam"), ((1000, 1500), "gundam"),
                                       ((3000, 800), "gundam"), ((1500, 1100), "gundam-m"), ((2000, 3000), "base"),
                                       ((300, 500), "tiny")])
def test_views_match_real_preprocessing(size, mode):
    batch = preprocess(Image.new("RGB", size, (200, 30, 90)), mode)
    r = estimate(*size, mode)
    assert [("global", batch.global_views.shape[-1], batch.global_views.shape[0])] + (
        [("crops", batch.crops.shape[-1], batch.crops.shape[0])] if batch.crops.shape[0] else []) == r.views
    assert batch.tokens == [r.layout.tokens]


# ----------------------------------------------------------------------------------------------------------
# crop and no-crop

@pytest.mark.parametrize("size", [(641, 100), (1000, 1500), (2000, 3000), (3000, 800), (100, 5000)])
def test_crops_only_where_preprocessing_makes_them(size):
    crops = estimate(*size, mode="gundam")
    for name in ("sam_crops", "clip_crops"):
        assert estimate(*size, mode="base").stages[name].matmul_flops == 0
        assert estimate(*size, mode=dataclasses.replace(MODES["gundam"], crop_mode=False)).stages[name].matmul_flops == 0
        assert crops.stages[name].matmul_flops > 0
        assert crops.stages[name].hbm_bytes_vendor > 0 and crops.stages[name].hbm_bytes_fused > 0


@pytest.mark.parametrize("size", [(640, 640), (100, 640), (640, 1), (1, 1), (500, 333)])
def test_small_images_never_crop(size):
    for mode in ("gundam", "gundam-m", "base"):
        r = estimate(*size, mode=mode, max_crops=9)
        assert r.layout.n_crops == 0
        for name in ("sam_crops", "clip_crops"):
            assert r.stages[name].matmul_flops == 0 and r.stages[name].hbm_bytes_vendor == 0


# ----------------------------------------------------------------------------------------------------------
# the fused count and the two traffic models

def test_fused_flops_without_window_padding():
    # 896 px -> 56 x 56 patches = 4 x 4 windows of 14: nothing padded. The fused path then differs from the
    # vendor only in the rel-pos projection: 2S-1 table rows per query and axis instead of S.
    r = estimate(2000, 3000, Mode(896, 896, True))
    sam = SamConfig()
    for name, s in r.stages.items():
        if not name.startswith("sam"):
            assert s.matmul_flops_fused == s.matmul_flops, name
            continue
        views = 1 if name == "sam_global" else r.layout.n_crops
        T = views * 56 * 56
        extra = sum(2 * 2 * T * sam.num_heads * ((2 * S - 1) - S) * sam.head_dim
                    for S in (56 if i in sam.global_attn_indexes else 14 for i in range(sam.depth)))
        assert s.matmul_flops_fused - s.matmul_flops == extra, (name, s.matmul_flops_fused - s.matmul_flops, extra)
    # 64 -> 70 and 40 -> 42 patches: qkv and proj skip the padded rows, far more than the rel-pos extra
    r = estimate(2000, 3000, "gundam")
    for name, s in r.stages.items():
        if name.startswith("sam"):
            assert s.matmul_flops_fused < 0.99 * s.matmul_flops, name
        else:
            assert s.matmul_flops_fused == s.matmul_flops, name


@pytest.mark.parametrize("size,mode", [((2000, 3000), "gundam"), ((1024, 1024), "base"), ((512, 512), "tiny"),
                                       ((3000, 800), "large"), ((1500, 1100), "gundam-m")])
def test_traffic_models(size, mode):
    r = estimate(*size, mode=mode)
    for name, s in r.stages.items():
        if s.matmul_flops:
            assert s.hbm_bytes_fused < s.hbm_bytes_vendor, (name, s)
            assert 0 < s.activation_bytes_fused <= s.activation_bytes, (name, s)
            assert s.other_flops > 0
    # the vendor materialises heads x N x N bias per global block; the fused path never does
    g = r.mode.base_size // 16
    bias = 12 * (g * g) ** 2 * 2
    assert r.stages["sam_global"].activation_bytes >= bias
    assert r.stages["sam_global"].activation_bytes_fused < bias
    assert r.stages["sam_global"].hbm_bytes_vendor - r.stages["sam_global"].hbm_bytes_fused >= 4 * 2 * bias
    # total: additive fields summed
    for f in ("matmul_flops", "matmul_flops_fused", "other_flops", "hbm_bytes_vendor", "hbm_bytes_fused"):
        assert getattr(r.total, f) == sum(getattr(s, f) for s in r.stages.values()), f


def test_batch():
    one, three = estimate(2000, 3000, batch=1), estimate(2000, 3000, batch=3)
    two = estimate(2000, 3000, batch=2)
    for name in STAGES:
        a, b = one.stages[name], three.stages[name]
        assert (b.matmul_flops, b.other_flops, b.hbm_bytes_vendor) == \
               (3 * a.matmul_flops, 3 * a.other_flops, 3 * a.hbm_bytes_vendor), name
        assert b.activation_bytes == a.activation_bytes  # the vendor encodes one image at a time
    # fused: one pass for the batch, so bytes = per-image part * batch + per-call part (weights, charged to the
    # global stages, and the cached position/rel-pos tables)
    for name in STAGES:
        f1, f2, f3 = (r.stages[name].hbm_bytes_fused for r in (one, two, three))
        per_call = 2 * f1 - f2
        assert f3 - f2 == f2 - f1, name
        if name in ("sam_global", "clip_global"):
            w = one.stages[name].weight_bytes
            assert 0.95 * w < per_call < 1.05 * w, (name, per_call, w)
        elif name != "projector_layout":
            assert 0 < per_call < 0.01 * f1, (name, per_call, f1)
    assert three.stages["sam_crops"].activation_bytes_fused > one.stages["sam_crops"].activation_bytes_fused


def test_dtype():
    a, b = estimate(1000, 1500, dtype="bf16"), estimate(1000, 1500, dtype=torch.float32)
    assert b.dtype == "fp32" and estimate(1000, 1500, dtype=torch.float16).dtype == "fp16"
    assert b.total.matmul_flops == a.total.matmul_flops
    assert 1.9 * a.total.hbm_bytes_vendor < b.total.hbm_bytes_vendor <= 2 * a.total.hbm_bytes_vendor
    with pytest.raises(ValueError, match="int8"):
        estimate(100, 100, dtype="int8")


@pytest.mark.parametrize("kwargs,match", [(dict(width=0, height=10), "width=0"), (dict(batch=0), "batch=0"),
                                          (dict(mode="huge"), "huge"), (dict(max_crops=12), "max_crops=12")])
def test_bad_arguments(kwargs, match):
    args = dict(width=1000, height=1000) | kwargs
    with pytest.raises(ValueError, match=match):
        estimate(**args)


# ----------------------------------------------------------------------------------------------------------
# roofline

@pytest.mark.parametrize("gpu", sorted(GPUS))
def test_roofline(gpu):
    r = estimate(2000, 3000, batch=2)
    g = GPUS[gpu]
    floors = r.floor(gpu)
    for name, s in r.stages.items():
        for fl, flops, nbytes in ((floors[name][0], s.matmul_flops, s.hbm_bytes_vendor),
                                  (floors[name][1], s.matmul_flops_fused, s.hbm_bytes_fused)):
            tc, tm = flops / g.tensor_flops, nbytes / g.hbm_bandwidth
            assert fl.seconds == pytest.approx(max(tc, tm))
            assert fl.bound == ("compute" if tc >= tm else "memory")
            assert fl.intensity == pytest.approx(flops / nbytes)
    for k in (0, 1):
        assert floors["total"][k].seconds == pytest.approx(sum(floors[n][k].seconds for n in STAGES))
    # the fused path's point: less traffic, so a lower floor
    assert floors["total"][1].seconds < floors["total"][0].seconds
    with pytest.raises(ValueError, match="v100"):
        r.floor("v100")


def test_more_bandwidth_lowers_memory_bound_floors_only():
    r = estimate(1000, 1500)
    h100, h200 = r.floor("h100"), r.floor("h200")
    for name in STAGES:
        for k in (0, 1):
            a, b = h100[name][k], h200[name][k]
            if a.bound == b.bound == "memory":
                assert b.seconds == pytest.approx(a.seconds * 3.35 / 4.8)
            elif a.bound == "compute":
                assert b.seconds == pytest.approx(a.seconds)


# ----------------------------------------------------------------------------------------------------------
# CLI

def cli(*argv):
    return main(["cost", *argv])


@pytest.mark.parametrize("text", ["2000", "2000x", "x3000", "0x10", "10x0", "-5x5", "axb", "2000x3000x1", "2e3x10"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError, match="WIDTHxHEIGHT") as e:
        parse_size(text)
    assert repr(text) in str(e.value)


def test_parse_size():
    assert parse_size("2000x3000") == (2000, 3000) and parse_size("640X480") == (640, 480)


def test_cli_table_shows_measured_flops(capsys):
    assert cli("2000x3000") == 0
    out = capsys.readouterr().out
    # 2x3 crops of 640 and the 1024 global view: 16 * (16 + 1) global, (3 * 10) * (2 * 10 + 1) local, 1 separator
    assert "grid 2x3, 6 crops of 640; tokens 903 = 272 global + 630 local + 1" in out
    assert "vendor traffic" in out and "fused traffic" in out and "H100" in out
    names = STAGES + ("total",)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert [r[0] for r in rows] == 2 * list(names)
    # the vendor table's GFLOP column (printed to 0.1) is what torch's FLOP counter measures
    measured = measured_stages(2000, 3000, "gundam")
    measured["total"] = sum(measured.values())
    for r in rows[:len(names)]:
        assert float(r[1]) == pytest.approx(measured[r[0]] / 1e9, rel=TOL, abs=0.05), (r, measured[r[0]])


def test_cli_json(capsys):
    assert cli("1024x1024", "--mode", "base", "--gpu", "a100", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["n_crops"], d["tokens"]) == (0, 16 * 17 + 1)
    measured = measured_stages(1024, 1024, "base")
    for name in STAGES:
        assert d["stages"][name]["matmul_flops"] == pytest.approx(measured[name], rel=TOL), name
    # roofline on the A100 datasheet's dense bf16 peak and HBM bandwidth
    assert d["roofline"]["gpu"]["name"].startswith("A100")
    assert set(d["roofline"]["stages"]) == set(STAGES) | {"total"}
    v = d["roofline"]["stages"]["sam_global"]["vendor"]
    assert v["seconds"] == pytest.approx(max(v["flops"] / 312e12, v["bytes"] / 2.039e12))
    assert cli("640x480", "3000x800", "--json") == 0
    assert [x["n_crops"] for x in json.loads(capsys.readouterr().out)] == [0, 4]


@pytest.mark.parametrize("argv,match", [((), "no image size"), (("20x",), "'20x'"),
                                        (("2000x3000", "--batch", "0"), "batch=0")])
def test_cli_errors_are_one_line(capsys, argv, match):
    assert cli(*argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and match in err and err.count("\n") == 1, err


def test_cli_sweep(tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    assert cli("--sweep", "--out", str(out)) == 0
    assert str(out) in capsys.readouterr().out
    rows = list(csv.DictReader(open(out)))
    crops = [r for r in rows if r["variant"] == "crops"]
    nocrop = [r for r in rows if r["variant"] == "nocrop"]
    assert len(crops) == len(nocrop) > 100
    assert all(r["n_crops"] == "0" for r in nocrop)
    for c, n in zip(crops, nocrop):
        assert (c["width"], c["height"]) == (n["width"], n["height"])
        big = int(c["width"]) > 640 or int(c["height"]) > 640
        assert (int(c["n_crops"]) > 0) == big
        assert (float(c["matmul_gflops"]) > float(n["matmul_gflops"])) == big
    assert len({(r["width"], r["height"]) for r in rows}) > 100
    assert len({r["aspect_ratio"] for r in rows}) >= 5
    # a row's FLOPs are what torch's FLOP counter measures for that image
    for r in (r for r in rows if (r["width"], r["height"]) == ("1024", "768")):
        mode = "gundam" if r["variant"] == "crops" else dataclasses.replace(MODES["gundam"], crop_mode=False)
        measured = sum(measured_stages(1024, 768, mode).values())
        assert float(r["matmul_gflops"]) == pytest.approx(measured / 1e9, rel=TOL, abs=5e-4), (r, measured)


def test_sweep_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep.csv"
    assert cli("--sweep", "--out", str(out)) == 0
    png = tmp_path / "sweep.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("size", [(1300, 650), (500, 400)])
def test_training_flops_match_flop_counter(size):
    # forward + backward of the torch path (the vendor's computation), measured, against the model's count
    from testutils import TINY, TINY_MODE, page, randomize
    enc = randomize(GundamEncoder(TINY), seed=1)
    batch = preprocess(page(*size, seed=2), TINY_MODE)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        enc(batch, backend="torch").embeddings.pow(2).sum().backward()
    est = estimate(*size, TINY_MODE, config=TINY, dtype="fp32")
    assert est.total.train_matmul_flops == fc.get_total_flops()


# ----------------------------------------------------------------------------------------------------------
# training memory: the bytes autograd keeps, measured with saved-tensor hooks

def saved_in_training(enc, batch, backend, block_fns) -> dict:
    """What a training forward keeps for the backward, measured: bytes of the unique storages autograd saves
    (parameters left out: they are kept anyway), the largest one block saves, and with checkpointing what stays
    kept (saved outside the blocks, plus the blocks' inputs that the checkpoints hold). block_fns: (module,
    name) of the functions that run one block, wrapped to tell which block a saved tensor belongs to."""
    params = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    current, calls = [None], itertools.count()

    def unique(tensors, seen):
        out = 0
        for t in tensors:
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                out += st.nbytes()
        return out

    def run(checkpointing):
        seen, per_block, inputs = set(), {}, []

        def pack(t):
            per_block[current[0]] = per_block.get(current[0], 0) + unique([t], seen)
            return t

        def checkpoint(fn, *args, **kwargs):   # the tensors a checkpoint holds for its recomputation
            inputs.extend(a for a in args if isinstance(a, torch.Tensor))
            return real_checkpoint(fn, *args, **kwargs)

        with pytest.MonkeyPatch.context() as mp:
            real_checkpoint = torch.utils.checkpoint.checkpoint
            mp.setattr(torch.utils.checkpoint, "checkpoint", checkpoint)
            for module, name in block_fns:
                fn = getattr(module, name)

                def labelled(block, *args, fn=fn, **kwargs):
                    current[0] = next(calls)     # one block on one batch of views
                    try:
                        return fn(block, *args, **kwargs)
                    finally:
                        current[0] = None
                mp.setattr(module, name, labelled)
            if checkpointing:
                enc.gradient_checkpointing_enable()
            try:
                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    enc(batch, backend=backend)
            finally:
                enc.gradient_checkpointing_disable()
        return per_block, unique(inputs, seen)

    per_block, _ = run(False)
    outside, inputs = run(True)
    blocks = {k: v for k, v in per_block.items() if k is not None}
    return {"saved": sum(per_block.values()), "block": max(blocks.values()),
            "kept": outside.get(None, 0) + inputs}


def check_training_memory(est, measured, fused):
    sfx = "_fused" if fused else ""
    t = est.total
    model = {"saved": t.train_activation_bytes(fused), "block": getattr(t, "train_block_bytes" + sfx),
             "kept": getattr(t, "train_kept_bytes" + sfx)}
    assert model == measured, f"model {model}, measured {measured}"
    assert t.train_activation_bytes(fused, checkpointing=True) == model["kept"] + model["block"]


@pytest.mark.parametrize("sizes,mode", [([(500, 400)], "tiny-mode"), ([(1300, 650)] * 2, "tiny-mode"),
                                        ([(700, 2100)], "tiny-mode"), ([(1300, 650)], "other")])
def test_training_memory_of_the_torch_path(sizes, mode):
    # batches of 1 and 2 images, no crops, 2x1 and 1x3 grids; a second mode whose global view is 192 px
    from testutils import TINY, TINY_MODE, page, randomize
    import gundam.model
    m = TINY_MODE if mode == "tiny-mode" else Mode(192, 128, True)
    enc = randomize(GundamEncoder(TINY), seed=1)
    batch = preprocess([page(*s, seed=i) for i, s in enumerate(sizes)], m)
    blocks = [(gundam.model.SamBlock, "forward"), (gundam.model.ClipLayer, "forward")]
    measured = saved_in_training(enc, batch, "torch", blocks)
    est = estimate(*sizes[0], m, config=TINY, batch=len(sizes), dtype="fp32")
    check_training_memory(est, measured, fused=False)


def test_training_memory_in_the_cli(capsys):
    # Gundam 3x2 pages, batch 4, bf16: the torch path keeps a 12 x 4096 x 4096 softmax weight tensor per global
    # block and image; the Triton path nothing N x N; checkpointing keeps far less on either
    assert cli("1900x1250", "--batch", "4", "--train") == 0
    out = capsys.readouterr().out
    total = [line.split() for line in out.splitlines() if line.startswith("total")][-1]
    torch_mb, triton_mb, torch_ck, triton_ck = map(float, total[4:8])
    r = estimate(1900, 1250, batch=4)
    assert torch_mb == pytest.approx(r.total.train_saved_bytes / 1e6, abs=0.05)
    assert torch_mb - triton_mb > 4 * 4 * 12 * 4096 ** 2 * 2 / 1e6     # 4 global blocks x 4 images
    assert max(torch_ck, triton_ck) < triton_mb / 4


@pytest.mark.parametrize("n", [1, 2])
def test_training_memory_of_the_packed_path(n):
    # needs the attention kernel's autograd Function: what it keeps is the model's, the torch reference's is not.
    # n copies of a 1x2 image (global views and crops of two sizes in one pass), in Triton's interpreter
    import gundam.packed
    from test_train_triton import CFG, MODE, images
    from testutils import randomize
    enc = randomize(GundamEncoder(CFG), seed=3)
    image = images(1)[0]
    measured = saved_in_training(enc, preprocess([image] * n, MODE), "triton",
                                 [(gundam.packed, "sam_block"), (gundam.packed, "clip_layer")])
    check_training_memory(estimate(*image.size, MODE, config=CFG, batch=n, dtype="fp32"), measured, fused=True)
