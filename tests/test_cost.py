"""The analytic cost model against measured FLOPs (torch path on the meta device), preprocessing and itself."""
import csv
import dataclasses
import functools
import itertools
import json
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from gundam.cli import main, parse_size
from gundam.config import MODES, ClipConfig, EncoderConfig, Mode, Ocr2Config, SamConfig, default_config
from gundam.cost import COST_STAGES, OCR2_COST_STAGES, StageCost, estimate
from gundam.encoder import GundamEncoder
from gundam import preprocess
from gundam.layout import image_layout
from gundam.weights import DTYPES

TOL = 0.005  # relative; the counts are in fact exact

# ----------------------------------------------------------------------------------------------------------
# measurement: the torch path's submodules on the meta device (no memory, no compute), SDPA as explicit math


@functools.lru_cache(maxsize=None)
def meta_encoder(config: EncoderConfig | Ocr2Config) -> GundamEncoder:
    with torch.device("meta"):
        return GundamEncoder(config).eval()


def _flops(fn) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


@functools.lru_cache(maxsize=None)
def measured_views(config: EncoderConfig | Ocr2Config, size: int, n: int) -> tuple[int, int, int]:
    """Measured (SAM, CLIP or Qwen2, projector) FLOPs of n views of `size` px."""
    enc = meta_encoder(config)
    x = torch.empty(n, 3, size, size, device="meta")
    out = {}
    sam = _flops(lambda: out.__setitem__("sam", enc.sam_model(x)))
    if enc.family == "deepseek-ocr2":
        second = _flops(lambda: out.__setitem__("feats", enc.qwen2_model(out["sam"])))
    else:
        second = _flops(lambda: out.__setitem__("clip", enc.vision_model(x, out["sam"])))
        out["feats"] = torch.cat([out["clip"][:, 1:], out["sam"].flatten(2).permute(0, 2, 1)], dim=-1)
    return sam, second, _flops(lambda: enc.projector(out["feats"]))


def measured_stages(width, height, mode, max_crops=None, batch=1, config=None) -> dict[str, int]:
    lay = image_layout(width, height, mode, max_crops)
    config = default_config(lay.mode.family) if config is None else config
    second = "qwen2" if lay.mode.family == "deepseek-ocr2" else "clip"
    g = measured_views(config, lay.mode.base_size, batch)
    c = measured_views(config, lay.mode.image_size, batch * lay.n_crops) if lay.n_crops else (0, 0, 0)
    return {"sam_global": g[0], f"{second}_global": g[1], "sam_crops": c[0], f"{second}_crops": c[1],
            "projector_layout": g[2] + c[2]}


def check_against_measured(report, measured):
    rows, bad = [], []
    assert set(report.stages) == set(measured)
    for name in report.stages:
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


def test_neck_widths_come_from_the_config():
    # a narrower neck and net_2 (net_3 stays 1024: the projector takes CLIP's 1024 + net_3's): the FLOP counter
    # and the module's parameters say what the narrow encoder costs; CLIP and the projector do not change
    narrow = EncoderConfig(sam=SamConfig(out_chans=128, net_2_chans=384))
    a, b = estimate(1024, 1024, "base"), estimate(1024, 1024, "base", config=narrow)
    check_against_measured(b, measured_stages(1024, 1024, "base", config=narrow))
    assert b.total.weight_bytes == 2 * sum(p.numel() for p in meta_encoder(narrow).parameters())
    assert b.stages["sam_global"].matmul_flops < a.stages["sam_global"].matmul_flops
    for name in ("clip_global", "projector_layout"):
        assert a.stages[name] == b.stages[name], name


def test_projector_vendor_bytes_by_hand():
    # Mode(1280, 640) with 2x2 crops, bf16: the 20x20 global view and the 4 crops of 10x10 have 400 tokens each.
    # Per view kind (2048 in, 1280 out):
    #   cat(CLIP, SAM)         400 * 2048 * 2 = 1,638,400 B read and written             3,276,800
    #   projector              1,638,400 in + (2048 * 1280 + 1280) * 2 = 5,245,440 of
    #                          weights + 400 * 1280 * 2 = 1,024,000 out                  7,907,840
    #   cat with 20 newlines   1,024,000 + 2,560 in, 420 * 1280 * 2 = 1,075,200 out      2,101,760
    #                                                                                   13,286,400
    # the crops' tile permute copy 2 * 1,024,000 = 2,048,000; the final cat with the separator reads and writes
    # 420 + 420 + 1 = 841 rows: 2 * 841 * 1280 * 2 = 4,305,920. Sum: 2 * 13,286,400 + 2,048,000 + 4,305,920.
    r = estimate(2000, 2000, Mode(1280, 640, True))
    assert r.layout.grid == (2, 2)
    assert r.stages["projector_layout"].hbm_bytes_vendor == 32_926_720


# ----------------------------------------------------------------------------------------------------------
# view layout = preprocessing

@settings(max_examples=300, deadline=None)
@given(width=st.integers(1, 6000), height=st.integers(1, 6000),
       mode=st.sampled_from(sorted(k for k, m in MODES.items() if m.family == "deepseek-ocr")),
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
    # vendor only in the rel-pos projection: each query against 2S-1 table rows per axis instead of S, so
    # 2 FLOPs x 2 axes x 3136 tokens x 12 heads x (S - 1) x 64 more per block and view:
    #   8 window blocks, S = 14:  4 * 3136 * 12 * 13 * 64 =   125,239,296 each
    #   4 global blocks, S = 56:  4 * 3136 * 12 * 55 * 64 =   529,858,560 each
    #   one view: 8 * 125,239,296 + 4 * 529,858,560       = 3,121,348,608; the page's 2x3 crops 6 times that
    r = estimate(2000, 3000, Mode(896, 896, True))
    assert r.layout.n_crops == 6
    extra = {"sam_global": 3_121_348_608, "sam_crops": 18_728_091_648}
    for name, s in r.stages.items():
        assert s.matmul_flops_fused - s.matmul_flops == extra.get(name, 0), name
    # 64 -> 70 and 40 -> 42 patches: qkv and proj skip the padded rows, far more than the rel-pos extra
    r = estimate(2000, 3000, "gundam")
    for name, s in r.stages.items():
        if name.startswith("sam"):
            assert s.matmul_flops_fused < 0.99 * s.matmul_flops, name
        else:
            assert s.matmul_flops_fused == s.matmul_flops, name


# heads x N x N bf16 bias of one global SAM block, 12 * N^2 * 2 B: 1024 px, 64 x 64 patches, N = 4096: 402,653,184;
# 512 px: N = 1024, 25,165,824; 1280 px: N = 6400, 983,040,000
@pytest.mark.parametrize("size,mode,bias", [((2000, 3000), "gundam", 402_653_184), ((1024, 1024), "base", 402_653_184),
                                            ((512, 512), "tiny", 25_165_824), ((3000, 800), "large", 983_040_000),
                                            ((1500, 1100), "gundam-m", 983_040_000)])
def test_traffic_models(size, mode, bias):
    r = estimate(*size, mode=mode)
    for name, s in r.stages.items():
        if s.matmul_flops:
            assert s.hbm_bytes_fused < s.hbm_bytes_vendor, (name, s)
            assert 0 < s.activation_bytes_fused <= s.activation_bytes, (name, s)
            assert s.other_flops > 0
    # the vendor materialises the bias; the fused path never does
    sam = r.stages["sam_global"]
    assert sam.activation_bytes >= bias
    assert sam.activation_bytes_fused < bias
    # 4 global blocks, each writing its bias and SDPA reading it back: at least 8 biases more traffic
    assert sam.hbm_bytes_vendor - sam.hbm_bytes_fused >= 8 * bias


def test_batch():
    one, three = estimate(2000, 3000, batch=1), estimate(2000, 3000, batch=3)
    two = estimate(2000, 3000, batch=2)
    for name in COST_STAGES:
        a, b = one.stages[name], three.stages[name]
        assert (b.matmul_flops, b.other_flops, b.hbm_bytes_vendor) == \
               (3 * a.matmul_flops, 3 * a.other_flops, 3 * a.hbm_bytes_vendor), name
        assert b.activation_bytes == a.activation_bytes  # the vendor encodes one image at a time
    # fused: one pass for the batch, so bytes = per-image part * batch + per-call part (weights, charged to the
    # global stages, and the cached position/rel-pos tables)
    for name in COST_STAGES:
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
    # every name gundam.weights.DTYPES has, and the torch dtypes: the weights weigh what the encoder's parameters
    # weigh in that dtype
    params = list(meta_encoder(EncoderConfig()).parameters())
    for dtype, dt in [*DTYPES.items(), *((dt, dt) for dt in set(DTYPES.values()))]:
        assert estimate(1000, 1500, dtype=dtype).total.weight_bytes == sum(p.to(dt).nbytes for p in params), dtype
    a, b = estimate(1000, 1500, dtype="bf16"), estimate(1000, 1500, dtype=torch.float32)
    assert (a.dtype, b.dtype, estimate(1000, 1500, dtype="half").dtype) == ("bf16", "fp32", "fp16")
    assert estimate(1000, 1500, dtype="auto").dtype == "bf16"  # what the encoder picks on a GPU
    assert b.total.matmul_flops == a.total.matmul_flops
    assert 1.9 * a.total.hbm_bytes_vendor < b.total.hbm_bytes_vendor <= 2 * a.total.hbm_bytes_vendor
    for bad in ("int8", torch.float64):  # float64: no GPU peak to price it at
        with pytest.raises(ValueError, match=re.escape(f"dtype={bad!r}")):
            estimate(100, 100, dtype=bad)


@pytest.mark.parametrize("kwargs,match", [(dict(width=0, height=10), "width=0"), (dict(batch=0), "batch=0"),
                                          (dict(mode="huge"), "huge"), (dict(max_crops=12), "max_crops=12")])
def test_bad_arguments(kwargs, match):
    args = dict(width=1000, height=1000) | kwargs
    with pytest.raises(ValueError, match=match):
        estimate(**args)


# ----------------------------------------------------------------------------------------------------------
# roofline

def test_roofline_by_hand():
    # made-up stages, (FLOPs, bytes) vendor | fused, on the H100 (989 TFLOP/s bf16, 494 tf32, 3.35 TB/s):
    #   a: 1.978e12, 3.35e9  -> 2 ms compute vs 1 ms memory: compute 2 ms  | 0.989e12, 6.7e9 -> memory 2 ms
    #   b: 0.989e12, 10.05e9 -> 1 ms vs 3 ms: memory 3 ms                   | 2.967e12, 3.35e9 -> compute 3 ms
    # totals: 5 ms each, memory-bound for the vendor (3 of the 5 ms), compute-bound fused
    stages = {"a": StageCost(matmul_flops=1_978 * 10 ** 9, hbm_bytes_vendor=3_350 * 10 ** 6,
                             matmul_flops_fused=989 * 10 ** 9, hbm_bytes_fused=6_700 * 10 ** 6),
              "b": StageCost(matmul_flops=989 * 10 ** 9, hbm_bytes_vendor=10_050 * 10 ** 6,
                             matmul_flops_fused=2_967 * 10 ** 9, hbm_bytes_fused=3_350 * 10 ** 6),
              "empty": StageCost()}
    r = dataclasses.replace(estimate(1000, 1000), stages=stages)
    seconds = lambda f: [(x.seconds, x.bound) for x in f]
    h100 = r.floor("h100")
    assert seconds(h100["a"]) == [(pytest.approx(2e-3), "compute"), (pytest.approx(2e-3), "memory")]
    assert seconds(h100["b"]) == [(pytest.approx(3e-3), "memory"), (pytest.approx(3e-3), "compute")]
    assert seconds(h100["empty"]) == [(0, "-"), (0, "-")]
    assert seconds(h100["total"]) == [(pytest.approx(5e-3), "memory"), (pytest.approx(5e-3), "compute")]
    assert (h100["total"][0].flops, h100["total"][0].bytes) == (2_967 * 10 ** 9, 13_400 * 10 ** 6)
    assert h100["a"][0].intensity == pytest.approx(590.4478, rel=1e-6)  # 1.978e12 / 3.35e9 FLOP/B
    # the H200 has the H100's compute and 4.8 TB/s: b's vendor floor 10.05e9 / 4.8e12 = 2.09375 ms, a's stays
    h200 = r.floor("h200")
    assert seconds(h200["a"])[0] == (pytest.approx(2e-3), "compute")
    assert seconds(h200["b"])[0] == (pytest.approx(2.09375e-3), "memory")
    # fp32 matmuls run at the tf32 peak: a's vendor floor 1.978e12 / 494e12 = 4.00405 ms
    fp32 = dataclasses.replace(r, dtype="fp32").floor("h100")
    assert seconds(fp32["a"])[0] == (pytest.approx(4.00405e-3, rel=1e-6), "compute")


def test_roofline():
    floors = estimate(2000, 3000, batch=2).floor("a100")
    # the fused path's point: less traffic, so a lower floor
    assert floors["total"][1].seconds < floors["total"][0].seconds
    with pytest.raises(ValueError, match="v100"):
        estimate(2000, 3000).floor("v100")


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


@pytest.mark.parametrize("mode,header,names", [
    # 2x3 crops of 640 and the 1024 global view: 16 * (16 + 1) global, (3 * 10) * (2 * 10 + 1) local, 1 separator
    ("gundam", "grid 2x3, 6 crops of 640; tokens 903 = 272 global + 630 local + 1", COST_STAGES),
    # DeepSeek-OCR 2: 2x3 crops of 768 and the 1024 global view: 16 * 16 global, 6 * 12 * 12 local, 1 separator
    ("ocr2", "mode ocr2 (global 1024, crop_mode on), grid 2x3, 6 crops of 768; tokens 1121 = 256 global + 864 local "
             "+ 1", OCR2_COST_STAGES)])
def test_cli_table_shows_measured_flops(capsys, mode, header, names):
    assert cli("2000x3000", "--mode", mode) == 0
    out = capsys.readouterr().out
    assert header in out
    assert "vendor traffic" in out and "fused traffic" in out and "H100" in out
    names = names + ("total",)
    rows = [line.split() for line in out.splitlines() if line.split()[:1] and line.split()[0] in names]
    assert [r[0] for r in rows] == 2 * list(names)
    # the vendor table's GFLOP column (printed to 0.1) is what torch's FLOP counter measures
    measured = measured_stages(2000, 3000, mode)
    measured["total"] = sum(measured.values())
    for r in rows[:len(names)]:
        assert float(r[1]) == pytest.approx(measured[r[0]] / 1e9, rel=TOL, abs=0.05), (r, measured[r[0]])


def test_cli_json(capsys):
    assert cli("1024x1024", "--mode", "base", "--gpu", "a100", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["n_crops"], d["tokens"]) == (0, 16 * 17 + 1)
    measured = measured_stages(1024, 1024, "base")
    for name in COST_STAGES:
        assert d["stages"][name]["matmul_flops"] == pytest.approx(measured[name], rel=TOL), name
    # roofline on the A100 datasheet's dense bf16 and tf32 peaks and HBM bandwidth
    gpu = d["roofline"]["gpu"]
    assert gpu["name"].startswith("A100")
    assert (gpu["tensor_flops"], gpu["tf32_flops"], gpu["hbm_bandwidth"]) == (312e12, 156e12, 2.039e12)
    assert set(d["roofline"]["stages"]) == set(COST_STAGES) | {"total"}
    floors = estimate(1024, 1024, "base").floor("a100")
    for name, f in d["roofline"]["stages"].items():
        assert (f["vendor"]["seconds"], f["fused"]["seconds"]) == (floors[name][0].seconds, floors[name][1].seconds)
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
    import gundam.model
    from testutils import TRAIN, TRAIN_MODE, randomize, train_images
    enc = randomize(GundamEncoder(TRAIN), seed=3)
    image = train_images(1)[0]
    measured = saved_in_training(enc, preprocess([image] * n, TRAIN_MODE), "triton",
                                 [(gundam.model.SamBlock, "forward_packed"), (gundam.model.ClipLayer, "forward_packed")])
    check_training_memory(estimate(*image.size, TRAIN_MODE, config=TRAIN, batch=n, dtype="fp32"), measured, fused=True)


# ----------------------------------------------------------------------------------------------------------
# DeepSeek-OCR 2: SAM -> Qwen2 over [visual tokens, queries] -> projector of the queries

OCR2_SIZES = [((1900, 1250), 1), ((2000, 3000), 2), ((700, 700), 1), ((3000, 800), 3), ((769, 769), 1)]


@pytest.mark.parametrize("size,batch", OCR2_SIZES, ids=lambda x: f"{x[0]}x{x[1]}" if isinstance(x, tuple) else str(x))
def test_ocr2_matmul_flops_match_flop_counter(size, batch):
    report = estimate(*size, mode="ocr2", batch=batch)
    assert tuple(report.stages) == OCR2_COST_STAGES
    check_against_measured(report, measured_stages(*size, "ocr2", batch=batch))


def test_ocr2_matmul_flops_match_for_the_tiny_config():
    from testutils import OCR2_TINY, OCR2_TINY_MODE
    for size, batch in ((1300, 650), 1), ((1300, 650), 3), ((500, 400), 2), ((700, 2100), 1):
        report = estimate(*size, OCR2_TINY_MODE, batch=batch, config=OCR2_TINY)
        check_against_measured(report, measured_stages(*size, OCR2_TINY_MODE, batch=batch, config=OCR2_TINY))


def test_ocr2_weight_bytes_equal_the_modules_parameters():
    enc = meta_encoder(Ocr2Config())
    r = estimate(1900, 1250, "ocr2")
    numel = lambda m: sum(p.numel() for p in m.parameters())
    assert r.stages["sam_global"].weight_bytes == r.stages["sam_crops"].weight_bytes == 2 * numel(enc.sam_model)
    assert r.stages["qwen2_global"].weight_bytes == r.stages["qwen2_crops"].weight_bytes == 2 * numel(enc.qwen2_model)
    # the vendor checkpoint's encoder: 454,385,280 parameters in 473 tensors
    assert r.total.weight_bytes == 2 * numel(enc) == 2 * 454_385_280


@pytest.mark.parametrize("size", [(1900, 1250), (769, 769), (768, 768), (300, 500), (800, 1600)])
def test_ocr2_views_match_real_preprocessing(size):
    batch = preprocess(Image.new("RGB", size, (200, 30, 90)), "ocr2")
    r = estimate(*size, "ocr2")
    assert [("global", batch.global_views.shape[-1], batch.global_views.shape[0])] + (
        [("crops", batch.crops.shape[-1], batch.crops.shape[0])] if batch.crops.shape[0] else []) == r.views
    assert batch.tokens == [r.layout.tokens]


@settings(max_examples=200, deadline=None)
@given(width=st.integers(1, 6000), height=st.integers(1, 6000), max_crops=st.one_of(st.none(), st.integers(2, 9)))
def test_ocr2_stages_follow_the_layout(width, height, max_crops):
    r = estimate(width, height, "ocr2", max_crops)
    k = r.layout.n_crops
    assert (k == 0) == (width <= 768 and height <= 768)
    for name in ("sam_crops", "qwen2_crops"):
        assert (r.stages[name] == StageCost()) == (k == 0), name
    if k:  # crops run as one batch: k times what one crop costs
        one = estimate(1536, 768, "ocr2")  # 2x1: two crops
        for name in ("sam_crops", "qwen2_crops"):
            assert 2 * r.stages[name].matmul_flops == k * one.stages[name].matmul_flops, name
    # the projector sees every query output: all the layout's tokens but the separator, 896 -> 1280
    assert r.stages["projector_layout"].matmul_flops == 2 * (r.layout.tokens - 1) * 896 * 1280


def test_ocr2_fused_attention_counts_the_pairs_the_mask_keeps():
    # the global view: m = 256 visual tokens + 256 queries, n = 512. The prefix mask keeps 256 x 256 visual
    # pairs, and for query i the 256 visual keys and i + 1 queries: 65,536 + 65,536 + 256 * 257 / 2 = 163,968 of
    # the 262,144 pairs; the fused kernel skips the other 98,176. q.k and p.v, 2 FLOPs each per pair and head
    # dimension: 98,176 * 4 * 14 heads * 64 * 24 layers = 8,444,706,816 fewer FLOPs. The last layer's o_proj and
    # MLP skip the 256 visual rows: 2 * 256 * 896^2 + 3 * 2 * 256 * 896 * 4864 = 7,105,150,976 fewer.
    r = estimate(1900, 1250, "ocr2")
    for name, s in r.stages.items():
        if name.startswith("qwen2"):
            assert s.matmul_flops > s.matmul_flops_fused
    g = r.stages["qwen2_global"]
    assert g.matmul_flops - g.matmul_flops_fused == 8_444_706_816 + 7_105_150_976
    # 6 crops: m = 144, n = 288: kept 2 * 144^2 + 144 * 145 / 2 = 51,912 of 82,944; 31,032 pairs skipped; the
    # last layer's 144 visual rows each: 2 * 144 * 896^2 + 3 * 2 * 144 * 896 * 4864 = 3,996,647,424
    c = r.stages["qwen2_crops"]
    assert c.matmul_flops - c.matmul_flops_fused == 6 * (31_032 * 4 * 14 * 64 * 24 + 3_996_647_424)
    # the backward recomputes q.k over the kept pairs: 2 * 163,968 * 14 * 64 * 24 more
    assert g.train_matmul_flops_fused - 3 * g.matmul_flops_fused == 2 * 163_968 * 14 * 64 * 24


def test_ocr2_projector_bytes_by_hand():
    # 1900x1250: 3x2 crops of 768 (144 queries each) and the 1024 global view (256), bf16, 896 -> 1280.
    # vendor, per view kind, the linear on the query outputs:
    #   global  256 * 896 * 2 = 458,752 in + (896 * 1280 + 1280) * 2 = 2,296,320 of weights
    #           + 256 * 1280 * 2 = 655,360 out                                                     3,410,432
    #   crops   864 * 896 * 2 = 1,548,288 in + 2,296,320 + 864 * 1280 * 2 = 2,211,840 out          6,056,448
    #   cat(crops, global, separator): 1121 rows * 1280 * 2 = 2,869,760 read and written           5,739,520
    #                                                                                            15,206,400
    # fused, one kernel: 1120 * 896 * 2 = 2,007,040 in, 2,869,760 out, 2,296,320 + 2,560 (separator) of
    # weights: 7,175,680
    s = estimate(1900, 1250, "ocr2").stages["projector_layout"]
    assert (s.hbm_bytes_vendor, s.hbm_bytes_fused) == (15_206_400, 7_175_680)


def test_ocr2_qwen2_bytes_by_hand():
    from testutils import OCR2_TINY, OCR2_TINY_MODE
    # One 500x400 image (no crops): one 256 px global view, m = 16 visual tokens + 16 queries, n = 32 tokens.
    # Qwen2 of OCR2_TINY: C = 64, 4 heads and 2 KV heads of 16, SwiGLU 96.
    # Fused, bf16, 2 layers: X = 32 * 64 * 2 = 4,096 (q and the attention output too), q/k/v 8,192, hidden
    # 32 * 96 * 2 = 6,144, the fp32 first halves of cos and sin 2 * 32 * 8 * 4 = 2,048.
    #   the sequence: SAM's 16 * 64 * 2 = 2,048 + the query table 2,048 in, 4,096 out                8,192
    #   layer 0: norm 8,192; q, k, v: 3 * 4,096 in, 8,192 out; attention 8,192 + 2,048 + 4,096;
    #            o_proj 8,192; add + norm 16,384; gate and up 2 * 4,096 + 2 * 6,144;
    #            silu(gate) * up 3 * 6,144; down 10,240                                             116,736
    #   layer 1, the last: norm 16,384 (the add fused); q, k, v 20,480; attention 14,336; then the 16 query
    #            rows only: gathering attention's output and x 4 * 2,048; o_proj 4,096; add + norm 8,192;
    #            gate and up 2 * 2,048 + 2 * 3,072; silu(gate) * up 9,216; down 5,120                96,256
    #   last add + final norm on the query rows: 4,096 in, 4,096 out                                 8,192
    #   weights once: (4,160 + 2 * 2,080 + 4,096 + 3 * 6,144 + 128) * 2 layers + 64 = 62,016 * 2   124,032
    #                                                                                             353,408
    r = estimate(500, 400, OCR2_TINY_MODE, config=OCR2_TINY)
    assert r.stages["qwen2_global"].hbm_bytes_fused == 353_408
    # Vendor, fp32 (the RMSNorm casts are no-ops), 1 layer: X = 8,192, K or V 4,096, hidden 12,288, cos or sin
    # 2,048, the [1, 1, 32, 32] mask 4,096.
    #   cat(SAM tokens, queries): 4,096 + 4,096 in, 8,192 out                                       16,384
    #   mask: fill 4,096; zeros where kept, 16 * 16 + 16 * 16 + 16 * 17 / 2 = 648 entries, 2,592;
    #         stack 8,192                                                                          14,880
    #   RoPE tables: matmul 1,024 out; cat 4,096; cos, sin and their scaling 4 * 4,096              21,504
    #   RMSNorm: pow 16,384; mean 8,320; + eps 256; rsqrt 256; multiply 16,512; weight 16,640        58,368
    #   q_proj 8,192 + 8,192 + 16,640 of weights; k_proj and v_proj 8,192 + 4,096 + 8,320 each      74,240
    #   RoPE on q: -x2 8,192; cat 16,384; * sin 18,432; * cos 18,432; add 24,576                    86,016
    #   RoPE on k: 4,096 + 8,192 + 10,240 + 10,240 + 12,288                                         45,056
    #   repeat_kv of k and v 2 * 12,288; q contiguous 16,384                                        40,960
    #   SDPA: q, k, v and the mask in, 8,192 out 36,864; head merge 16,384; o_proj 32,768           86,016
    #   residual 24,576; RMSNorm 58,368                                                             82,944
    #   gate 45,056; silu 24,576; up 45,056; multiply 36,864; down 45,056; residual 24,576         221,184
    #   final norm                                                                                  58,368
    #                                                                                             805,920
    one = dataclasses.replace(OCR2_TINY, qwen2=dataclasses.replace(OCR2_TINY.qwen2, num_hidden_layers=1))
    r = estimate(500, 400, OCR2_TINY_MODE, config=one, dtype="fp32")
    assert r.stages["qwen2_global"].hbm_bytes_vendor == 805_920


def test_ocr2_traffic_models():
    one, r = estimate(1900, 1250, "ocr2"), estimate(1900, 1250, "ocr2", batch=2)
    for name, s in one.stages.items():
        assert s.hbm_bytes_fused < s.hbm_bytes_vendor, name
        assert 0 < s.activation_bytes_fused <= s.activation_bytes, name
    # each of the 24 layers' SDPA reads the vendor's [6, 1, 288, 288] bf16 mask (6 * 288^2 * 2 B = 995,328) for
    # each of the 2 images; the fused path has no mask
    crops = r.stages["qwen2_crops"]
    assert crops.hbm_bytes_vendor - crops.hbm_bytes_fused > 2 * 24 * 995_328
    # fused, one pass for the batch: bytes = per-image part * batch + per-call part: the query table and cos/sin
    # (read by every layer's attention) per view size, and the weights, charged to the global stage:
    #   crops   144 * 896 * 2 = 258,048 + 24 * 2 * 288 * 64 * 2 = 1,769,472                     2,027,520
    #   global  256 * 896 * 2 = 458,752 + 24 * 2 * 512 * 64 * 2 = 3,145,728 + the weights
    per_call = {name: 2 * one.stages[name].hbm_bytes_fused - r.stages[name].hbm_bytes_fused
                for name in ("qwen2_crops", "qwen2_global")}
    weights = 2 * sum(p.numel() for p in meta_encoder(Ocr2Config()).qwen2_model.parameters()) - 2 * (256 + 144) * 896
    assert per_call == {"qwen2_crops": 2_027_520, "qwen2_global": 458_752 + 3_145_728 + weights}


@pytest.mark.parametrize("kwargs,match", [
    (dict(mode="ocr2", config=EncoderConfig()), "config EncoderConfig is a deepseek-ocr encoder.*expected an Ocr2Config"),
    (dict(mode="gundam", config=Ocr2Config()), "config Ocr2Config is a deepseek-ocr2 encoder.*expected an EncoderConfig"),
    (dict(mode="ocr2", config="tiny"), "config of type str"),
])
def test_ocr2_config_of_the_other_family(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match) as e:
        estimate(2000, 3000, **kwargs)
    assert "\n" not in str(e.value)


def test_ocr2_view_sizes_must_be_the_configs():
    from testutils import OCR2_TINY
    with pytest.raises(ValueError, match="mode base_size=1024: this DeepSeek-OCR 2 encoder takes views of 256 and 192"):
        estimate(2000, 3000, "ocr2", config=OCR2_TINY)


@pytest.mark.parametrize("sizes", [[(1300, 650)], [(500, 400)], [(1300, 650)] * 2, [(700, 2100)]])
def test_ocr2_training_flops_match_flop_counter(sizes):
    # forward + backward of the torch path, measured, against the model's count
    from testutils import OCR2_TINY, OCR2_TINY_MODE, page, randomize
    enc = randomize(GundamEncoder(OCR2_TINY), seed=1)
    batch = preprocess([page(*s, seed=i) for i, s in enumerate(sizes)], OCR2_TINY_MODE)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        enc(batch, backend="torch").embeddings.pow(2).sum().backward()
    est = estimate(*sizes[0], OCR2_TINY_MODE, config=OCR2_TINY, batch=len(sizes), dtype="fp32")
    assert est.total.train_matmul_flops == fc.get_total_flops()


@pytest.mark.parametrize("sizes,chunk", [([(500, 400)], None), ([(1300, 650)] * 2, None), ([(700, 2100)], None),
                                         ([(1300, 650)] * 3, 64)])
def test_ocr2_training_memory_of_the_torch_path(sizes, chunk, monkeypatch):
    # no crops, 2x1 and 1x3 grids, batches of 1 to 3; chunk: the torch path's views in chunks of 64 tokens (two
    # 32-token global views, three 18-token crops), each chunk with its own RoPE tables and mask
    from testutils import OCR2_TINY, OCR2_TINY_MODE, page, randomize
    import gundam.cost.model
    import gundam.model
    if chunk:
        monkeypatch.setattr(gundam.model, "CHUNK_TOKENS", chunk)
        monkeypatch.setattr(gundam.cost.model, "CHUNK_TOKENS", chunk)
    enc = randomize(GundamEncoder(OCR2_TINY), seed=1)
    batch = preprocess([page(*s, seed=i) for i, s in enumerate(sizes)], OCR2_TINY_MODE)
    measured = saved_in_training(enc, batch, "torch", [(gundam.model.SamBlock, "forward"),
                                                       (gundam.model.Qwen2Layer, "forward")])
    est = estimate(*sizes[0], OCR2_TINY_MODE, config=OCR2_TINY, batch=len(sizes), dtype="fp32")
    check_training_memory(est, measured, fused=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ocr2_training_memory_of_the_qwen2_encoder(dtype):
    # the Qwen2 stage alone, in both dtypes (bf16: each RMSNorm keeps an fp32 copy of its input): 3 global views
    # and 2 crops of SAM features
    from testutils import OCR2_TINY, OCR2_TINY_MODE, randomize
    enc = randomize(GundamEncoder(OCR2_TINY), seed=1).to(dtype)
    params = {p.untyped_storage().data_ptr() for p in enc.parameters()}
    for stage, views, image in (("qwen2_global", 3, (500, 400)), ("qwen2_crops", 2, (1540, 770))):
        seen = set()
        saved = [0]

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params and st.data_ptr() not in seen:
                seen.add(st.data_ptr())
                saved[0] += st.nbytes()
            return t
        q = 4 if stage == "qwen2_global" else 3
        x = torch.randn(views, 64, q, q, dtype=dtype, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            enc.qwen2_model(x)
        est = estimate(*image, OCR2_TINY_MODE, config=OCR2_TINY, batch=3 if stage == "qwen2_global" else 1,
                       dtype=dtype)
        assert est.layout.n_crops == (0 if stage == "qwen2_global" else 2)
        assert est.stages[stage].train_saved_bytes == saved[0], stage


def test_ocr2_cli_json_and_train(capsys):
    assert cli("1900x1250", "--mode", "ocr2", "--json") == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["mode"]["family"], d["grid"], d["tokens"]) == ("deepseek-ocr2", [3, 2], 1121)
    assert list(d["stages"]) == list(OCR2_COST_STAGES)
    measured = measured_stages(1900, 1250, "ocr2")
    for name in OCR2_COST_STAGES:
        assert d["stages"][name]["matmul_flops"] == measured[name], name
    assert cli("1900x1250", "--mode", "ocr2", "--train", "--batch", "2") == 0
    out = capsys.readouterr().out
    total = [line.split() for line in out.splitlines() if line.startswith("total")][-1]
    r = estimate(1900, 1250, "ocr2", batch=2)
    assert float(total[1]) == pytest.approx(r.total.train_matmul_flops / 1e9, abs=0.05)
    assert float(total[4]) == pytest.approx(r.total.train_saved_bytes / 1e6, abs=0.05)
    assert "no N x N bias or mask" in out


def test_ocr2_cli_sweep(tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    assert cli("--sweep", "--mode", "ocr2", "--out", str(out)) == 0
    rows = list(csv.DictReader(open(out)))
    crops = [r for r in rows if r["variant"] == "crops"]
    assert len(crops) > 100 and {r["image_size"] for r in rows} == {"768"}
    for c in crops:
        big = int(c["width"]) > 768 or int(c["height"]) > 768
        assert (int(c["n_crops"]) > 0) == big
        assert int(c["tokens"]) == 257 + 144 * int(c["n_crops"])
    for r in (r for r in rows if (r["width"], r["height"]) == ("1024", "768")):
        mode = "ocr2" if r["variant"] == "crops" else dataclasses.replace(MODES["ocr2"], crop_mode=False)
        measured = sum(measured_stages(1024, 768, mode).values())
        assert float(r["matmul_gflops"]) == pytest.approx(measured / 1e9, abs=5e-4), (r, measured)


def test_ocr2_costs_more_than_deepseek_ocr_per_page():
    # a 3x2 page: OCR 2's six 768 px crops (SAM on 2304 tokens each) and 24 Qwen2 layers against Gundam's six
    # 640 px crops and CLIP-L
    ocr2, ocr1 = estimate(1900, 1250, "ocr2"), estimate(1900, 1250, "gundam")
    assert 1.6 < ocr2.total.matmul_flops / ocr1.total.matmul_flops < 1.7


@pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_ocr2_training_memory_of_the_packed_path(n):
    # the Triton path's autograd Functions keep what the model says (in Triton's interpreter): n copies of a 1x2
    # image (global views and crops of two sizes in one pass; the last layer on the query rows)
    import gundam.model
    from testutils import OCR2_TRAIN, OCR2_TRAIN_MODE, page, randomize
    enc = randomize(GundamEncoder(OCR2_TRAIN), seed=3)
    batch = preprocess([page(810, 1700, seed=0)] * n, OCR2_TRAIN_MODE)
    assert batch.grids == [(1, 2)] * n
    measured = saved_in_training(enc, batch, "triton", [(gundam.model.SamBlock, "forward_packed"),
                                                        (gundam.model.Qwen2Layer, "forward_packed")])
    est = estimate(810, 1700, OCR2_TRAIN_MODE, config=OCR2_TRAIN, batch=n, dtype="fp32")
    check_training_memory(est, measured, fused=True)
