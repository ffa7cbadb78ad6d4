"""The `gundam` command: encode images, encode datasets, count tokens, estimate cost."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

def check_out_path(path: str, option: str = "--out") -> str:
    """A file path that can be written (its folder exists and is writable, it is not a folder), checked before
    any work starts so that no work is lost at the end."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ValueError(f"{option} {path!r}: is a directory, expected a file path")
    if not os.path.isdir(folder):
        what = "is not a directory" if os.path.exists(folder) else "does not exist"
        raise ValueError(f"{option} {path!r}: {folder!r} {what}")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise ValueError(f"{option} {path!r}: not writable")
    return path


def report_failures(failed: list[tuple[str, str]], total: int, what: str = "images") -> int:
    """Exit status after a run over many inputs: 0, or 2 (with a summary line after many) when some failed."""
    if not failed:
        return 0
    if total > 1:
        names = ", ".join(repr(p) for p, _ in failed)
        print(f"error: {len(failed)} of {total} {what} failed: {names}", file=sys.stderr)
    return 2


MAX_SIZE_DIGITS = 4000   # below Python's limit on converting digit strings (4300): any more is refused by name


def parse_size(text: str) -> tuple[int, int]:
    """'2000x3000' -> (2000, 3000)."""
    from gundam.config import short_repr

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if m:
        for side, digits in (("width", m[1]), ("height", m[2])):
            if len(digits.lstrip("0")) > MAX_SIZE_DIGITS:
                raise ValueError(f"image size {short_repr(text)}: the {side} has {len(digits.lstrip('0'))} digits, "
                                 f"too large: expected at most {MAX_SIZE_DIGITS}")
    w, h = (int(m[1].lstrip("0") or "0"), int(m[2].lstrip("0") or "0")) if m else (0, 0)
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {short_repr(text)}: expected WIDTHxHEIGHT in pixels, positive integers, "
                         f"e.g. 2000x3000")
    return w, h


def cmd_encode(args) -> int:
    """Bad inputs do not stop the run: every good image is encoded (and written with --out), every bad one is
    reported on its own `error:` line, and the exit status is 2 if any failed. Options and --out are checked
    before anything is read or encoded."""
    import torch
    from tqdm import tqdm

    from gundam.config import check_int
    from gundam.encoder import GundamEncoder, resolve_backend
    from gundam.images import Batch, check_image_file, image_views
    from gundam.weights import resolve_device, resolve_dtype, resolve_encoder, weights_line

    set_threads(args)
    config, mode = resolve_encoder(args.weights, None, args.mode, args.max_crops)
    name = args.mode or ("ocr2" if mode.family == "deepseek-ocr2" else "gundam")
    batch_size = check_int(args.batch_size, "--batch-size")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        resolve_backend(args.backend, device)
    except RuntimeError as e:   # triton on a CPU without the interpreter: every image would fail
        raise ValueError(str(e)) from None
    if args.out:
        check_out_path(args.out)
    failed = []

    def fail(path, err):
        failed.append((path, str(err)))
        tqdm.write(f"error: {err}", file=sys.stderr)  # above the progress bar, never inside it

    paths = []
    for path in args.images:
        try:
            paths.append(check_image_file(path))
        except ValueError as e:
            fail(path, e)
    if not paths:
        return report_failures(failed, len(args.images))
    encoder = GundamEncoder.build(args.weights, config=config, dtype=dtype, device=device, backend=args.backend)
    print(weights_line(args.weights))
    print(f"mode: {name} (base {mode.base_size}, crops {mode.image_size if mode.crop_mode else 'off'}, "
          f"max_crops {mode.max_crops}), dtype {str(dtype).removeprefix('torch.')}, device {device}")
    done, results = [], []
    bar = tqdm(total=len(paths), unit="image", disable=len(paths) < 2, file=sys.stderr)
    for i in range(0, len(paths), batch_size):
        chunk, views = paths[i:i + batch_size], []
        t0 = time.perf_counter()
        for path in chunk:
            try:
                views.append((path, image_views(path, mode)))
            except ValueError as e:
                fail(path, e)
        t_pre = time.perf_counter() - t0
        if views:
            names = [path for path, _ in views]
            batch = Batch.from_views([v for _, v in views], mode)   # uint8: normalised on the device
            layouts = batch.layouts
            try:
                with torch.inference_mode():
                    out = encoder(batch)
                embeddings = [e.float().cpu() for e in out.split()]
            except RuntimeError as e:  # e.g. out of memory: these images fail, the others go on
                for path in names:
                    fail(path, f"image {path!r}: encoder failed ({e})")
            else:
                # stage times are per batch: all its images went through the encoder together
                stages = "  ".join(f"{k} {v:.2f}s" for k, v in {"preprocess": t_pre, **out.timings}.items())
                for path, lay in zip(names, layouts):
                    tqdm.write(f"{path}: {lay.width}x{lay.height}  grid {lay.grid[0]}x{lay.grid[1]}  "
                               f"crops {lay.n_crops}  tokens {lay.tokens}")
                tqdm.write(f"  batch of {len(names)}: {stages}")
                done += names
                results += embeddings
        bar.update(len(chunk))
    bar.close()
    if args.out and results:
        from safetensors.torch import save_file
        offsets = torch.tensor([0] + [r.shape[0] for r in results]).cumsum(0)
        metadata = {"images": "\n".join(done), "mode": name}
        if failed:
            metadata["failed"] = "\n".join(p for p, _ in failed)
        save_file({"embeddings": torch.cat(results).contiguous(), "offsets": offsets}, args.out, metadata=metadata)
        print(f"wrote {args.out}: embeddings [{int(offsets[-1])}, {results[0].shape[1]}], offsets [{len(offsets)}]"
              + (f" ({len(done)} of {len(args.images)} images)" if failed else ""))
    return report_failures(failed, len(args.images))


def cmd_encode_dataset(args) -> int:
    """Every image and PDF page of the inputs -> sharded embeddings + Parquet manifest in --out (gundam.bulk).
    Bad inputs are recorded in the manifest with their error, reported on `error:` lines, and make the exit
    status 2; the other inputs are encoded."""
    from gundam.bulk import encode_dataset

    set_threads(args)
    s = encode_dataset(args.inputs, args.out, engine=args.engine, mode=args.mode, max_crops=args.max_crops,
                       batch_size=args.batch_size, shard_size=args.shard_size, dpi=args.dpi, weights=args.weights,
                       dtype=args.dtype, device=args.device, backend=args.backend, workers=args.workers,
                       ray_address=args.ray_address, max_shards=args.max_shards,
                       retry_failed=args.retry_failed)
    done = s.encoded - len(s.failed)
    rate = f" ({done / s.seconds:.2f} pages/s, {s.tokens / s.seconds:.0f} tokens/s)" if s.encoded else ""
    print(f"{args.out}: {done} of {s.encoded} pages and images encoded ({s.tokens} tokens), {len(s.failed)} failed, "
          f"{len(s.shards)} new shards, {s.seconds:.1f}s{rate}; {s.skipped} done before"
          + (f", {s.remaining} left for a rerun (--max-shards)" if s.remaining else ""))
    return report_failures(s.failed, s.encoded, "pages and images")


def cmd_tokens(args) -> int:
    """Crop grid and tokens of each image file (opened as `encode` opens it) or WIDTHxHEIGHT size, every mode.
    A bad item is reported and the others still printed (exit status 2)."""
    from gundam.config import MODES, resolve_mode
    from gundam.layout import image_layout

    resolve_mode("gundam", args.max_crops)  # a bad --max-crops fails before any output
    failed = []
    for item in args.items:
        try:
            w, h = _item_size(item)
        except ValueError as e:
            failed.append((item, str(e)))
            print(f"error: {e}", file=sys.stderr)
            continue
        print(f"{item}: {w}x{h}")
        for name in MODES:
            lay = image_layout(w, h, name, args.max_crops)
            print(f"  {name:9s} grid {lay.grid[0]}x{lay.grid[1]}  crops {lay.n_crops}  tokens {lay.tokens}")
    return report_failures(failed, len(args.items), "items")


def _item_size(item: str) -> tuple[int, int]:
    from gundam.images import load_image

    from gundam.config import short_repr

    if os.path.lexists(item):  # a file named like a size is still a file
        return load_image(item).size
    if re.fullmatch(r"\s*\d+\s*[xX]\s*\d+\s*", item):
        return parse_size(item)   # a size: its own error (zero, too many digits)
    name = repr(item) if len(item) <= 1000 else short_repr(item)   # a path in full; a 5000-character item not
    raise ValueError(f"{name}: no such file, and not an image size: expected an image path or WIDTHxHEIGHT "
                     f"(e.g. 2000x3000)")


def cmd_cost(args) -> int:
    from gundam.cost import estimate, format_report, plot, sweep, write_csv

    sizes = [parse_size(s) for s in args.sizes]
    if args.sweep:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        check_out_path(args.out)   # before the sweep's work, not after it
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


def cmd_make_overfit_set(args) -> int:
    from gundam.layout import image_layout
    try:
        import matplotlib  # noqa: F401 - the charts are drawn with it
    except ImportError:
        raise RuntimeError("make-overfit-set draws its charts with matplotlib: "
                           "pip install 'gundam-encoder[data]'") from None
    from gundam.data.overfit import make_overfit_set

    t0 = time.perf_counter()
    records = make_overfit_set(args.dir, seed=args.seed)
    for r in records:
        lay = image_layout(r.width, r.height, "gundam")
        print(f"{r.image}: {r.width}x{r.height}  gundam grid {lay.grid[0]}x{lay.grid[1]}  tokens {lay.tokens}  "
              f"answer {len(r.answer)} chars")
    print(f"wrote {os.path.join(args.dir, 'records.jsonl')}: {len(records)} records in {time.perf_counter() - t0:.1f}s")
    return 0


def encoder_options(p: argparse.ArgumentParser, device_help: str = "cpu or cuda (default: cuda when available)"):
    """The options `encode` and `encode-dataset` share: which views, which encoder, where it runs."""
    from gundam.config import MAX_CROPS, MIN_CROPS, MODES
    from gundam.encoder import BACKENDS
    from gundam.weights import DTYPES

    p.add_argument("--mode", default=None, choices=list(MODES),
                   help="default: gundam, or the weights' own (ocr2 for DeepSeek-OCR 2 weights)")
    p.add_argument("--max-crops", type=int, default=None, help=f"{MIN_CROPS}..{MAX_CROPS} (default 6)")
    p.add_argument("--weights", help="DeepSeek-OCR checkpoint: .safetensors file or directory")
    p.add_argument("--backend", default="auto", choices=list(BACKENDS))
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto (default): bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise")
    p.add_argument("--device", default=None, help=device_help)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, one per physical core)")


def set_threads(args):
    """--threads, checked, as torch's intra-op thread count (before anything is encoded)."""
    import torch

    from gundam.config import check_int
    if args.threads is not None:
        torch.set_num_threads(check_int(args.threads, "--threads", hi=4096))


def build_parser() -> argparse.ArgumentParser:
    from gundam.config import MAX_CROPS, MIN_CROPS, MODES

    p = argparse.ArgumentParser(prog="gundam", description="DeepSeek-OCR vision encoder (DeepEncoder), Gundam mode")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("encode", help="encode images and print views, tokens and time per stage")
    e.add_argument("images", nargs="+", metavar="IMAGE")
    encoder_options(e)
    e.add_argument("--batch-size", type=int, default=1, help="images encoded together in one pass (default 1)")
    e.add_argument("--out", help="write the embeddings and offsets to this .safetensors file")
    e.set_defaults(func=cmd_encode)

    d = sub.add_parser("encode-dataset", help="encode images, folders, globs, PDFs and JSONL manifests into sharded "
                                              "embeddings with a Parquet manifest (resumable), locally or on Ray")
    d.add_argument("inputs", nargs="+", metavar="INPUT", help="image, PDF, folder, glob or .jsonl manifest")
    d.add_argument("--out", required=True, help="output folder (a rerun with the same folder resumes)")
    d.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="local (default): one device, preprocessing in worker processes; ray: Ray Data")
    encoder_options(d, device_help="cpu or cuda (default: cuda when available; on Ray: in the cluster)")
    d.add_argument("--batch-size", type=int, default=32, help="views per encoder batch (default 32)")
    d.add_argument("--shard-size", type=int, default=256, help="pages and images per shard (default 256)")
    d.add_argument("--dpi", type=float, default=144, help="PDF rendering resolution (default 144)")
    d.add_argument("--workers", type=int, default=None,
                   help="local engine: preprocessing processes (default: the CPUs, at most 8; 0: none)")
    d.add_argument("--ray-address", default=None,
                   help="Ray cluster to connect to, e.g. auto or ray://head:10001 (default: a new local Ray)")
    d.add_argument("--max-shards", type=int, default=None, help="stop after this many new shards (rerun to go on)")
    d.add_argument("--retry-failed", action="store_true", help="encode again what failed in earlier runs into --out")
    d.set_defaults(func=cmd_encode_dataset)

    t = sub.add_parser("tokens", help="crop grid and token count of images or sizes in every mode")
    t.add_argument("items", nargs="+", metavar="IMAGE|WxH")
    t.add_argument("--max-crops", type=int, default=None)
    t.set_defaults(func=cmd_tokens)

    o = sub.add_parser("make-overfit-set", help="render the 10-image high-resolution overfit set (receipts, charts, "
                                                "scene text) and its records.jsonl")
    o.add_argument("dir", metavar="DIR")
    o.add_argument("--seed", type=int, default=0, help="another seed gives other text and images (default 0)")
    o.set_defaults(func=cmd_make_overfit_set)

    from gundam.cost import GPUS
    from gundam.weights import DTYPES
    c = sub.add_parser("cost", help="analytic FLOPs, bytes and roofline per stage (DeepSeek-OCR or, with --mode "
                                    "ocr2, DeepSeek-OCR 2)")
    c.add_argument("sizes", nargs="*", metavar="WxH", help="image sizes in pixels, e.g. 2000x3000")
    c.add_argument("--mode", default="gundam", choices=list(MODES),
                   help="image mode (default: gundam); its encoder: DeepSeek-OCR's, or DeepSeek-OCR 2's for ocr2")
    c.add_argument("--max-crops", type=int, default=None,
                   help=f"maximum crops, {MIN_CROPS}..{MAX_CROPS} (default: the mode's)")
    c.add_argument("--batch", type=int, default=1, help="images per call (default: 1)")
    c.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="activation and weight dtype")
    c.add_argument("--gpu", default="h100", choices=list(GPUS), help="roofline GPU (default: h100)")
    c.add_argument("--json", action="store_true", help="print JSON instead of tables")
    c.add_argument("--train", action="store_true",
                   help="also a training step's matmul FLOPs (forward + backward) and activation memory")
    c.add_argument("--sweep", action="store_true",
                   help="write a CSV over sizes and aspect ratios, crops and no-crop (and a PNG with matplotlib)")
    c.add_argument("--out", default="cost_sweep.csv", help="sweep CSV path; the PNG goes beside it")
    c.set_defaults(func=cmd_cost)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # output closed early, e.g. piped into `head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, TypeError, RuntimeError, OSError) as e:  # OSError: e.g. an output path that cannot be made
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
