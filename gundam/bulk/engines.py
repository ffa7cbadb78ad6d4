"""The engines of `encode_dataset`: each item decoded (or rendered) and cropped, a planned batch collated and
encoded; locally (preprocessing in worker processes, the encoder in this one) or on Ray (CPU tasks preprocess,
an actor per GPU encodes). Both yield (rows, embeddings) per planned batch, in order."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch

from gundam.bulk.planning import Settings
from gundam.bulk.sources import Item, load_item
from gundam.config import Mode
from gundam.images import Batch, image_views
from gundam.layout import grid_layout

ENGINES = ("local", "ray")


def load_encoder(settings: Settings):
    """The encoder the settings name: a checkpoint, or random weights (seed 0, so every process builds the same)."""
    from gundam.encoder import GundamEncoder
    s = settings
    return GundamEncoder.build(s.weights, config=s.config, dtype=s.dtype, device=s.device, backend=s.backend)


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


class RayEncoder:
    """Ray actor holding the encoder (one per GPU): a prepared batch -> its rows and packed embeddings."""

    def __init__(self, settings: Settings):
        self.settings = settings
        # the driver's thread count, not Ray's one per reserved CPU: on AMX the bf16 bits depend on it
        torch.set_num_threads(settings.threads)
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
    ds = ds.map_batches(RayEncoder, fn_constructor_kwargs={"settings": settings}, batch_size=1,
                        batch_format="numpy", concurrency=n_gpus if gpu else 1, num_gpus=1 if gpu else 0, num_cpus=1)
    for row in ds.iter_rows():
        emb = torch.from_numpy(np.array(row["embeddings"]))
        yield json.loads(row["rows"]), emb.view(settings.dtype) if settings.dtype == torch.bfloat16 else emb


def ray_connect(address: str | None) -> int:
    """Connect to Ray (a running cluster at `address`, or a new local one) unless already connected; the
    cluster's GPU count."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("engine='ray' needs Ray: pip install 'gundam-encoder[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    return int(ray.cluster_resources().get("GPU", 0))
