"""Training-step benchmark (GPU): forward + backward of the encoder, packed Triton path vs the torch path, with
and without activation checkpointing.

For batches of Gundam 3x2 pages (1900x1250 px: six 640 px crops and a 1024 px global view each) in bf16: min and
median step time (`triton.testing.do_bench`), the peak CUDA memory of a step above the weights
(`torch.cuda.max_memory_allocated`: activations, the gradients and the backward's temporaries), and beside it
the cost model's activation memory (`gundam cost --train`: what autograd keeps for the backward). The loss is
the mean square of the embeddings; gradients are dropped (set to None) between steps, as `zero_grad` does.

    python bench/train.py [--batches 1,4] [--seconds 1] [--json results.json]
    python bench/train.py --ocr2       # DeepSeek-OCR 2's encoder (mode ocr2: six 768 px crops of the page)
    python bench/train.py --smoke      # tiny config on CPU in seconds: the torch path, and the Triton path
                                       # too when TRITON_INTERPRET=1 is set

`run(args)` (args from `parse_args`) does the measuring and returns what --json writes: bench/gpu.py calls it.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from PIL import Image

from benchutil import OCR2_TRAIN, OCR2_TRAIN_MODE, TRAIN, TRAIN_MODE, bench_ms, environment, peak_cuda_mb
from gundam import EncoderConfig, GundamEncoder, Ocr2Config, estimate, preprocess

PAGE = (1900, 1250)   # Gundam grid 3x2
SMOKE_PAGE = (650, 1300)   # grid 1x2


def step(enc, batch, backend):
    enc.zero_grad(set_to_none=True)
    out = enc(batch, backend=backend).embeddings
    out.float().pow(2).mean().backward()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seconds", type=float, default=1.0, help="repetitions per point, seconds (default 1)")
    p.add_argument("--budget", type=float, default=0.0, help="start no new point after this many seconds "
                                                             "(0: no limit); skipped points are listed")
    p.add_argument("--ocr2", action="store_true", help="DeepSeek-OCR 2's encoder at mode ocr2")
    p.add_argument("--json", help="write results here")
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def run(args) -> dict:
    backends = ["triton", "torch"]
    if args.smoke:
        cfg, mode = (OCR2_TRAIN, OCR2_TRAIN_MODE) if args.ocr2 else (TRAIN, TRAIN_MODE)
        dtype, device = torch.float32, torch.device("cpu")
        batches, seconds, page = [1], 0.0, SMOKE_PAGE
        if os.environ.get("TRITON_INTERPRET") != "1":
            backends = ["torch"]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/train.py needs a CUDA GPU (use --smoke to run its code paths on CPU)")
        cfg = Ocr2Config.deepseek_ocr2() if args.ocr2 else EncoderConfig.deepseek_ocr()
        mode, dtype, device = cfg.mode if args.ocr2 else "gundam", torch.bfloat16, torch.device("cuda")
        batches, seconds, page = [int(b) for b in args.batches.split(",")], args.seconds, PAGE
    torch.manual_seed(0)
    enc = GundamEncoder(cfg).to(device, dtype).train()
    env = environment(device)
    print("  ".join(f"{k} {v}" for k, v in env.items()))

    rows, skipped = [], []
    t_end = time.monotonic() + args.budget if args.budget > 0 else float("inf")
    print(f"{'batch':>5s} {'path':7s} {'ckpt':>4s} {'min ms':>9s} {'med ms':>9s} {'peak MB':>9s} {'model MB':>9s}")
    for n in batches:
        images = [Image.new("RGB", page, (40 * i % 255, 90, 160)) for i in range(n)]
        batch = preprocess(images, mode).to(device)
        est = estimate(*page, mode, batch=n, config=cfg, dtype=str(dtype).removeprefix("torch."))
        for backend in backends:
            for ckpt in (False, True):
                if time.monotonic() > t_end:
                    skipped.append(f"batch {n} {backend} checkpointing {ckpt}: time budget ({args.budget:g} s) spent")
                    continue
                if ckpt:
                    enc.gradient_checkpointing_enable()
                else:
                    enc.gradient_checkpointing_disable()
                fn = lambda: step(enc, batch, backend)   # noqa: E731
                t = bench_ms(fn, device, seconds)
                enc.zero_grad(set_to_none=True)
                peak = peak_cuda_mb(fn)
                model = est.total.train_activation_bytes(fused=backend == "triton", checkpointing=ckpt) / 2**20
                rows.append({"batch": n, "path": backend, "checkpointing": ckpt, "ms_min": t["min"],
                             "ms_median": t["median"], "runs": t["runs"], "peak_mb": peak, "model_activation_mb": model})
                print(f"{n:5d} {backend:7s} {'yes' if ckpt else 'no':>4s} {t['min']:9.2f} {t['median']:9.2f} "
                      f"{peak:9.1f} {model:9.1f}")
    enc.gradient_checkpointing_disable()
    for s in skipped:
        print(f"skipped: {s}")
    return {"environment": env, "family": "deepseek-ocr2" if args.ocr2 else "deepseek-ocr", "page": page,
            "dtype": str(dtype).removeprefix("torch."), "rows": rows, "skipped": skipped}


def main():
    args = parse_args()
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
