"""The training dataset: records -> uint8 views decoded in the loader's workers, `collate` into the encoder's
`Batch`, and a batch sampler that fills batches by a budget of views."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, Sampler

from gundam.config import Mode, check_int, resolve_mode
from gundam.data.records import Record, read_records
from gundam.images import Batch, image_views
from gundam.inputs import view_budget_batches
from gundam.layout import ImageLayout, image_layout


@dataclass
class Example:
    """One decoded record: what `GundamDataset[i]` yields."""
    global_view: torch.Tensor   # uint8 [3, B, B]
    crops: torch.Tensor         # uint8 [n_crops, 3, S, S], row-major tile order
    layout: ImageLayout
    record: Record


class GundamDataset(Dataset):
    """Records -> `Example`s; each image is decoded and cropped when it is asked for (in the loader's worker)."""

    def __init__(self, records: list[Record], root, mode: str | Mode = "gundam", max_crops: int | None = None):
        if isinstance(records, (str, bytes, os.PathLike)) or not hasattr(records, "__iter__"):
            raise TypeError(f"records of type {type(records).__name__}: expected a list of Record (for a JSONL "
                            f"file: GundamDataset.from_jsonl)")
        self.records = list(records)
        for i, r in enumerate(self.records):
            if not isinstance(r, Record):
                raise TypeError(f"records[{i}] of type {type(r).__name__}: expected a Record")
        if not isinstance(root, (str, os.PathLike)):
            raise TypeError(f"root of type {type(root).__name__}: expected a folder path (str or os.PathLike)")
        self.root = os.fspath(root)
        self.mode = resolve_mode(mode, max_crops)
        # from the recorded sizes: a sampler can plan batches before any image is decoded
        self.layouts = [image_layout(r.width, r.height, self.mode) for r in self.records]

    @classmethod
    def from_jsonl(cls, path, mode: str | Mode = "gundam", max_crops: int | None = None,
                   limit: int | None = None) -> "GundamDataset":
        """The records of a JSONL file (the first `limit` of them when given); images relative to the file."""
        records = read_records(path)
        if limit is not None:
            records = records[:check_int(limit, "limit")]
        return cls(records, os.path.dirname(os.path.abspath(path)), mode, max_crops)

    @property
    def views(self) -> list[int]:
        """Views per record (the global view + its crops): what a batch costs the encoder."""
        return [1 + lay.n_crops for lay in self.layouts]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Example:
        record = self.records[i]
        glob, crops, layout = image_views(os.path.join(self.root, record.image), self.mode)
        if (layout.width, layout.height) != (record.width, record.height):
            raise ValueError(f"record {record.id!r}: width x height {record.width}x{record.height}, but the image "
                             f"{record.image!r} is {layout.width}x{layout.height}")
        return Example(glob, crops, layout, record)


@dataclass
class RecordBatch:
    """A collated batch: the encoder's `Batch` (uint8 pixels) and the records, in the same image order."""
    batch: Batch
    records: list[Record]
    crop_offsets: torch.Tensor  # int64 [n_images + 1]: image i's crops are crops[crop_offsets[i]:crop_offsets[i+1]]

    @property
    def offsets(self) -> torch.Tensor:
        """int64 [n_images + 1]: image i's tokens are rows offsets[i]:offsets[i + 1] of the encoder output."""
        return self.batch.offsets

    def pin_memory(self) -> "RecordBatch":
        """Pinned pixels (DataLoader(pin_memory=True) calls this), so the copy to the GPU can be asynchronous."""
        return RecordBatch(self.batch.pin_memory(), self.records, self.crop_offsets)

    def to(self, device) -> "RecordBatch":
        """Pixels moved to `device` (still uint8: the encoder normalises them there)."""
        return RecordBatch(self.batch.to(device, non_blocking=True), self.records, self.crop_offsets)


def collate(examples: list[Example]) -> RecordBatch:
    """Examples -> RecordBatch: global views stacked, crops concatenated in image order."""
    if not isinstance(examples, (list, tuple)) or not all(isinstance(ex, Example) for ex in examples):
        what = type(examples).__name__ if not isinstance(examples, (list, tuple)) else "a list holding " + ", ".join(
            sorted({type(ex).__name__ for ex in examples if not isinstance(ex, Example)}))
        raise TypeError(f"collate: got {what}, expected a list of Example (what GundamDataset yields)")
    if not examples:
        raise ValueError("collate: got no examples, expected at least one")
    mode = examples[0].layout.mode
    for ex in examples:
        if ex.layout.mode != mode:
            raise ValueError(f"collate: record {ex.record.id!r} has mode {ex.layout.mode}, the batch has {mode}")
    crop_offsets = torch.tensor([0] + [ex.layout.n_crops for ex in examples], dtype=torch.int64).cumsum(0)
    batch = Batch.from_views([(ex.global_view, ex.crops, ex.layout) for ex in examples], mode)
    return RecordBatch(batch, [ex.record for ex in examples], crop_offsets)


# seed + epoch seeds torch's generator, which holds 64 bits: each below 2^63, their sum always fits
MAX_SEED = 2 ** 63 - 1


class ViewBudgetSampler(Sampler[list[int]]):
    """Batches of indices whose views (1 + crops per image) add up to at most `budget`.

    The encoder's cost follows the number of views, not of images: a receipt cut 1x5 is six views, a chart cut
    2x1 three. Indices are shuffled with `seed` (plus the epoch, see `set_epoch`) and put into batches in that
    order, a new batch whenever the next image would pass the budget. Every index appears exactly once per
    epoch. `seed` and the epoch are integers in 0..2^63-1.
    """

    def __init__(self, views: list[int], budget: int, shuffle: bool = True, seed: int = 0):
        if isinstance(views, (str, bytes)) or not hasattr(views, "__iter__"):
            raise TypeError(f"views of type {type(views).__name__}: expected a list of view counts (dataset.views)")
        if not isinstance(shuffle, bool):
            raise TypeError(f"shuffle={shuffle!r}: expected True or False")
        self.views = [check_int(v, f"views[{i}]") for i, v in enumerate(views)]
        self.budget = check_int(budget, "budget")
        worst = max(range(len(self.views)), key=self.views.__getitem__, default=None)
        if worst is not None and self.views[worst] > self.budget:
            raise ValueError(f"budget={budget} views: item {worst} alone has {self.views[worst]} views; "
                             f"expected a budget of at least {self.views[worst]}")
        self.shuffle = shuffle
        self.seed = check_int(seed, "seed", 0, MAX_SEED)
        self.epoch = 0

    def set_epoch(self, epoch: int):
        """A different (still deterministic) order per epoch; call it before each epoch, as with torch's
        DistributedSampler."""
        self.epoch = check_int(epoch, "epoch", 0, MAX_SEED)

    def batches(self) -> list[list[int]]:
        order = None   # index order
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.views), generator=g).tolist()
        return view_budget_batches(self.views, self.budget, order)

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())
