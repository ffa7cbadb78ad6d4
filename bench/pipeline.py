"""Bulk-encoding throughput: pages/s of `gundam encode-dataset`'s local engine (preprocessing in worker processes,
overlapping the encoder) against a plain loop (render and crop a batch, then encode it, one after the other), on
a generated PDF of letter-size pages (rendered at 144 dpi: 1224x1584, Gundam grid 2x3, 903 tokens per page).

    python bench/pipeline.py                  # CPU: a tiny encoder on 256/192 px views, 24 pages (a minute)
    python bench/pipeline.py --gpu            # CUDA: the real encoder in bf16 (random weights, or --weights),
                                              # 600 pages; encoder alone vs workers 0, 2, 4, 8, 12, 15
    python bench/pipeline.py --smoke          # tiny pages and encoder, seconds (the test suite runs it)

Pages/s are counted after the first batch (weights, worker start-up and warm-up excluded). On the GPU the
encoder alone (batches preprocessed beforehand) is the ceiling, and the report says how many workers reach 90% of
it: how many CPU cores it takes to keep one GPU busy.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

import torch
from PIL import Image, ImageDraw

from gundam.bulk.engines import collate_group, encode_group, load_encoder, local_groups, prepare
from gundam.bulk.planning import Settings, plan
from gundam.bulk.sources import expand_inputs, load_item
from gundam.config import ClipConfig, EncoderConfig, Mode, SamConfig, resolve_mode
from gundam.encoder import GundamEncoder
from gundam.images import preprocess

sys.path.insert(0, os.path.dirname(__file__))
from benchutil import environment  # noqa: E402

# a tiny encoder on small views (Mode(256, 192)): on a CPU, encoding a page then costs about twice what rendering
# and cropping it cost (0.3 s and 0.16 s on a 2-core x86); the real encoder costs ~20 s a page there
TINY = EncoderConfig(sam=SamConfig(img_size=256, embed_dim=48, depth=3, num_heads=3, window_size=5,
                                    global_attn_indexes=(1,)),
                      clip=ClipConfig(num_layers=2, num_attention_heads=16, ffn_hidden_size=96))


def make_pdf(path: str, pages: int, size=(612, 792), seed: int = 0):
    """`pages` pages of grey text lines on paper, `size` points (letter by default), stored as JPEG images."""
    rng = random.Random(seed)
    distinct = []
    for _ in range(min(pages, 8)):
        im = Image.new("RGB", size, (250, 248, 240))
        draw = ImageDraw.Draw(im)
        for y in range(30, size[1] - 30, 14):
            line = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz     ") for _ in range(rng.randint(20, 90)))
            draw.text((30, y), line, fill=(30, 30, 30))
        distinct.append(im)
    images = [distinct[i % len(distinct)] for i in range(pages)]
    images[0].save(path, save_all=True, append_images=images[1:], resolution=72)


def rate(pages_after_first: int, seconds: float) -> float:
    return pages_after_first / seconds if seconds > 0 else float("nan")


def run_plain(items, batches, settings: Settings) -> float:
    """Render and crop a batch with gundam.preprocess, encode it, repeat: pages/s after the first batch."""
    enc = load_encoder(settings)
    t0, n = None, 0
    for batch in batches:
        images = [load_item(items[i], settings.dpi) for i in batch]
        with torch.inference_mode():
            enc(preprocess(images, settings.mode)).embeddings.cpu()
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(batch)
    return rate(n, time.perf_counter() - t0)


def run_engine(items, batches, settings: Settings, workers: int) -> float:
    """The local engine of encode-dataset (shard writing aside): pages/s after the first batch."""
    t0, n = None, 0
    for rows, _ in local_groups(items, list(range(len(items))), batches, settings, workers):
        if t0 is None:
            t0 = time.perf_counter()
        else:
            n += len(rows)
    return rate(n, time.perf_counter() - t0)


def run_encoder_only(items, batches, settings: Settings, repeat: int = 3) -> float:
    """The encoder alone on batches preprocessed beforehand (as uint8, like the engine's): the ceiling."""
    enc = load_encoder(settings)
    groups = [collate_group([prepare(items[i], i, settings.mode, settings.dpi) for i in b], settings.mode)
              for b in batches[:repeat + 1]]
    encode_group(enc, groups[0])   # warm-up
    t0, n = time.perf_counter(), 0
    for g in groups[1:]:
        encode_group(enc, g)
        n += len(g.rows)
    return rate(n, time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="the real encoder on CUDA in bf16")
    p.add_argument("--pages", type=int, default=None, help="pages in the PDF (default 24, --gpu 600)")
    p.add_argument("--workers", default=None, help="comma-separated worker counts (default 1,2, --gpu 0,2,4,8,12,15)")
    p.add_argument("--batch-size", type=int, default=None, help="views per batch (default 28, --gpu 64)")
    p.add_argument("--weights", help="DeepSeek-OCR checkpoint (default: random weights)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--smoke", action="store_true", help="tiny pages and encoder, seconds")
    args = p.parse_args()

    if args.smoke:
        config, mode, pages, workers, batch_size, page_size = TINY, Mode(256, 192, True), 4, [1], 14, (400, 500)
    elif args.gpu:
        config, mode, pages, workers, batch_size, page_size = (EncoderConfig.deepseek_ocr(), resolve_mode("gundam"),
                                                               600, [0, 2, 4, 8, 12, 15], 64, (612, 792))
    else:
        config, mode, pages, workers, batch_size, page_size = TINY, Mode(256, 192, True), 24, [1, 2], 28, (612, 792)
    pages = args.pages or pages
    workers = [int(w) for w in args.workers.split(",")] if args.workers else workers
    batch_size = args.batch_size or batch_size
    device = "cuda" if args.gpu else "cpu"
    dtype = torch.bfloat16 if args.gpu else torch.float32

    with tempfile.TemporaryDirectory() as tmp:
        weights = args.weights and os.path.abspath(args.weights)
        if not weights:   # random weights, built once (initialising the real encoder takes a while)
            from safetensors.torch import save_file
            torch.manual_seed(0)
            weights = os.path.join(tmp, "random.safetensors")
            save_file({k: v.to(dtype).contiguous() for k, v in GundamEncoder(config).state_dict().items()}, weights)
        settings = Settings(mode, 144.0, weights, config, dtype, device)
        pdf = os.path.join(tmp, "pages.pdf")
        make_pdf(pdf, pages, page_size)
        items = expand_inputs([pdf])
        batches = [b for shard in plan(items, mode, batch_size, len(items)) for b in shard]
        res = {"environment": environment(torch.device(device)), "pages": pages, "page_size_px": list(items[0].size),
               "batches": len(batches), "batch_size_views": batch_size, "dtype": str(dtype).removeprefix("torch."),
               "config": "deepseek-ocr" if args.gpu else "tiny", "workers": {}}
        print(f"{pages} pages of {items[0].size[0]}x{items[0].size[1]} px in {len(batches)} batches of <= "
              f"{batch_size} views; {res['config']} encoder, {device}, {res['dtype']}")
        if args.gpu:
            res["encoder_only"] = run_encoder_only(items, batches, settings)
            print(f"encoder alone (preprocessed batches): {res['encoder_only']:.1f} pages/s")
        res["plain_loop"] = run_plain(items, batches, settings)
        print(f"plain loop (preprocess, then encode):  {res['plain_loop']:.1f} pages/s")
        for w in workers:
            res["workers"][w] = run_engine(items, batches, settings, w)
            print(f"local engine, {w:2d} workers:           {res['workers'][w]:.1f} pages/s "
                  f"({res['workers'][w] / res['plain_loop']:.2f}x the plain loop)")
        if args.gpu:
            enough = [w for w in workers if res["workers"][w] >= 0.9 * res["encoder_only"]]
            res["workers_for_90pct"] = min(enough) if enough else None
            print(f"workers reaching 90% of the encoder alone: {res['workers_for_90pct']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
