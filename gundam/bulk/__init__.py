"""Bulk encoding: images, folders, globs, PDFs and JSONL manifests -> sharded embeddings with a Parquet manifest,
on one device (`engine="local"`) or on a Ray cluster (`engine="ray"`).

    summary = encode_dataset(["scans/", "report.pdf"], "out/", weights="DeepSeek-OCR/")
    for id, embeddings, meta in read_embeddings("out/"):        # input order; [tokens, n_embed] each
        ...

Inputs become items (gundam.bulk.sources); the work is planned before anything is decoded (gundam.bulk.planning);
an engine preprocesses and encodes the planned batches (gundam.bulk.engines); this process writes them as shards
of the output folder (gundam.bulk.shards, which describes the folder). A rerun skips the ids of finished shards
and encodes the rest into new shards, so a crash loses at most the shard being written; what failed counts as done
unless `retry_failed`. One run at a time writes a folder: a run holds a lock on `.lock` in it (released when its
process ends, crashed or killed, whatever its worker processes do), and a second run on the folder meanwhile is
refused. Everything a run needs (options, weights, device, the folder) is checked before it writes anything, and
it records its settings (run.json) only with its first shard: a run that fails or is killed before that leaves
nothing a rerun has to match.

Both engines encode exactly the planned batches (the encoder's floating-point result depends on what else is in
the batch) with the same torch thread count (on CPUs with AMX the bf16 result depends on it too), so on the same
kind of device they write the same files, bit for bit, and a run interrupted and resumed writes what an
uninterrupted one would.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch

from gundam.bulk.engines import ENGINES, check_weights, load_encoder, local_groups, ray_connect, ray_groups
from gundam.bulk.planning import Settings, max_views, plan
from gundam.bulk.shards import (check_out_dir, claim, locked, open_output, read_embeddings, read_manifest,
                                write_shard)
from gundam.bulk.sources import PDF_DPI, Item, check_inputs, expand_inputs, load_item
from gundam.config import EncoderConfig, Mode, Ocr2Config, check_int, check_positive

MAX_WORKERS = 256   # preprocessing processes: a bound, so a typo (--workers 10000) is an error, not a fork storm

__all__ = ["encode_dataset", "Summary", "Settings", "read_embeddings", "read_manifest", "Item", "expand_inputs",
           "load_item"]


@dataclass
class Summary:
    """What a run did."""
    items: int                   # pages and images in the inputs
    skipped: int                 # already in finished shards of the output folder
    encoded: int = 0             # encoded by this run (failures included)
    failed: list[tuple[str, str]] = field(default_factory=list)   # (id, error) of this run's failures
    tokens: int = 0
    shards: list[str] = field(default_factory=list)               # manifest files written by this run
    remaining: int = 0           # left for a rerun (max_shards)
    seconds: float = 0.0


def encode_dataset(inputs, out, *, engine: str = "local", mode: str | Mode | None = None, max_crops: int | None = None,
                   batch_size: int = 32, shard_size: int = 256, dpi: float = PDF_DPI, weights=None,
                   config: EncoderConfig | Ocr2Config | None = None, dtype="auto", device=None, backend: str = "auto",
                   workers: int | None = None, ray_address: str | None = None, max_shards: int | None = None,
                   retry_failed: bool = False, verbose: bool = True) -> Summary:
    """Encode every image and PDF page of `inputs` into the folder `out` (see the module docstring); returns a
    Summary. Bad inputs are recorded with their error and do not stop the run.

    batch_size: views per encoder batch (a page is 1 + its crops); shard_size: pages and images per shard;
    workers: preprocessing processes of the local engine (default: the CPUs, at most 8; 0: in this process);
    max_shards: stop after that many new shards (a rerun goes on); retry_failed: encode again the ids that failed
    in earlier runs (a fixed file; an encoder that ran out of memory), else they count as done; dtype "auto":
    bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise; device: default cuda when there is one (on
    Ray: in the cluster); mode: default the weights' family's own (gundam, or ocr2 for DeepSeek-OCR 2 weights);
    config: default the real encoder of the mode's family."""
    from gundam.encoder import resolve_backend
    from gundam.weights import resolve_device, resolve_dtype, resolve_encoder, weights_line

    # every check before anything is written: a bad option, checkpoint or device fails with the folder untouched
    t0 = time.perf_counter()
    inputs = check_inputs(inputs)
    out = check_out_dir(out)
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise ValueError(f"ray_address={ray_address!r} with engine={engine!r}: expected engine='ray'")
    if workers is not None and engine != "local":
        raise ValueError(f"workers={workers!r} with engine={engine!r}: Ray tasks preprocess there; expected "
                         f"engine='local'")
    config, mode = resolve_encoder(weights, config, mode, max_crops)
    dpi = check_positive(dpi, "dpi")
    batch_size, shard_size = check_int(batch_size, "batch_size"), check_int(shard_size, "shard_size")
    views = max_views(mode)
    if batch_size < views:
        crops = f"a global view and max_crops={mode.max_crops} crops" if mode.crop_mode else "its global view"
        raise ValueError(f"batch_size={batch_size} views: an image can have {views} in this mode ({crops}): "
                         f"expected at least {views}")
    workers = min(8, os.cpu_count() or 1) if workers is None else check_int(workers, "workers", 0, MAX_WORKERS)
    if max_shards is not None:
        max_shards = check_int(max_shards, "max_shards")
    if weights is not None:
        weights = os.path.abspath(os.fspath(weights))
    n_gpus = 0
    if engine == "ray":
        n_gpus = ray_connect(ray_address)
        try:
            device = torch.device(device or ("cuda" if n_gpus else "cpu"))
        except (RuntimeError, TypeError):
            raise ValueError(f"device={device!r}: expected a device such as 'cpu' or 'cuda'") from None
        if device.type == "cuda" and not n_gpus:
            raise ValueError(f"device={str(device)!r}: the Ray cluster has no GPU")
    else:
        device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    try:
        resolve_backend(backend, device)
    except RuntimeError as e:   # triton on a CPU without the interpreter: every batch would fail
        raise ValueError(str(e)) from None
    settings = Settings(mode, dpi, weights, config, dtype, str(device), backend)
    if engine == "local":
        encoder = load_encoder(settings)   # the whole checkpoint read and checked
    else:
        check_weights(settings)            # the actors load it; the driver checks it first
    with locked(out):   # one run per folder at a time
        finished, number = open_output(out, settings, retry_failed)
        items = expand_inputs(inputs, dpi)
        todo = [i for i, it in enumerate(items) if it.id not in finished]
        shards = plan([items[i] for i in todo], mode, batch_size, shard_size)
        summary = Summary(len(items), len(items) - len(todo))
        if max_shards is not None and len(shards) > max_shards:
            shards = shards[:max_shards]
        n_todo = sum(len(b) for s in shards for b in s)
        summary.remaining = len(todo) - n_todo
        if verbose:
            threads = f" ({settings.threads} threads)" if device.type == "cpu" else ""
            print(weights_line(weights))
            print(f"inputs: {len(items)} pages and images, {summary.skipped} already in {out!r}, {n_todo} to encode in "
                  f"{len(shards)} shards ({engine} engine, {settings.device}{threads}, "
                  f"{str(dtype).removeprefix('torch.')}, batches of <= {batch_size} views)")
        if not shards:
            summary.seconds = time.perf_counter() - t0
            return summary

        batches = [b for s in shards for b in s]
        work = [items[i] for i in todo[:n_todo]]
        indices = todo[:n_todo]
        stream = (local_groups(work, indices, batches, settings, workers, encoder) if engine == "local"
                  else ray_groups(work, indices, batches, settings, n_gpus))
        try:
            _write_shards(stream, shards, out, number, settings, summary, verbose)
        finally:   # the loader's workers go now, also when the run stops early
            stream.close()
        summary.seconds = time.perf_counter() - t0
        return summary


def _write_shards(stream, shards, out: str, number: int, settings: Settings, summary: Summary, verbose: bool):
    """Each planned shard from the engine's (rows, embeddings) per batch, written as shard `number`, `number + 1`,
    ...; progress on stderr."""
    from tqdm import tqdm

    bar = tqdm(total=sum(len(b) for s in shards for b in s), unit="page", disable=not verbose, file=sys.stderr,
               smoothing=0.1)
    t_start = time.perf_counter()
    for k, shard in enumerate(shards):
        rows, embeddings = [], []
        for _ in shard:
            group_rows, emb = next(stream)
            rows += group_rows
            if emb is not None:
                embeddings.append(emb)
            for r in group_rows:
                if r["error"] is None:
                    summary.tokens += r["tokens"]
                else:
                    summary.failed.append((r["id"], r["error"]))
                    if verbose:
                        tqdm.write(f"error: {r['error']}", file=sys.stderr)
            bar.set_postfix_str(f"{summary.tokens / (time.perf_counter() - t_start):.0f} tokens/s", refresh=False)
            bar.update(len(group_rows))
        if k == 0:
            claim(out, settings)   # the run has really started: its settings are recorded with its first shard
        summary.shards.append(write_shard(out, number + k, rows, embeddings, settings))
        summary.encoded += len(rows)
    bar.close()
