"""End-to-end encoder benchmark (GPU): packed Triton path (plain and CUDA-graph replay) vs the torch path vs a
vendor-style per-image loop.

For Gundam pages with no crops, 2x1, 2x2, 3x2 and 3x3 grids, at batch 1 and 8, bf16: min and median latency over
at least --seconds of repetitions (`triton.testing.do_bench`), images/s, peak activation memory, achieved
TFLOP/s over the vendor's FLOPs (gundam.cost) and its share of the dense bf16 peak (--peak-tflops, 790 measured
on an H100 SXM), per stage (SAM, CLIP, projector + layout: CUDA events) and end to end; the Triton output's
error against the torch path in the same dtype. Printed and written as JSON with the environment.

    python bench/encoder.py [--json results.json] [--batches 1,8] [--seconds 1]
    python bench/encoder.py --smoke      # the same code paths on CPU: tiny config, Triton's interpreter, fp32
"""
from __future__ import annotations

import argparse
import json
import os
import sys

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from benchutil import bench_ms, environment, peak_cuda_mb, sdpa_backends  # noqa: E402
from gundam import ClipConfig, EncoderConfig, GundamEncoder, Mode, SamConfig, estimate, preprocess  # noqa: E402

# image sizes giving each Gundam grid (w x h tiles)
GRIDS = {"none": (600, 800), "2x1": (1280, 640), "2x2": (1000, 1000), "3x2": (1900, 1250), "3x3": (1500, 1500)}
STAGE_COST = {"sam": ("sam_global", "sam_crops"), "clip": ("clip_global", "clip_crops"),
              "layout": ("projector_layout",)}


def stage_seconds(enc, batch, backend, runs):
    """Mean seconds per stage over `runs` forwards (EncoderOutput.timings: CUDA events on a GPU)."""
    total = dict.fromkeys(STAGE_COST, 0.0)
    for _ in range(runs):
        t = enc(batch, backend=backend).timings
        for k in total:
            total[k] += t[k] / runs
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seconds", type=float, default=1.0, help="repetitions per point, seconds (default 1)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak to compare with")
    p.add_argument("--json", help="write results here")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    if args.smoke:
        cfg = EncoderConfig(sam=SamConfig(img_size=128, embed_dim=32, depth=2, num_heads=2, window_size=5,
                                          global_attn_indexes=(1,)),
                            clip=ClipConfig(num_layers=1, num_attention_heads=16, ffn_hidden_size=64,
                                            image_size=28, patch_size=14))
        mode, dtype, device = Mode(192, 128, True), torch.float32, torch.device("cpu")
        grids, batches, seconds = {"none": (600, 400), "2x1": (1300, 650)}, [1], 0.0
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/encoder.py needs a CUDA GPU (use --smoke to run its code paths on CPU)")
        cfg, mode, dtype, device = EncoderConfig.deepseek_ocr(), "gundam", torch.bfloat16, torch.device("cuda")
        grids, batches, seconds = GRIDS, [int(b) for b in args.batches.split(",")], args.seconds
    torch.manual_seed(0)
    enc = GundamEncoder(cfg).to(device, dtype).eval()
    env = environment(device)
    print("  ".join(f"{k} {v}" for k, v in env.items()))

    rows = []
    print(f"{'grid':5s} {'batch':>5s} {'path':12s} {'min ms':>9s} {'med ms':>9s} {'img/s':>8s} {'TFLOP/s':>8s} "
          f"{'of peak':>7s} {'peak MB':>8s}")
    for name, (w, h) in grids.items():
        for n in batches:
            images = [Image.new("RGB", (w, h), (40 * i % 255, 90, 160)) for i in range(n)]
            batch = preprocess(images, mode).to(device)
            singles = [preprocess(im, mode).to(device) for im in images]
            est = estimate(w, h, mode, batch=n, config=cfg)
            flops = est.total.matmul_flops
            with torch.inference_mode():
                ref = enc(batch, backend="torch").embeddings.float()
                got = enc(batch, backend="triton").embeddings.float()
                err = (got - ref).abs()
                error = {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
                         "ref_max_abs": ref.abs().max().item()}
                paths = {
                    "triton": lambda: enc(batch, backend="triton"),
                    "torch": lambda: enc(batch, backend="torch"),
                    # the vendor's structure: one image at a time, crops and global view in separate passes
                    "per-image": lambda: [enc(b, backend="torch") for b in singles],
                }
                if device.type == "cuda":
                    graph = enc.capture(batch)
                    paths["triton-graph"] = lambda: graph(batch)
                sdpa = sdpa_backends(paths["torch"])
                for path, fn in paths.items():
                    t = bench_ms(fn, device, seconds)
                    peak = peak_cuda_mb(fn)
                    row = {"grid": name, "batch": n, "path": path, "ms_min": t["min"], "ms_median": t["median"],
                           "runs": t["runs"], "images_per_s": n / t["median"] * 1e3,
                           "tflops": flops / t["median"] / 1e9, "peak_activation_mb": peak}
                    row["of_peak"] = row["tflops"] / args.peak_tflops
                    if path in ("triton", "torch"):
                        st = stage_seconds(enc, batch, path, runs=1 if args.smoke else 10)
                        row["stages"] = {k: {"ms": s * 1e3, "tflops": sum(est.stages[c].matmul_flops
                                                                          for c in STAGE_COST[k]) / s / 1e12 if s else 0}
                                         for k, s in st.items()}
                    if path == "triton":
                        row["error_vs_torch"] = error
                    if path == "torch":
                        row["sdpa"] = sdpa
                    rows.append(row)
                    print(f"{name:5s} {n:5d} {path:12s} {t['min']:9.2f} {t['median']:9.2f} "
                          f"{row['images_per_s']:8.2f} {row['tflops']:8.2f} {row['of_peak']:7.1%} {peak:8.0f}")
                    for k, v in row.get("stages", {}).items():
                        print(f"{'':25s}{k:8s} {v['ms']:9.2f} ms {v['tflops']:8.2f} TFLOP/s "
                              f"{v['tflops'] / args.peak_tflops:7.1%}")
            print(f"{'':25s}triton vs torch ({str(dtype).removeprefix('torch.')}): max |diff| {error['max_abs']:.3g}, "
                  f"mean {error['mean_abs']:.3g} (outputs up to {error['ref_max_abs']:.3g}); torch SDPA: "
                  f"{', '.join(sdpa) or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "peak_tflops": args.peak_tflops, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
