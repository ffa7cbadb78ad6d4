"""The `gundam` command: encode images, count tokens, estimate cost."""
from __future__ import annotations

import argparse
import os
import sys
import time

from gundam.cost import parse_size

DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16"}


def cmd_encode(args) -> int:
    import torch
    from tqdm import tqdm

    from gundam.config import EncoderConfig, resolve_mode
    from gundam.encoder import GundamEncoder
    from gundam.images import preprocess

    mode = resolve_mode(args.mode, args.max_crops)
    dtype = getattr(torch, DTYPES[args.dtype])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
          f"max_crops {mode.max_crops}), dtype {DTYPES[args.dtype]}, device {device}")
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


def cmd_make_overfit_set(args) -> int:
    from gundam.layout import image_layout
    try:
        import matplotlib  # noqa: F401 - the charts are drawn with it
    except ImportError:
        raise RuntimeError("make-overfit-set draws its charts with matplotlib: "
                           "pip install 'gundam-encoder[data]'") from None
    from gundam.overfit import make_overfit_set

    t0 = time.perf_counter()
    records = make_overfit_set(args.dir, seed=args.seed)
    for r in records:
        lay = image_layout(r.width, r.height, "gundam")
        print(f"{r.image}: {r.width}x{r.height}  gundam grid {lay.grid[0]}x{lay.grid[1]}  tokens {lay.tokens}  "
              f"answer {len(r.answer)} chars")
    print(f"wrote {os.path.join(args.dir, 'records.jsonl')}: {len(records)} records in {time.perf_counter() - t0:.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from gundam.config import MODES

    p = argparse.ArgumentParser(prog="gundam", description="DeepSeek-OCR vision encoder (DeepEncoder), Gundam mode")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="encode images and print views, tokens and time per stage")
    e.add_argument("images", nargs="+", metavar="IMAGE")
    e.add_argument("--mode", default="gundam", choices=list(MODES))
    e.add_argument("--max-crops", type=int, default=None, help="2..9 (default 6)")
    e.add_argument("--weights", help="DeepSeek-OCR checkpoint: .safetensors file or directory")
    e.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"])
    e.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    e.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    e.add_argument("--batch-size", type=int, default=1, help="images encoded together in one pass (default 1)")
    e.add_argument("--out", help="write the embeddings and offsets to this .safetensors file")
    e.set_defaults(func=cmd_encode)

    t = sub.add_parser("tokens", help="crop grid and token count of images or sizes in every mode")
    t.add_argument("items", nargs="+", metavar="IMAGE|WxH")
    t.add_argument("--max-crops", type=int, default=None)
    t.set_defaults(func=cmd_tokens)

    o = sub.add_parser("make-overfit-set", help="render the 10-image high-resolution overfit set (receipts, charts, "
                                                "scene text) and its records.jsonl")
    o.add_argument("dir", metavar="DIR")
    o.add_argument("--seed", type=int, default=0, help="another seed gives other text and images (default 0)")
    o.set_defaults(func=cmd_make_overfit_set)

    from gundam import cost
    c = sub.add_parser("cost", help="analytic FLOPs, bytes and roofline per stage")
    cost.add_arguments(c)
    c.set_defaults(func=cost.run)
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
