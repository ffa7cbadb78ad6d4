"""End-to-end encoder benchmark (GPU): packed Triton path vs torch path vs a vendor-style per-image loop.

For Gundam pages with no crops, 2x1, 2x2, 3x2 and 3x3 grids, at batch 1 and 8, bf16: median latency
(`triton.testing.do_bench`), images/s, peak activation memory, achieved TFLOP/s over the vendor's FLOPs (gundam.cost) and the share
of the roofline floor of the fused traffic model. Results are printed and written as JSON.

    python bench/encoder.py [--gpu h100] [--json results.json]
    python bench/encoder.py --smoke      # the same code paths on CPU: tiny config, Triton's interpreter, fp32
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

from benchutil import peak_cuda_mb  # noqa: E402
from gundam import cost  # noqa: E402
from gundam import ClipConfig, EncoderConfig, GundamEncoder, Mode, SamConfig, preprocess  # noqa: E402

# image sizes giving each Gundam grid (w x h tiles)
GRIDS = {"none": (600, 800), "2x1": (1280, 640), "2x2": (1000, 1000), "3x2": (1900, 1250), "3x3": (1500, 1500)}


def timed(fn, device):
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=3, rep=20, return_mode="median") / 1e3
    fn()  # CPU: warm the table caches, then one timed run
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", default="h100", choices=sorted(cost.GPUS))
    p.add_argument("--batches", default="1,8")
    p.add_argument("--json", help="write results here")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    if args.smoke:
        cfg = EncoderConfig(sam=SamConfig(img_size=128, embed_dim=32, depth=2, num_heads=2, window_size=5,
                                          global_attn_indexes=(1,)),
                            clip=ClipConfig(num_layers=1, num_attention_heads=16, ffn_hidden_size=64,
                                            image_size=28, patch_size=14))
        mode, dtype, device = Mode(192, 128, True), torch.float32, torch.device("cpu")
        grids, batches = {"none": (600, 400), "2x1": (1300, 650)}, [1]
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/encoder.py needs a CUDA GPU (or --smoke for a CPU check of the code paths)")
        cfg, mode, dtype, device = EncoderConfig.deepseek_ocr(), "gundam", torch.bfloat16, torch.device("cuda")
        grids, batches = GRIDS, [int(b) for b in args.batches.split(",")]
    torch.manual_seed(0)
    enc = GundamEncoder(cfg).to(device, dtype).eval()
    gpu = cost.get_gpu(args.gpu)

    rows = []
    print(f"{'grid':5s} {'batch':>5s} {'path':8s} {'ms':>9s} {'img/s':>8s} {'TFLOP/s':>8s} {'floor':>6s} {'peak MB':>8s}")
    for name, (w, h) in grids.items():
        for n in batches:
            images = [Image.new("RGB", (w, h), (40 * i % 255, 90, 160)) for i in range(n)]
            batch = preprocess(images, mode).to(device, dtype)
            singles = [preprocess(im, mode).to(device, dtype) for im in images]
            est = cost.estimate(w, h, mode, batch=n, config=cfg)
            flops = est.total.matmul_flops
            floor_s = est.floor(gpu)["total"][1].seconds
            paths = {
                "triton": lambda: enc(batch, backend="triton"),
                "torch": lambda: enc(batch, backend="torch"),
                # the vendor's structure: one image at a time, crops and global view in separate passes
                "per-image": lambda: [enc(b, backend="torch") for b in singles],
            }
            for path, fn in paths.items():
                with torch.inference_mode():
                    s = timed(fn, device)
                    peak = peak_cuda_mb(fn)
                row = {"grid": name, "batch": n, "path": path, "ms": s * 1e3, "images_per_s": n / s,
                       "tflops": flops / s / 1e12, "floor_share": floor_s / s, "peak_activation_mb": peak, "gpu": gpu.name}
                rows.append(row)
                print(f"{name:5s} {n:5d} {path:8s} {row['ms']:9.2f} {row['images_per_s']:8.2f} "
                      f"{row['tflops']:8.3f} {row['floor_share']:6.1%} {peak:8.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
