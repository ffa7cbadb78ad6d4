"""Bulk encoding: images, folders, globs, PDFs and JSONL manifests -> sharded embeddings with a Parquet manifest,
on one device (`engine="local"`) or on a Ray cluster (`engine="ray"`).

    summary = encode_dataset(["scans/", "report.pdf"], "out/", weights="DeepSeek-OCR/")
    for id, embeddings, meta in read_embeddings("out/"):        # input order; [tokens, n_embed] each
        ...

The output folder:

    run.json                              the settings the embeddings were made with (a rerun must match them)
    embeddings/shard-00000.safetensors    "embeddings" [the shard's tokens, n_embed] in the encoder's dtype and
                                          "offsets" [images + 1], as `gundam encode --out` writes them
    manifest/shard-00000.parquet          one row per page or image: id, index (input order), source, page,
                                          width, height, grid, tokens, shard, start, end (rows of the shard's
                                          embeddings), error (null, or why it failed)

Each file is written under a temporary name and renamed into place, the manifest last: a shard whose manifest
exists is finished. A rerun skips the ids of finished shards and encodes the rest into new shards, so a crash
loses at most the shard being written; what failed counts as done unless `retry_failed`. One run at a time writes
a folder: a run holds a lock on `.lock` in it (released when it ends, crashed or not), and a second run on the
folder meanwhile is refused.

The work is planned before anything is decoded: items in input order, cut into shards of `shard_size` items,
each shard cut into encoder batches of at most `batch_size` views (estimated from image headers and PDF page
sizes). Both engines encode exactly these batches (the encoder's floating-point result depends on what else is
in the batch), so they write the same embeddings, bit for bit, and a run interrupted and resumed writes what an
uninterrupted one would.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from gundam.config import EncoderConfig, Mode, check_int, check_positive, resolve_mode
from gundam.data import ViewBudgetSampler
from gundam.images import Batch, image_views
from gundam.layout import grid_layout, image_layout
from gundam.sources import PDF_DPI, Item, expand_inputs, load_item

try:
    import fcntl
except ImportError:     # Windows: no flock; keeping to one run per output folder is up to the user there
    fcntl = None

ENGINES = ("local", "ray")
MANIFEST_COLUMNS = ("id", "index", "source", "page", "width", "height", "grid", "tokens", "shard", "start", "end",
                    "error")


@dataclass(frozen=True)
class Settings:
    """What the embeddings depend on (recorded in run.json; a rerun must match), and where they are computed."""
    mode: Mode
    dpi: float
    weights: str | None          # absolute path, or None: random weights (seed 0)
    config: EncoderConfig
    dtype: torch.dtype
    device: str = "cpu"          # not recorded: the same weights give the same embeddings within rounding anywhere
    backend: str = "auto"

    def record(self) -> dict:
        """The recorded part, as JSON values."""
        return json.loads(json.dumps({"mode": asdict(self.mode), "dpi": self.dpi, "weights": self.weights,
                                      "dtype": str(self.dtype).removeprefix("torch."),
                                      "config": asdict(self.config)}))


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


def load_encoder(settings: Settings):
    """The encoder the settings name: a checkpoint, or random weights (seed 0, so every process builds the same)."""
    from gundam.encoder import GundamEncoder
    s = settings
    return GundamEncoder.build(s.weights, config=s.config, dtype=s.dtype, device=s.device, backend=s.backend)


# ---------------------------------------------------------------------------------------------- plan


def estimated_views(item: Item, mode: Mode) -> int:
    """1 + crops, from the size read without decoding (1 when unknown: a bad item costs the encoder nothing)."""
    if item.error or item.size is None:
        return 1
    return 1 + image_layout(*item.size, mode).n_crops


def plan(items: list[Item], mode: Mode, batch_size: int, shard_size: int) -> list[list[list[int]]]:
    """Shards of at most `shard_size` consecutive items, each cut in order into batches of at most `batch_size`
    views: [shard][batch] -> positions in `items`. Batches never span shards, so a resumed run batches alike."""
    views = [estimated_views(it, mode) for it in items]
    shards = []
    for s in range(0, len(items), shard_size):
        sampler = ViewBudgetSampler(views[s:s + shard_size], batch_size, shuffle=False)
        shards.append([[s + i for i in batch] for batch in sampler.batches()])
    return shards


# ------------------------------------------------------------------------------ preprocess and encode


@dataclass
class Prepared:
    """One item after preprocessing: its manifest row so far and its views (None when it failed)."""
    row: dict
    global_view: torch.Tensor | None = None    # uint8 [3, B, B]
    crops: torch.Tensor | None = None          # uint8 [n_crops, 3, S, S]


def prepare(item: Item, index: int, mode: Mode, dpi: float) -> Prepared:
    """Decode (or render) and crop one item; never raises: a bad input becomes a row with its error."""
    row = {"id": item.id, "index": index, "source": item.source, "page": item.page, "width": None, "height": None,
           "grid": None, "tokens": None, "error": None}
    try:
        glob, crops, lay = image_views(load_item(item, dpi), mode)
    except Exception as e:  # noqa: BLE001 - any bad input is recorded, the run goes on
        row["error"] = _one_line(e) if isinstance(e, ValueError) else f"{item.id!r}: {type(e).__name__}: {_one_line(e)}"
        return Prepared(row)
    row.update(width=lay.width, height=lay.height, grid=list(lay.grid), tokens=lay.tokens)
    return Prepared(row, glob, crops)


@dataclass
class Group:
    """One encoder batch: every item's row in order, and a Batch of those without error (None if all failed)."""
    rows: list[dict]
    batch: Batch | None

    def pin_memory(self) -> "Group":
        return Group(self.rows, self.batch.pin_memory() if self.batch is not None else None)


def row_layout(row: dict, mode: Mode):
    """The ImageLayout of a prepared item's manifest row (what the encoder's Batch needs of it)."""
    return grid_layout(mode, tuple(row["grid"]), row["width"], row["height"])


def collate_group(prepared: list[Prepared], mode: Mode) -> Group:
    ok = [p for p in prepared if p.row["error"] is None]
    batch = None
    if ok:
        batch = Batch.from_views([(p.global_view, p.crops, row_layout(p.row, mode)) for p in ok], mode)
    return Group([p.row for p in prepared], batch)


def encode_group(encoder, group: Group) -> tuple[list[dict], torch.Tensor | None]:
    """(rows, embeddings of the items without error, packed in order [their tokens, n_embed], on the CPU).
    An encoder failure (e.g. out of memory) fails this batch's items, not the run."""
    if group.batch is None:
        return group.rows, None
    try:
        with torch.inference_mode():
            return group.rows, encoder(group.batch).embeddings.cpu()
    except RuntimeError as e:
        for row in group.rows:
            if row["error"] is None:
                row["error"] = f"{row['id']!r}: encoder failed ({_one_line(e)})"
        return group.rows, None


def _one_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


# ------------------------------------------------------------------------------------ shards on disk


def _atomic(write, path: str):
    """write(tmp) then rename: a reader never sees a partial file, a crash leaves only a hidden temp file."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    write(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # as an ordinary new file (safetensors makes its files private)
    os.replace(tmp, path)


def write_shard(out_dir: str, number: int, rows: list[dict], embeddings: list[torch.Tensor], settings: Settings):
    """One shard: its embeddings file, then its manifest (the mark that the shard is finished). Returns the
    manifest's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.torch import save_file

    name = f"shard-{number:05d}"
    n_embed = settings.config.projector.n_embed
    emb = torch.cat(embeddings) if embeddings else torch.zeros(0, n_embed, dtype=settings.dtype)
    done = [r for r in rows if r["error"] is None]
    offsets = torch.tensor([0] + [r["tokens"] for r in done], dtype=torch.int64).cumsum(0)
    if offsets[-1] != emb.shape[0]:
        raise RuntimeError(f"{name}: {emb.shape[0]} embedding rows for {int(offsets[-1])} tokens")
    start = iter(offsets.tolist())
    for r in rows:
        ok = r["error"] is None
        r["shard"] = f"{name}.safetensors" if ok else None
        r["start"] = next(start) if ok else None
        r["end"] = r["start"] + r["tokens"] if ok else None
    metadata = {"ids": "\n".join(r["id"] for r in done)}   # one key: safetensors orders several at random
    _atomic(lambda tmp: save_file({"embeddings": emb.contiguous(), "offsets": offsets}, tmp, metadata=metadata),
            os.path.join(out_dir, "embeddings", f"{name}.safetensors"))
    schema = pa.schema([("id", pa.string()), ("index", pa.int64()), ("source", pa.string()), ("page", pa.int32()),
                        ("width", pa.int32()), ("height", pa.int32()), ("grid", pa.list_(pa.int32(), 2)),
                        ("tokens", pa.int32()), ("shard", pa.string()), ("start", pa.int64()), ("end", pa.int64()),
                        ("error", pa.string())],
                       metadata={"gundam": json.dumps(settings.record())})
    table = pa.Table.from_pylist([{k: r[k] for k in MANIFEST_COLUMNS} for r in rows], schema=schema)
    path = os.path.join(out_dir, "manifest", f"{name}.parquet")
    _atomic(lambda tmp: pq.write_table(table, tmp), path)
    return path


def _manifest_files(out_dir: str) -> list[str]:
    folder = os.path.join(out_dir, "manifest")
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.startswith("shard-") and f.endswith(".parquet"))


def read_manifest(out_dir) -> list[dict]:
    """One row per id of the finished shards (failures too), in input order. An id encoded again after failing
    (`retry_failed`) has a row per attempt in the shards; the latest is the one returned."""
    import pyarrow.parquet as pq
    out_dir = os.fspath(out_dir)
    files = _manifest_files(out_dir)
    if not files:
        raise ValueError(f"{out_dir!r}: no manifest/shard-*.parquet: expected the --out folder of "
                         f"`gundam encode-dataset`")
    latest = {r["id"]: r for f in files for r in pq.read_table(f).to_pylist()}   # files in shard order
    return sorted(latest.values(), key=lambda r: (r["index"], r["shard"] or ""))


def read_embeddings(out_dir):
    """Yield (id, embeddings [tokens, n_embed] tensor, metadata dict) for every encoded page and image of an
    `encode-dataset` folder, in input order (failed items are in `read_manifest`, not here). Shards are read
    lazily, one image at a time."""
    from safetensors import safe_open
    out_dir = os.fspath(out_dir)
    shard = f = None
    for row in read_manifest(out_dir):
        if row["error"] is not None:
            continue
        if row["shard"] != shard:   # one shard open at a time (rows come shard by shard)
            shard = row["shard"]
            f = safe_open(os.path.join(out_dir, "embeddings", shard), framework="pt")
        embeddings = f.get_slice("embeddings")[row["start"]:row["end"]]
        meta = {k: v for k, v in row.items() if k != "id"}
        yield row["id"], embeddings, meta


@contextlib.contextmanager
def _exclusive(out_dir: str):
    """Create the output folder and hold its lock while the block runs: two runs writing one folder would
    number their shards alike. The OS drops the lock when the process dies."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir!r}: is a file, expected a folder (new or of an earlier run)")
    os.makedirs(out_dir, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise ValueError(f"--out {out_dir!r}: not writable")
    with open(os.path.join(out_dir, ".lock"), "a") as lock:
        try:
            if fcntl is not None:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"--out {out_dir!r}: another run is writing it, expected one run per folder at a "
                             "time") from None
        yield


def _open_output(out_dir: str, settings: Settings, retry_failed: bool) -> tuple[set[str], int]:
    """Reopen the output folder (or set up a new one): (ids done in finished shards, failed ones only if not
    `retry_failed`; number of the next shard). A folder written with other settings is refused (its embeddings
    would not be comparable with new ones)."""
    import pyarrow.parquet as pq
    for sub in ("embeddings", "manifest"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    record, run = settings.record(), os.path.join(out_dir, "run.json")
    if os.path.exists(run):
        with open(run, encoding="utf-8") as f:
            before = json.load(f)
        changed = [k for k in record if before.get(k) != record[k]]
        if changed:
            k = changed[0]
            raise ValueError(f"--out {out_dir!r} holds embeddings made with {k}={before.get(k)!r}, this run has "
                             f"{k}={record[k]!r}: expected the same settings to resume (or another --out)")
    else:
        def write(tmp):
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=1)
        _atomic(write, run)
    files = _manifest_files(out_dir)
    done = {r["id"] for f in files for r in pq.read_table(f, columns=["id", "error"]).to_pylist()
            if r["error"] is None or not retry_failed}
    next_number = 1 + max((int(os.path.basename(f)[6:11]) for f in files), default=-1)
    return done, next_number


# ------------------------------------------------------------------------------------------- engines


class _ItemDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], indices: list[int], mode: Mode, dpi: float):
        self.items, self.indices, self.mode, self.dpi = items, indices, mode, dpi

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        return prepare(self.items[i], self.indices[i], self.mode, self.dpi)


def local_groups(items, indices, batches, settings: Settings, workers: int):
    """Local engine: preprocessing in `workers` processes (a torch DataLoader, each batch planned ahead) while
    this process encodes on one device. Yields (rows, embeddings) per batch, in order."""
    from functools import partial
    from torch.utils.data import DataLoader

    encoder = load_encoder(settings)
    loader = DataLoader(_ItemDataset(items, indices, settings.mode, settings.dpi), batch_sampler=batches,
                        collate_fn=partial(collate_group, mode=settings.mode), num_workers=workers,
                        pin_memory=torch.device(settings.device).type == "cuda",
                        prefetch_factor=4 if workers else None)
    for group in loader:
        yield encode_group(encoder, group)


def _ray_prepare(row: dict, mode: Mode, dpi: float) -> list[dict]:
    """Ray CPU task: one planned batch's items -> their rows and views."""
    items = [(Item.from_dict(d), i) for d, i in json.loads(row["items"])]
    group = collate_group([prepare(item, i, mode, dpi) for item, i in items], mode)
    B, S = mode.base_size, mode.image_size
    b = group.batch
    return [{"group": row["group"], "rows": json.dumps(group.rows),
             "global_views": (b.global_views if b else torch.zeros(0, 3, B, B, dtype=torch.uint8)).numpy(),
             "crops": (b.crops if b else torch.zeros(0, 3, S, S, dtype=torch.uint8)).numpy()}]


class _RayEncoder:
    """Ray actor holding the encoder (one per GPU): a prepared batch -> its rows and packed embeddings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.encoder = load_encoder(settings)

    def __call__(self, batch: dict) -> dict:
        mode = self.settings.mode
        rows = json.loads(batch["rows"][0])
        ok = [r for r in rows if r["error"] is None]
        views = None
        if ok:
            views = Batch(torch.from_numpy(np.array(batch["global_views"][0])),   # copies: Ray's are read-only
                          torch.from_numpy(np.array(batch["crops"][0])), [row_layout(r, mode) for r in ok], mode)
        rows, emb = encode_group(self.encoder, Group(rows, views))
        if emb is None:
            emb = torch.zeros(0, self.settings.config.projector.n_embed, dtype=self.settings.dtype)
        raw = emb.view(torch.int16) if emb.dtype == torch.bfloat16 else emb   # numpy has no bfloat16
        return {"group": batch["group"], "rows": [json.dumps(rows)], "embeddings": [raw.numpy()]}


def ray_groups(items, indices, batches, settings: Settings, n_gpus: int):
    """Ray engine: the planned batches as a Ray dataset; each is preprocessed in a CPU task, encoded by an actor
    holding the encoder (one per GPU; one CPU actor without GPUs), and comes back here in order."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True     # shards are written in order, as by the local engine
    ctx.enable_progress_bars = False
    rows = [{"group": g, "items": json.dumps([(items[i].to_dict(), indices[i]) for i in batch])}
            for g, batch in enumerate(batches)]
    gpu = torch.device(settings.device).type == "cuda"
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # flat_map, not map: Ray would fuse a 1:1 map with an actor of the same resources into that actor
    ds = ds.flat_map(_ray_prepare, fn_kwargs={"mode": settings.mode, "dpi": settings.dpi}, num_cpus=1)
    ds = ds.map_batches(_RayEncoder, fn_constructor_kwargs={"settings": settings}, batch_size=1,
                        batch_format="numpy", concurrency=n_gpus if gpu else 1, num_gpus=1 if gpu else 0, num_cpus=1)
    for row in ds.iter_rows():
        emb = torch.from_numpy(np.array(row["embeddings"]))
        yield json.loads(row["rows"]), emb.view(settings.dtype) if settings.dtype == torch.bfloat16 else emb


def _ray_connect(address: str | None) -> int:
    """Connect to Ray (a running cluster at `address`, or a new local one) unless already connected; the
    cluster's GPU count."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("engine='ray' needs Ray: pip install 'gundam-encoder[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return int(ray.cluster_resources().get("GPU", 0))


# ------------------------------------------------------------------------------------------ the run


def encode_dataset(inputs, out, *, engine: str = "local", mode: str | Mode = "gundam", max_crops: int | None = None,
                   batch_size: int = 32, shard_size: int = 256, dpi: float = PDF_DPI, weights=None,
                   config: EncoderConfig | None = None, dtype="auto", device=None, backend: str = "auto",
                   workers: int | None = None, ray_address: str | None = None, max_shards: int | None = None,
                   retry_failed: bool = False, verbose: bool = True) -> Summary:
    """Encode every image and PDF page of `inputs` into the folder `out` (see the module docstring); returns a
    Summary. Bad inputs are recorded with their error and do not stop the run.

    batch_size: views per encoder batch (a page is 1 + its crops); shard_size: pages and images per shard;
    workers: preprocessing processes of the local engine (default: the CPUs, at most 8; 0: in this process);
    max_shards: stop after that many new shards (a rerun goes on); retry_failed: encode again the ids that failed
    in earlier runs (a fixed file; an encoder that ran out of memory), else they count as done; dtype "auto":
    bfloat16 on CUDA and on CPUs with native bf16, float32 otherwise; device: default cuda when there is one (on
    Ray: in the cluster)."""
    from tqdm import tqdm

    from gundam.weights import resolve_device, resolve_dtype, weights_line

    t0 = time.perf_counter()
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: expected one of {', '.join(ENGINES)}")
    if ray_address is not None and engine != "ray":
        raise ValueError(f"ray_address={ray_address!r} with engine={engine!r}: expected engine='ray'")
    mode, dpi = resolve_mode(mode, max_crops), check_positive(dpi, "dpi")
    batch_size, shard_size = check_int(batch_size, "batch_size"), check_int(shard_size, "shard_size")
    if batch_size < 1 + mode.max_crops:
        raise ValueError(f"batch_size={batch_size} views: an image can have {1 + mode.max_crops} (a global view and "
                         f"max_crops={mode.max_crops} crops): expected at least {1 + mode.max_crops}")
    workers = min(8, os.cpu_count() or 1) if workers is None else check_int(workers, "workers", 0)
    if max_shards is not None:
        max_shards = check_int(max_shards, "max_shards")
    if weights is not None:
        from gundam.weights import checkpoint_files
        checkpoint_files(weights)   # a missing checkpoint fails now, not in a worker
        weights = os.path.abspath(os.fspath(weights))
    n_gpus = 0
    if engine == "ray":
        n_gpus = _ray_connect(ray_address)
        device = torch.device(device or ("cuda" if n_gpus else "cpu"))
        if device.type == "cuda" and not n_gpus:
            raise ValueError(f"device={str(device)!r}: the Ray cluster has no GPU")
    else:
        device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    settings = Settings(mode, dpi, weights, config or EncoderConfig.deepseek_ocr(), dtype, str(device), backend)
    out = os.fspath(out)
    with _exclusive(out):   # one run per folder at a time
        finished, number = _open_output(out, settings, retry_failed)
        items = expand_inputs(inputs, dpi)
        todo = [i for i, it in enumerate(items) if it.id not in finished]
        shards = plan([items[i] for i in todo], mode, batch_size, shard_size)
        summary = Summary(len(items), len(items) - len(todo))
        if max_shards is not None and len(shards) > max_shards:
            shards = shards[:max_shards]
        n_todo = sum(len(b) for s in shards for b in s)
        summary.remaining = len(todo) - n_todo
        if verbose:
            print(weights_line(weights))
            print(f"inputs: {len(items)} pages and images, {summary.skipped} already in {out!r}, {n_todo} to encode in "
                  f"{len(shards)} shards ({engine} engine, {settings.device}, "
                  f"{str(dtype).removeprefix('torch.')}, batches of <= {batch_size} views)")
        if not shards:
            summary.seconds = time.perf_counter() - t0
            return summary

        batches = [b for s in shards for b in s]
        work = [items[i] for i in todo[:n_todo]]
        indices = todo[:n_todo]
        stream = (local_groups(work, indices, batches, settings, workers) if engine == "local"
                  else ray_groups(work, indices, batches, settings, n_gpus))
        bar = tqdm(total=n_todo, unit="page", disable=not verbose, file=sys.stderr, smoothing=0.1)
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
            summary.shards.append(write_shard(out, number + k, rows, embeddings, settings))
            summary.encoded += len(rows)
        stream.close()
        bar.close()
        summary.seconds = time.perf_counter() - t0
        return summary
