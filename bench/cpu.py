"""CPU benchmark of the torch path: one full-size Gundam image, random weights.

Reports wall time, achieved GFLOP/s against this machine's own matmul rate in the same dtype, peak memory
(process RSS) and, for bfloat16, the output's difference from the fp32 encoder's.

    python bench/cpu.py                  # 1900x1250 page -> 3x2 crops + global view (893 tokens)
    python bench/cpu.py --size 1000x1000 --mode base
    python bench/cpu.py --dtype bfloat16   # what `gundam encode --dtype auto` picks on CPUs with native bf16
    python bench/cpu.py --smoke          # tiny config, seconds
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from gundam import ClipConfig, EncoderConfig, GundamEncoder, Mode, SamConfig, preprocess
from gundam.cli import parse_size


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def matmul_gflops(n: int = 2048, repeat: int = 5, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def measured_flops(enc, batch) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc, \
            torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        enc(batch)
    return fc.get_total_flops()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1900x1250", help="image WIDTHxHEIGHT (default: a 3x2 Gundam page)")
    p.add_argument("--mode", default="gundam")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny config, runs in seconds")
    args = p.parse_args()

    torch.manual_seed(0)
    if args.smoke:
        cfg = EncoderConfig(sam=SamConfig(img_size=256, embed_dim=48, depth=3, num_heads=3, window_size=5,
                                          global_attn_indexes=(1,)),
                            clip=ClipConfig(num_layers=2, num_attention_heads=16, ffn_hidden_size=96))
        mode, size = Mode(256, 192, True), (1300, 650)
    else:
        cfg, mode, size = EncoderConfig.deepseek_ocr(), args.mode, parse_size(args.size)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    batch = preprocess(image, mode)
    dtype = getattr(torch, args.dtype)
    enc = GundamEncoder(cfg).eval()
    with torch.inference_mode():
        ref = enc(batch).embeddings if dtype != torch.float32 else None    # the fp32 output, to compare with
    enc = enc.to(dtype)
    rss_loaded = rss_mb()

    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = enc(batch)
        times.append(time.perf_counter() - t0)
    peak = rss_mb()
    with torch.device("meta"):  # FLOPs of the same forward, counted on the meta device (no memory, no time)
        meta_enc = GundamEncoder(cfg).eval()
    flops = measured_flops(meta_enc, batch.to("meta"))
    rate = matmul_gflops(dtype=dtype)
    best = min(times)
    res = {
        "size": f"{size[0]}x{size[1]}", "grid": batch.grids[0], "tokens": batch.tokens[0],
        "threads": torch.get_num_threads(), "seconds": best, "all_seconds": times,
        "gflop": flops / 1e9, "achieved_gflops": flops / best / 1e9, "matmul_gflops": rate,
        "floor_seconds": flops / rate / 1e9, "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded,
        "stages": out.timings, "dtype": args.dtype,
    }
    if ref is not None:
        err = (out.embeddings.float() - ref).abs()
        res["error_vs_fp32"] = {"max_abs": err.max().item(), "mean_abs": err.mean().item(),
                                "ref_max_abs": ref.abs().max().item(), "ref_mean_abs": ref.abs().mean().item()}
    print(f"image {res['size']}  grid {res['grid'][0]}x{res['grid'][1]}  tokens {res['tokens']}  "
          f"threads {res['threads']}")
    print(f"time {best:.2f} s (runs: {', '.join(f'{t:.2f}' for t in times)})  "
          f"stages: {', '.join(f'{k} {v:.2f}s' for k, v in out.timings.items())}")
    print(f"work {flops / 1e9:.0f} GFLOP -> {res['achieved_gflops']:.1f} GFLOP/s; this machine's {args.dtype} matmul "
          f"{rate:.1f} GFLOP/s; FLOP floor {res['floor_seconds']:.2f} s ({res['floor_seconds'] / best:.0%} of it)")
    print(f"peak RSS {peak:.0f} MB (after building the model: {rss_loaded:.0f} MB)")
    if ref is not None:
        e = res["error_vs_fp32"]
        print(f"{args.dtype} vs fp32 output: max |diff| {e['max_abs']:.3g}, mean {e['mean_abs']:.3g} (fp32 output: "
              f"max |x| {e['ref_max_abs']:.3g}, mean {e['ref_mean_abs']:.3g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
