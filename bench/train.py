"""Training-step benchmark (GPU): forward + backward of the encoder, packed Triton path vs the torch path, with
and without activation checkpointing.

For batches of Gundam 3x2 pages (1900x1250 px: six 640 px crops and a 1024 px global view each) in bf16: min and
median step time (`triton.testing.do_bench`), the peak CUDA memory of a step above the weights
(`torch.cuda.max_memory_allocated`: activations, the gradients and the backward's temporaries), and beside it
the cost model's activation memory (`gundam cost --train`: what autograd keeps for the backward). The loss is
the mean square of the embeddings; gradients are dropped (set to None) between steps, as `zero_grad` does.

    python bench/train.py [--batches 1,4] [--seconds 1] [--json results.json]
    python bench/train.py --smoke      # tiny config on CPU in seconds: the torch path, and the Triton path
                                       # too when TRITON_INTERPRET=1 is set
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from PIL import Image

from benchutil import bench_ms, environment, peak_cuda_mb
from gundam import ClipConfig, EncoderConfig, GundamEncoder, Mode, ProjectorConfig, SamConfig, estimate, preprocess

PAGE = (1900, 1250)   # Gundam grid 3x2
SMOKE_PAGE = (650, 1300)   # grid 1x2


def step(enc, batch, backend):
    enc.zero_grad(set_to_none=True)
    out = enc(batch, backend=backend).embeddings
    out.float().pow(2).mean().backward()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4")
    p.add_argument("--seconds", type=float, default=1.0, help="repetitions per point, seconds (default 1)")
    p.add_argument("--json", help="write results here")
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args()

    backends = ["triton", "torch"]
    if args.smoke:
        cfg = EncoderConfig(
            sam=SamConfig(img_size=192, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
                          out_chans=32, net_2_chans=48, net_3_chans=64),
            clip=ClipConfig(hidden_size=64, num_layers=2, num_attention_heads=2, ffn_hidden_size=96, image_size=42,
                            patch_size=14),
            projector=ProjectorConfig(input_dim=128, n_embed=96))
        mode, dtype, device = Mode(128, 64, True), torch.float32, torch.device("cpu")
        batches, seconds, page = [1], 0.0, SMOKE_PAGE
        if os.environ.get("TRITON_INTERPRET") != "1":
            backends = ["torch"]
    else:
        if not torch.cuda.is_available():
            sys.exit("bench/train.py needs a CUDA GPU (use --smoke to run its code paths on CPU)")
        cfg, mode, dtype, device = EncoderConfig.deepseek_ocr(), "gundam", torch.bfloat16, torch.device("cuda")
        batches, seconds, page = [int(b) for b in args.batches.split(",")], args.seconds, PAGE
    torch.manual_seed(0)
    enc = GundamEncoder(cfg).to(device, dtype).train()
    env = environment(device)
    print("  ".join(f"{k} {v}" for k, v in env.items()))

    rows = []
    print(f"{'batch':>5s} {'path':7s} {'ckpt':>4s} {'min ms':>9s} {'med ms':>9s} {'peak MB':>9s} {'model MB':>9s}")
    for n in batches:
        images = [Image.new("RGB", page, (40 * i % 255, 90, 160)) for i in range(n)]
        batch = preprocess(images, mode).to(device)
        est = estimate(*page, mode, batch=n, config=cfg, dtype=str(dtype).removeprefix("torch."))
        for backend in backends:
            for ckpt in (False, True):
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "page": page, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
