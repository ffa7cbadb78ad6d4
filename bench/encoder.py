"""End-to-end encoder benchmark (GPU): packed Triton path (plain and CUDA-graph replay) vs the torch path vs a
vendor-style per-image loop.

For Gundam pages with no crops, 2x1, 2x2, 3x2 and 3x3 grids, at batch 1 and 8, bf16: min and median latency over
at least --seconds of repetitions (`triton.testing.do_bench`), images/s, peak activation memory, achieved
TFLOP/s over the vendor's FLOPs (gundam.cost) and its share of the dense bf16 peak (--peak-tflops, 790 measured
on an H100 SXM), per stage (SAM, CLIP, projector + layout: CUDA events) and end to end; the Triton output's
error against the torch path in the same dtype, and the CUDA-graph replay's against the eager Triton output.
Printed and written as JSON with the environment. --ocr2: DeepSeek-OCR 2's encoder at its own mode (stages SAM,
Qwen2, projector + layout).

    python bench/encoder.py [--json results.json] [--grids 3x2] [--batches 1,8] [--paths triton,torch] [--seconds 1]
    python bench/encoder.py --smoke      # the same code paths on CPU: tiny config, Triton's interpreter, fp32

`run(args)` (args from `parse_args`) does the measuring and returns what --json writes: bench/gpu.py calls it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchutil import OCR2_TRAIN, SMALL, SMALL_MODE, bench_ms, environment, peak_cuda_mb, sdpa_backends  # noqa: E402
from gundam import EncoderConfig, GundamEncoder, Ocr2Config, estimate, preprocess  # noqa: E402

# image sizes giving each Gundam grid (w x h tiles)
GRIDS = {"none": (600, 800), "2x1": (1280, 640), "2x2": (1000, 1000), "3x2": (1900, 1250), "3x3": (1500, 1500)}
SMOKE_GRIDS = {"none": (600, 400), "2x1": (1300, 650)}
PATHS = ("triton", "torch", "per-image", "triton-graph")
# timed stage -> the cost model's stages it covers, per family
STAGE_COST = {"sam": ("sam_global", "sam_crops"), "clip": ("clip_global", "clip_crops"),
              "qwen2": ("qwen2_global", "qwen2_crops"), "layout": ("projector_layout",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", help=f"comma-separated, of {','.join(GRIDS)} (default: all; --smoke: "
                                   f"{','.join(SMOKE_GRIDS)})")
    p.add_argument("--batches", help="comma-separated (default 1,8; --smoke: 1)")
    p.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {','.join(PATHS)} (default: all)")
    p.add_argument("--ocr2", action="store_true", help="DeepSeek-OCR 2's encoder at mode ocr2")
    p.add_argument("--seconds", type=float, default=1.0, help="repetitions per point, seconds (default 1)")
    p.add_argument("--stage-runs", type=int, help="forwards averaged for the per-stage times (default 10, "
                                                  "--smoke 1; 0: no stage times)")
    p.add_argument("--budget", type=float, default=0.0, help="start no new point after this many seconds "
                                                             "(0: no limit); skipped points are listed")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak to compare with")
    p.add_argument("--json", help="write results here")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def build(args):
    """The encoder, its config and mode, dtype and device: the real one in bf16 on CUDA, or with --smoke a tiny
    one in fp32 on CPU. Random weights from seed 0."""
    if args.smoke:
        cfg = OCR2_TRAIN if args.ocr2 else SMALL     # OCR2_TRAIN: quick in the interpreter
        mode, dtype, device = cfg.mode if args.ocr2 else SMALL_MODE, torch.float32, torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/encoder.py needs a CUDA GPU (use --smoke to run its code paths on CPU)")
        cfg = Ocr2Config.deepseek_ocr2() if args.ocr2 else EncoderConfig.deepseek_ocr()
        mode, dtype, device = cfg.mode if args.ocr2 else "gundam", torch.bfloat16, torch.device("cuda")
    torch.manual_seed(0)
    enc = GundamEncoder(cfg).to(device, dtype).eval()
    return enc, cfg, mode, dtype, device


def page_batches(size, n, mode, device):
    """n distinct synthetic pages of `size` as one batch, and as n single-image batches (the per-image loop)."""
    images = [Image.new("RGB", size, (40 * i % 255, 90, 160)) for i in range(n)]
    return preprocess(images, mode).to(device), [preprocess(im, mode).to(device) for im in images]


def max_mean_error(got, ref) -> dict:
    err = (got.float() - ref.float()).abs()
    return {"max_abs": err.max().item(), "mean_abs": err.mean().item(), "ref_max_abs": ref.abs().max().item()}


def error_vs_torch(enc, batch) -> dict:
    """The Triton output's error against the torch path's, same weights and dtype."""
    with torch.inference_mode():
        return max_mean_error(enc(batch, backend="triton").embeddings, enc(batch, backend="torch").embeddings)


def stage_seconds(enc, batch, backend, runs):
    """Mean seconds per stage over `runs` forwards (EncoderOutput.timings: CUDA events on a GPU)."""
    total = {}
    for _ in range(runs):
        for k, v in enc(batch, backend=backend).timings.items():
            total[k] = total.get(k, 0.0) + v / runs
    return total


def capture_timed(enc, batch):
    """CUDA-graph capture of the Triton forward (gundam.graphs): the graph, the ms its capture took (warm-up runs
    included) and its peak CUDA memory above what was allocated before it, MB (a replay allocates nothing: it
    runs in the graph's own pool)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    graph = enc.capture(batch)
    torch.cuda.synchronize()
    return graph, (time.perf_counter() - t0) * 1e3, (torch.cuda.max_memory_allocated() - base) / 2**20


def run(args) -> dict:
    enc, cfg, mode, dtype, device = build(args)
    grids = SMOKE_GRIDS if args.smoke else GRIDS
    if args.grids:
        if unknown := set(args.grids.split(",")) - set(grids):
            raise SystemExit(f"--grids {args.grids}: unknown {','.join(sorted(unknown))}, expected some of "
                             f"{','.join(grids)}")
        grids = {g: grids[g] for g in args.grids.split(",")}
    batches = [int(b) for b in (args.batches or ("1" if args.smoke else "1,8")).split(",")]
    paths = args.paths.split(",")
    if unknown := set(paths) - set(PATHS):
        raise SystemExit(f"--paths {args.paths}: unknown {','.join(sorted(unknown))}, expected some of "
                         f"{','.join(PATHS)}")
    seconds = 0.0 if args.smoke else args.seconds
    stage_runs = args.stage_runs if args.stage_runs is not None else 1 if args.smoke else 10
    skipped = []
    if "triton-graph" in paths and device.type != "cuda":
        skipped.append("triton-graph: CUDA graphs need a CUDA device")
        paths.remove("triton-graph")
    t_end = time.monotonic() + args.budget if args.budget > 0 else float("inf")
    env = environment(device)
    print("  ".join(f"{k} {v}" for k, v in env.items()))

    rows = []
    print(f"{'grid':5s} {'batch':>5s} {'path':12s} {'min ms':>9s} {'med ms':>9s} {'img/s':>8s} {'TFLOP/s':>8s} "
          f"{'of peak':>7s} {'peak MB':>8s}")
    for name, (w, h) in grids.items():
        for n in batches:
            batch, singles = page_batches((w, h), n, mode, device)
            est = estimate(w, h, mode, batch=n, config=cfg)
            flops = est.total.matmul_flops
            with torch.inference_mode():
                error, eager = None, None
                if "triton" in paths or "triton-graph" in paths:
                    eager = enc(batch, backend="triton").embeddings.float()
                if "triton" in paths and "torch" in paths:
                    error = max_mean_error(eager, enc(batch, backend="torch").embeddings)
                fns = {
                    "triton": lambda: enc(batch, backend="triton"),
                    "torch": lambda: enc(batch, backend="torch"),
                    # the vendor's structure: one image at a time, crops and global view in separate passes
                    "per-image": lambda: [enc(b, backend="torch") for b in singles],
                }
                sdpa = sdpa_backends(fns["torch"]) if "torch" in paths else None
                for path in paths:
                    if time.monotonic() > t_end:
                        skipped.append(f"{name} batch {n} {path}: time budget ({args.budget:g} s) spent")
                        continue
                    row = {"grid": name, "tiles": list(batch.layouts[0].grid), "batch": n, "path": path}
                    fn = fns.get(path)
                    if path == "triton-graph":
                        graph, row["capture_ms"], row["capture_peak_mb"] = capture_timed(enc, batch)
                        row["vs_eager"] = max_mean_error(graph(batch).embeddings, eager)
                        fn = lambda: graph(batch)   # noqa: E731
                    t = bench_ms(fn, device, seconds)
                    peak = peak_cuda_mb(fn)
                    row.update({"ms_min": t["min"], "ms_median": t["median"], "runs": t["runs"],
                                "images_per_s": n / t["median"] * 1e3, "tflops": flops / t["median"] / 1e9,
                                "peak_activation_mb": peak})
                    row["of_peak"] = row["tflops"] / args.peak_tflops
                    if path in ("triton", "torch") and stage_runs > 0:
                        st = stage_seconds(enc, batch, path, stage_runs)
                        row["stages"] = {k: {"ms": s * 1e3, "tflops": sum(est.stages[c].matmul_flops
                                                                          for c in STAGE_COST[k]) / s / 1e12 if s else 0}
                                         for k, s in st.items()}
                    if path == "triton" and error:
                        row["error_vs_torch"] = error
                    if path == "torch":
                        row["sdpa"] = sdpa
                    rows.append(row)
                    print(f"{name:5s} {n:5d} {path:12s} {t['min']:9.2f} {t['median']:9.2f} "
                          f"{row['images_per_s']:8.2f} {row['tflops']:8.2f} {row['of_peak']:7.1%} {peak:8.0f}")
                    for k, v in row.get("stages", {}).items():
                        print(f"{'':25s}{k:8s} {v['ms']:9.2f} ms {v['tflops']:8.2f} TFLOP/s "
                              f"{v['tflops'] / args.peak_tflops:7.1%}")
                    if "vs_eager" in row:
                        print(f"{'':25s}capture {row['capture_ms']:.0f} ms, peak {row['capture_peak_mb']:.0f} MB; "
                              f"replay vs eager: max |diff| {row['vs_eager']['max_abs']:.3g}")
            if error:
                print(f"{'':25s}triton vs torch ({str(dtype).removeprefix('torch.')}): max |diff| "
                      f"{error['max_abs']:.3g}, mean {error['mean_abs']:.3g} (outputs up to "
                      f"{error['ref_max_abs']:.3g}); torch SDPA: {', '.join(sdpa) or 'none'}")
    for s in skipped:
        print(f"skipped: {s}")
    return {"environment": env, "family": "deepseek-ocr2" if args.ocr2 else "deepseek-ocr",
            "dtype": str(dtype).removeprefix("torch."), "peak_tflops": args.peak_tflops, "rows": rows,
            "skipped": skipped}


def main():
    args = parse_args()
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
