"""The `gundam` command: encode images, count tokens, estimate cost."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def parse_size(text: str) -> tuple[int, int]:
    """'2000x3000' -> (2000, 3000)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m or int(m[1]) <= 0 or int(m[2]) <= 0:
        raise ValueError(f"image size {text!r}: expected WIDTHxHEIGHT in pixels, positive integers, e.g. 2000x3000")
    return int(m[1]), int(m[2])


def cmd_encode(args) -> int:
    import torch
    from tqdm import tqdm

    from gundam.config import EncoderConfig, resolve_mode
    from gundam.encoder import GundamEncoder, default_dtype
    from gundam.images import preprocess

    mode = resolve_mode(args.mode, args.max_crops)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, DTYPES[args.dtype])
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size}: expected a positive integer")
    for path in args.images:
        if not os.path.isfile(path):
            raise ValueError(f"image {path!r}: no such file")
    if args.weights:
        encoder = GundamEncoder.from_pretrained(args.weights, dtype=dtype, device=device, backend=args.backend)
        print(f"weights: {args.weights}")
    else:
        torch.manual_seed(0)
        encoder = GundamEncoder(EncoderConfig.deepseek_ocr(), backend=args.backend).to(device, dtype).eval()
        print("weights: RANDOM (no --weights given): shapes and timings are real, embeddings are meaningless")
    print(f"mode: {args.mode} (base {mode.base_size}, crops {mode.image_size if mode.crop_mode else 'off'}, "
          f"max_crops {mode.max_crops}), dtype {str(dtype).removeprefix('torch.')}, device {device}")
    results = []
    bar = tqdm(total=len(args.images), unit="image", disable=len(args.images) < 2, file=sys.stderr)
    for i in range(0, len(args.images), args.batch_size):
        paths = args.images[i:i + args.batch_size]
        t0 = time.perf_counter()
        batch = preprocess(paths, mode)
        t_pre = time.perf_counter() - t0
        with torch.inference_mode():
            out = encoder(batch)
        # stage times are per batch: all its images went through the encoder together
        stages = "  ".join(f"{k} {v:.2f}s" for k, v in {"preprocess": t_pre, **out.timings}.items())
        for path, lay in zip(paths, batch.layouts):
            tqdm.write(f"{path}: {lay.width}x{lay.height}  grid {lay.grid[0]}x{lay.grid[1]}  crops {lay.n_crops}  "
                       f"tokens {lay.tokens}")
        tqdm.write(f"  batch of {len(paths)}: {stages}")
        results += [e.float().cpu() for e in out.split()]
        bar.update(len(paths))
    bar.close()
    if args.out:
        from safetensors.torch import save_file
        lengths = [r.shape[0] for r in results]
        offsets = torch.tensor([0] + lengths).cumsum(0)
        save_file({"embeddings": torch.cat(results).contiguous(), "offsets": offsets},
                  args.out, metadata={"images": "\n".join(args.images), "mode": args.mode})
        print(f"wrote {args.out}: embeddings [{int(offsets[-1])}, {results[0].shape[1]}], offsets [{len(offsets)}]")
    return 0


def cmd_tokens(args) -> int:
    from PIL import Image

    from gundam.config import MODES
    from gundam.layout import image_layout

    for item in args.items:
        if os.path.isfile(item):
            try:
                with Image.open(item) as im:
                    w, h = im.size
            except Exception as e:  # noqa: BLE001 - any decoder failure is a bad input
                raise ValueError(f"image {item!r}: cannot read ({e})") from None
        else:
            w, h = parse_size(item)
        print(f"{item}: {w}x{h}")
        for name in MODES:
            lay = image_layout(w, h, name, args.max_crops)
            print(f"  {name:9s} grid {lay.grid[0]}x{lay.grid[1]}  crops {lay.n_crops}  tokens {lay.tokens}")
    return 0


def cmd_cost(args) -> int:
    from gundam.cost import estimate
    from gundam.cost_report import format_report, plot, sweep, write_csv

    sizes = [parse_size(s) for s in args.sizes]
    if args.sweep:
        rows = sweep(args.mode, args.max_crops, gpu=args.gpu, dtype=args.dtype)
        write_csv(rows, args.out)
        png = os.path.splitext(args.out)[0] + ".png"
        made = plot(rows, png, args.gpu)
        print(f"wrote {args.out} ({len(rows)} rows)" + (f" and {png}" if made else
                                                        " (no PNG: install matplotlib, the `plot` extra)"))
        if not sizes:
            return 0
    if not sizes:
        raise ValueError("gundam cost: no image size given: expected WIDTHxHEIGHT (e.g. 2000x3000) or --sweep")
    reports = [estimate(w, h, args.mode, args.max_crops, args.batch, args.dtype) for w, h in sizes]
    if args.json:
        out = [r.to_dict(args.gpu) for r in reports]
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2))
    else:
        print("\n\n".join(format_report(r, args.gpu, train=args.train) for r in reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gundam.config import MAX_CROPS, MIN_CROPS, MODES

    p = argparse.ArgumentParser(prog="gundam", description="DeepSeek-OCR vision encoder (DeepEncoder), Gundam mode")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="encode images and print views, tokens and time per stage")
    e.add_argument("images", nargs="+", metavar="IMAGE")
    e.add_argument("--mode", default="gundam", choices=list(MODES))
    e.add_argument("--max-crops", type=int, default=None, help=f"{MIN_CROPS}..{MAX_CROPS} (default 6)")
    e.add_argument("--weights", help="DeepSeek-OCR checkpoint: .safetensors file or directory")
    e.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    e.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="auto (default): bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise")
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--batch-size", type=int, default=1, help="images encoded together in one pass (default 1)")
    e.add_argument("--out", help="write the embeddings and offsets to this .safetensors file")
    e.set_defaults(func=cmd_encode)

    t = sub.add_parser("tokens", help="crop grid and token count of images or sizes in every mode")
    t.add_argument("items", nargs="+", metavar="IMAGE|WxH")
    t.add_argument("--max-crops", type=int, default=None)
    t.set_defaults(func=cmd_tokens)

    from gundam.cost import DTYPE_BYTES, GPUS
    c = sub.add_parser("cost", help="analytic FLOPs, bytes and roofline per stage")
    c.add_argument("sizes", nargs="*", metavar="WxH", help="image sizes in pixels, e.g. 2000x3000")
    c.add_argument("--mode", default="gundam", choices=list(MODES), help="image mode (default: gundam)")
    c.add_argument("--max-crops", type=int, default=None,
                   help=f"maximum crops, {MIN_CROPS}..{MAX_CROPS} (default: the mode's)")
    c.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    c.add_argument("--dtype", default="bf16", choices=list(DTYPE_BYTES), help="activation and weight dtype")
    c.add_argument("--gpu", default="h100", choices=list(GPUS), help="roofline GPU (default: h100)")
    c.add_argument("--json", action="store_true", help="print JSON instead of tables")
    c.add_argument("--train", action="store_true",
                   help="also the matmul FLOPs of a training step (forward + backward)")
    c.add_argument("--sweep", action="store_true",
                   help="write a CSV over sizes and aspect ratios, crops and no-crop (and a PNG with matplotlib)")
    c.add_argument("--out", default="cost_sweep.csv", help="sweep CSV path; the PNG goes beside it")
    c.set_defaults(func=cmd_cost)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
