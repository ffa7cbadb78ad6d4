"""The engines of `encode_dataset`: each item decoded (or rendered) and cropped, a planned batch collated and
encoded; locally (preprocessing in worker processes, the encoder in this one) or on Ray (CPU tasks preprocess,
an actor per GPU encodes). Both yield (rows, embeddings) per planned batch, in order."""
from __future__ import annotations

import json
import os
import socket
import threading
from dataclasses import dataclass

import numpy as np
import torch

from gundam.bulk.planning import Settings
from gundam.bulk.sources import Item, load_item, one_line
from gundam.config import Mode
from gundam.images import Batch, image_views
from gundam.layout import grid_layout

ENGINES = ("local", "ray")
# seconds the Ray engine waits to reach a cluster (and, 10x that, for its encoder actors to start): a bound, so a
# wrong address or a cluster without room for the actors is an error, not a wait without end
RAY_TIMEOUT = float(os.environ.get("GUNDAM_RAY_TIMEOUT", "60"))


def load_encoder(settings: Settings):
    """The encoder the settings name: a checkpoint, or random weights (seed 0, so every process builds the same)."""
    from gundam.encoder import GundamEncoder
    s = settings
    return GundamEncoder.build(s.weights, config=s.config, dtype=s.dtype, device=s.device, backend=s.backend)


def check_weights(settings: Settings):
    """Read and check every encoder tensor of the settings' checkpoint (as `load_encoder` would, on the CPU),
    without building an encoder: the Ray engine's driver does this before any work, since its actors load the
    weights only once the pipeline runs."""
    if settings.weights is None:
        return
    from gundam.encoder import GundamEncoder
    from gundam.weights import load_encoder_state_dict
    with torch.device("meta"):
        shape = GundamEncoder(settings.config)
    load_encoder_state_dict(settings.weights, shape, device="cpu", dtype=settings.dtype)


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
        row["error"] = one_line(e) if isinstance(e, ValueError) else f"{item.id!r}: {type(e).__name__}: {one_line(e)}"
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
                row["error"] = f"{row['id']!r}: encoder failed ({one_line(e)})"
        return group.rows, None


# ------------------------------------------------------------------------------------------- engines


class _ItemDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[Item], indices: list[int], mode: Mode, dpi: float):
        self.items, self.indices, self.mode, self.dpi = items, indices, mode, dpi

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> Prepared:
        return prepare(self.items[i], self.indices[i], self.mode, self.dpi)


def local_groups(items, indices, batches, settings: Settings, workers: int, encoder=None):
    """Local engine: preprocessing in `workers` processes (a torch DataLoader, each batch planned ahead) while
    this process encodes on one device (with `encoder`, default the one the settings name). Yields (rows,
    embeddings) per batch, in order."""
    from functools import partial
    from torch.utils.data import DataLoader

    if encoder is None:
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
    ctx.wait_for_min_actors_s = int(10 * RAY_TIMEOUT)   # a cluster without room for the actor: an error
    gpu = torch.device(settings.device).type == "cuda"
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # flat_map, not map: Ray would fuse a 1:1 map with an actor of the same resources into that actor
    ds = ds.flat_map(_ray_prepare, fn_kwargs={"mode": settings.mode, "dpi": settings.dpi}, num_cpus=1)
    ds = ds.map_batches(RayEncoder, fn_constructor_kwargs={"settings": settings}, batch_size=1,
                        batch_format="numpy", concurrency=n_gpus if gpu else 1, num_gpus=1 if gpu else 0, num_cpus=1)
    rows = iter(ds.iter_rows())
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except ray.exceptions.RayError as e:   # multi-line, with remote tracebacks: the cause's first line
            cause = getattr(e, "cause", None)
            raise RuntimeError(f"Ray engine: {one_line(cause if isinstance(cause, BaseException) else e)}") from None
        emb = torch.from_numpy(np.array(row["embeddings"]))
        yield json.loads(row["rows"]), emb.view(settings.dtype) if settings.dtype == torch.bfloat16 else emb


def ray_connect(address: str | None) -> int:
    """Connect to Ray (a running cluster at `address`, or a new local one) unless already connected; the
    cluster's GPU count. Reaching a cluster is bounded by RAY_TIMEOUT: an address where nothing answers, or
    something that is not Ray, is a one-line ValueError naming it (Ray itself would retry for minutes)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError("engine='ray' needs Ray: pip install 'gundam-encoder[ray]'") from None
    if not ray.is_initialized():
        shown = address if address not in (None, "auto") else os.environ.get("RAY_ADDRESS") or address
        target = _ray_target(address, shown)
        if target is None:   # a new Ray on this machine: nothing to reach
            ray.init(address=address, log_to_driver=False)
        else:
            _reach(*target, shown)
            _bounded(lambda: ray.init(address=address, log_to_driver=False), target, shown)
    return int(ray.cluster_resources().get("GPU", 0))


def _ray_target(address: str | None, shown) -> tuple[str, int] | None:
    """(host, port) that ray.init(address) will connect to (RAY_ADDRESS, "auto" and a `ray start` cluster of
    this machine resolved as Ray resolves them), or None when it will start a new local Ray."""
    if address is None or address == "auto":
        address = os.environ.get("RAY_ADDRESS") or address
    if address == "local":
        return None
    if isinstance(address, str) and address.startswith("ray://"):
        hostport, default = address[len("ray://"):].split("/")[0], 10001   # the Ray client's port
    else:
        try:
            from ray._private.services import canonicalize_bootstrap_address
        except ImportError:   # another Ray: where it connects cannot be told before it does
            return None
        try:
            hostport = canonicalize_bootstrap_address(address)
        except (ConnectionError, ValueError) as e:
            raise ValueError(f"ray_address={shown!r}: {one_line(e)}") from None
        if hostport is None:
            return None
        default = 6379
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        host, port = hostport, str(default)
    return host.strip("[]"), int(port)


def _reach(host: str, port: int, shown):
    """A TCP connection to the cluster's port within the bound, or a ValueError naming the address."""
    timeout = min(10.0, RAY_TIMEOUT)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        why = "timed out" if isinstance(e, TimeoutError) else e.strerror or one_line(e)
        raise ValueError(f"ray_address={shown!r}: cannot reach {host}:{port} within {timeout:g}s ({why}): "
                         f"expected a running Ray cluster there (`ray start --head` on its head node)") from None


def _bounded(connect, target, shown):
    """Run `connect` (ray.init) with the bound: in a daemon thread, since ray.init cannot be interrupted; one
    that is still waiting at the bound is left behind (the process can exit) and reported."""
    box = {}

    def run():
        try:
            connect()
        except BaseException as e:  # noqa: BLE001 - reported in the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run, name="gundam-ray-connect", daemon=True)
    thread.start()
    thread.join(RAY_TIMEOUT)
    where = f"ray_address={shown!r} ({target[0]}:{target[1]})"
    if thread.is_alive():
        raise ValueError(f"{where}: answers, but Ray did not connect within {RAY_TIMEOUT:g}s: expected the address "
                         f"of a Ray cluster (its GCS port, 6379 unless `ray start --head --port` says otherwise, or "
                         f"ray://HOST:10001)")
    if "error" in box:
        raise ValueError(f"{where}: cannot connect ({one_line(box['error'])})") from None
