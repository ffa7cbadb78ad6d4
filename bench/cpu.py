"""The CPU benchmark: the CPU fast path (backend "cpu", what "auto" runs on a CPU) against the torch reference
path and the vendor's own encoder modules, on a full-size page with random weights, in one run.

Each dtype's methods run interleaved (A B C A B C ..., after one warm-up each) and report the median of
--repeat runs, so a busy machine slows all of them alike. Also: per-stage times, the GEMM floor of the page (the
matrix products of the vendor's computation, recorded during a run of the torch reference path: its linears,
convolutions and the two products of each attention call, each timed alone with the fastest GEMM this torch has),
peak memory (weights + the largest resident-memory rise during a run, sampled), the fast path's error against
the fp32 reference, and, for --batches above 1, the fast path's cost per page of a batch of identical pages.
Prints the CPU model and flags (AMX, AVX512-BF16, AVX2), threads, torch and oneDNN versions; --json writes it all.

    python bench/cpu.py --vendor DeepSeek-OCR/          # fp32, a 3x2 Gundam page (1900x1250), vendor included
    python bench/cpu.py --dtype bfloat16 --vendor ...   # bf16 (native on AVX512-BF16 / AMX CPUs)
    python bench/cpu.py --family ocr2                   # DeepSeek-OCR 2's encoder (no vendor rows)
    python bench/cpu.py --batches 1,8 --repeat 1        # + the fast path on a batch of 8 pages
    python bench/cpu.py --smoke                         # tiny config, seconds
--vendor (or GUNDAM_DEEPSEEK_OCR_REPO) is a checkout of github.com/deepseek-ai/DeepSeek-OCR; it needs `easydict`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from benchutil import OCR2_TINY, OCR2_TINY_MODE, TINY, TINY_MODE
from gundam import EncoderConfig, GundamEncoder, Ocr2Config, preprocess
from gundam.cli import parse_size
from gundam.model import ONEDNN_DTYPES, ONEDNN_LINEAR


def cpu_info() -> dict:
    """The CPU model and the flags that decide the matmul rates."""
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.M).group(1).split()) if "flags" in text else set()
    model = re.search(r"^model name\s*:(.*)$", text, re.M)
    config = torch.__config__.show()
    onednn = re.search(r"oneDNN v([0-9.]+)|MKL-DNN v([0-9.]+)", config)
    return {"model": model.group(1).strip() if model else platform.processor(),
            "amx": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags, "avx512f": "avx512f" in flags,
            "avx2": "avx2" in flags, "logical_cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "onednn": next((g for g in onednn.groups() if g), None) if onednn else None}


class PeakRSS:
    """The largest resident-memory rise (MB) over the `with` block, sampled every 2 ms from /proc/self/statm."""

    def __enter__(self):
        self.base = self.peak = self.now()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def sample(self):
        while not self.done.wait(0.002):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())
        self.rise_mb = (self.peak - self.base) / 2 ** 20


class MatmulShapes(TorchDispatchMode):
    """Records the (batch, m, k, n) of every matrix product a forward runs: linears, bmm, the two products of
    each attention call, convolutions as the GEMMs they are."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__      # composite ops (linear, conv2d, SDPA) arrive whole here
        if name in ("linear", "_linear_pointwise"):
            x, w = args[:2]
            self.shapes.append((1, x.numel() // x.shape[-1], x.shape[-1], w.shape[0]))
        elif name in ("mm", "addmm"):
            a, b = args[1:3] if name == "addmm" else args[:2]
            self.shapes.append((1, a.shape[0], a.shape[1], b.shape[1]))
        elif name in ("bmm", "baddbmm", "baddbmm_"):
            a, b = args[1:3] if name.startswith("baddbmm") else args[:2]
            self.shapes.append((a.shape[0], a.shape[1], a.shape[2], b.shape[2]))
        elif "scaled_dot_product" in name:
            q, k, v = args[:3]
            heads = q.numel() // (q.shape[-2] * q.shape[-1])
            self.shapes.append((heads, q.shape[-2], q.shape[-1], k.shape[-2]))     # q k^T
            self.shapes.append((heads, q.shape[-2], k.shape[-2], v.shape[-1]))     # p v
        elif name in ("conv2d", "convolution", "mkldnn_convolution"):
            w = args[1]
            self.shapes.append((1, out.numel() // out.shape[1], w[0].numel(), w.shape[0]))
        return out


def gemm_floor(shapes, dtype, repeat: int = 3) -> float:
    """Seconds the recorded matrix products take alone, each with the fastest GEMM this torch has for it
    (F.linear's MKL, oneDNN's inner product, bmm), best of `repeat`."""
    total, seen = 0.0, {}
    for shape in shapes:
        if shape not in seen:
            batch, m, k, n = shape
            a, b = torch.randn(batch, m, k, dtype=dtype), torch.randn(batch, k, n, dtype=dtype)
            fns = [lambda: torch.bmm(a, b)]
            if batch == 1:
                w = b[0].t().contiguous()
                fns.append(lambda: F.linear(a[0], w))
                if ONEDNN_LINEAR and dtype in ONEDNN_DTYPES:
                    fns.append(lambda: torch.ops.mkldnn._linear_pointwise(a[0], w, None, "none", [], ""))
            best = float("inf")
            for fn in fns:
                fn()
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    fn()
                    best = min(best, time.perf_counter() - t0)
            seen[shape] = best
        total += seen[shape]
    return total


def vendor_runner(repo, enc, dtype):
    """The vendor's `_pixel_values_to_embedding` over a batch (its per-image loop), with enc's weights."""
    sys.path.insert(0, os.path.dirname(__file__))
    from vendor_model import vendor_like
    model = vendor_like(repo, enc, float32=dtype == torch.float32)

    def run(batch):
        pv, ic, sc = batch.to_vendor()
        return torch.cat(model._pixel_values_to_embedding(pv.to(dtype), ic.to(dtype), sc))
    return model, run


def compiled_runner(enc, batch):
    """The fast path with each stage's module under torch.compile (inductor), and the first call's seconds."""
    from gundam.model import encode
    from gundam.output import TIMED_STAGES, StageTimer
    stages = [enc.sam_model, enc.qwen2_model if enc.family == "deepseek-ocr2" else enc.vision_model, enc.projector]
    compiled = [torch.compile(module.forward_cpu) for module in stages]

    def run(b):
        for module, fn in zip(stages, compiled):   # for this call only: the "cpu" rows stay eager
            module.forward_cpu = fn
        try:
            return encode(enc, b, StageTimer(enc.device, TIMED_STAGES[enc.family]), fast=True)
        finally:
            for module in stages:
                del module.forward_cpu
    t0 = time.perf_counter()
    with torch.inference_mode():
        run(batch)
    return run, time.perf_counter() - t0


def param_mb(module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="1900x1250", help="page WIDTHxHEIGHT (default: a 3x2 Gundam page)")
    p.add_argument("--family", default="ocr", choices=["ocr", "ocr2"], help="DeepSeek-OCR or DeepSeek-OCR 2")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "both"])
    p.add_argument("--repeat", type=int, default=3, help="timed runs per method (median), after one warm-up")
    p.add_argument("--batches", default="1", help="batch sizes; above 1 times the fast path only (per page)")
    p.add_argument("--batch-repeat", type=int, default=1, help="timed runs per batch size above 1 (median)")
    p.add_argument("--vendor", default=os.environ.get("GUNDAM_DEEPSEEK_OCR_REPO"),
                   help="a DeepSeek-OCR checkout: time the vendor's modules too (default: $GUNDAM_DEEPSEEK_OCR_REPO)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    p.add_argument("--compile", action="store_true",
                   help="also time the fast path's SAM and CLIP (or Qwen2) under torch.compile (inductor), with the "
                        "compile time")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny config, runs in seconds")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    ocr2 = args.family == "ocr2"
    if args.smoke:
        cfg, mode, size = (OCR2_TINY, OCR2_TINY_MODE, (900, 500)) if ocr2 else (TINY, TINY_MODE, (1300, 650))
    else:
        cfg = Ocr2Config.deepseek_ocr2() if ocr2 else EncoderConfig.deepseek_ocr()
        mode, size = ("ocr2" if ocr2 else "gundam"), parse_size(args.size)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    batch = preprocess(image, mode)
    enc = GundamEncoder(cfg).eval()
    for param in enc.parameters():   # random weights of a trained model's scale (zero-init tables would hide work)
        torch.nn.init.normal_(param, std=0.02)
    res = {"cpu": cpu_info(), "family": enc.family, "size": f"{size[0]}x{size[1]}", "grid": batch.grids[0],
           "tokens": batch.tokens[0], "rows": []}
    c = res["cpu"]
    print(f"cpu: {c['model']} | AMX {c['amx']} AVX512-BF16 {c['avx512_bf16']} AVX512F {c['avx512f']} AVX2 "
          f"{c['avx2']} | threads {c['threads']} | torch {c['torch']} oneDNN {c['onednn']}")
    print(f"{enc.family}: page {res['size']}, grid {batch.grids[0][0]}x{batch.grids[0][1]}, {res['tokens']} tokens")

    with torch.inference_mode():
        ref = enc(batch, backend="torch").embeddings                   # fp32 reference
    dtypes = ["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]
    for dname in dtypes:
        dtype = getattr(torch, dname)
        enc = enc.to(dtype)
        methods = {"cpu": lambda b: enc(b, backend="cpu").embeddings,
                   "torch": lambda b: enc(b, backend="torch").embeddings}
        weights = {"cpu": param_mb(enc), "torch": param_mb(enc)}
        if args.vendor and not ocr2:
            vendor, methods["vendor"] = vendor_runner(args.vendor, enc, dtype)
            weights["vendor"] = param_mb(vendor)
        if args.compile:
            methods["compiled"], compile_s = compiled_runner(enc, batch)
            weights["compiled"] = param_mb(enc)
            res.setdefault("compile_seconds", {})[dname] = compile_s
            print(f"torch.compile: first call {compile_s:.1f} s (compiling included)")
        times = {name: [] for name in methods}
        peaks = {name: 0.0 for name in methods}
        outs, stages = {}, {}
        with torch.inference_mode():
            for name, fn in methods.items():                           # warm-up (tables cached, pages touched)
                outs[name] = fn(batch).float()
            for _ in range(args.repeat):
                for name, fn in methods.items():
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        fn(batch)
                        times[name].append(time.perf_counter() - t0)
                    peaks[name] = max(peaks[name], mem.rise_mb)
            for name in ("cpu", "torch"):
                stages[name] = enc(batch, backend=name).timings
            with MatmulShapes() as rec:       # the reference path's products: the vendor's computation
                enc(batch, backend="torch")
        floor = gemm_floor(rec.shapes, dtype)
        for name in methods:
            med = statistics.median(times[name])
            err = (outs[name] - ref).abs()
            row = {"dtype": dname, "method": name, "batch": 1, "seconds_median": med, "seconds_all": times[name],
                   "stages": stages.get(name), "peak_mb": weights[name] + peaks[name],
                   "activation_peak_mb": peaks[name], "weights_mb": weights[name], "gemm_floor_seconds": floor,
                   "floor_share": floor / med, "error_vs_fp32_torch": {
                       "max_abs": err.max().item(), "mean_abs": err.mean().item(),
                       "ref_max_abs": ref.abs().max().item(), "ref_mean_abs": ref.abs().mean().item()}}
            res["rows"].append(row)
        base = {r["method"]: r for r in res["rows"] if r["dtype"] == dname}
        print(f"\n{dname}: GEMM floor {floor:.2f} s ({len(rec.shapes)} products)")
        for name, row in base.items():
            e = row["error_vs_fp32_torch"]
            ratio = (f"  {row['seconds_median'] / base['vendor']['seconds_median']:.2f}x vendor time, "
                     f"{row['peak_mb'] / base['vendor']['peak_mb']:.2f}x its memory" if "vendor" in base else "")
            st = f"  [{', '.join(f'{k} {v:.2f}s' for k, v in row['stages'].items())}]" if row["stages"] else ""
            print(f"  {name:7s} {row['seconds_median']:7.2f} s (runs {', '.join(f'{t:.2f}' for t in row['seconds_all'])})"
                  f"  {row['floor_share']:.0%} of floor  peak {row['peak_mb']:.0f} MB{ratio}{st}")
            print(f"          vs fp32 torch: max |diff| {e['max_abs']:.3g}, mean {e['mean_abs']:.3g} "
                  f"(output max {e['ref_max_abs']:.3g}, mean {e['ref_mean_abs']:.3g})")
        for n in (int(b) for b in args.batches.split(",") if int(b) > 1):
            big = preprocess([image] * n, mode)
            runs = []
            with torch.inference_mode():   # warm from the batch-1 runs
                for _ in range(args.batch_repeat):
                    with PeakRSS() as mem:
                        t0 = time.perf_counter()
                        enc(big, backend="cpu")
                        runs.append(time.perf_counter() - t0)
            per_page = statistics.median(runs) / n
            res["rows"].append({"dtype": dname, "method": "cpu", "batch": n, "seconds_median": statistics.median(runs),
                                "seconds_all": runs, "seconds_per_page": per_page,
                                "activation_peak_mb": mem.rise_mb, "peak_mb": weights["cpu"] + mem.rise_mb})
            print(f"  cpu, batch {n}: {per_page:.2f} s per page ({per_page / base['cpu']['seconds_median']:.2f}x "
                  f"batch 1), peak {weights['cpu'] + mem.rise_mb:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
