"""What a run's embeddings depend on (`Settings`), and its plan, made before anything is decoded: items in input
order cut into shards of `shard_size` items, each shard cut into encoder batches of at most `batch_size` views
(estimated from image headers and PDF page sizes)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from gundam.bulk.sources import Item
from gundam.config import EncoderConfig, Mode
from gundam.inputs import view_budget_batches
from gundam.layout import image_layout


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
    # torch's CPU threads in the process that makes the settings (the local engine encodes there) and in the Ray
    # actor: on CPUs with AMX, oneDNN cuts the sums of its bf16 matmuls by the thread count, so the last bits
    # depend on it. Not recorded, like device
    threads: int = field(default_factory=torch.get_num_threads)

    def record(self) -> dict:
        """The recorded part, as JSON values."""
        return json.loads(json.dumps({"mode": asdict(self.mode), "dpi": self.dpi, "weights": self.weights,
                                      "dtype": str(self.dtype).removeprefix("torch."),
                                      "config": asdict(self.config)}))


def max_views(mode: Mode) -> int:
    """The most views one image can have in `mode`: its global view, and max_crops crops when the mode crops."""
    return 1 + (mode.max_crops if mode.crop_mode else 0)


def estimated_views(item: Item, mode: Mode) -> int:
    """1 + crops, from the size read without decoding (1 when unknown: a bad item costs the encoder nothing)."""
    if item.error or item.size is None:
        return 1
    return 1 + image_layout(*item.size, mode).n_crops


def plan(items: list[Item], mode: Mode, batch_size: int, shard_size: int) -> list[list[list[int]]]:
    """Shards of at most `shard_size` consecutive items, each cut in order into batches of at most `batch_size`
    views: [shard][batch] -> positions in `items`. Batches never span shards, so a resumed run batches alike."""
    views = [estimated_views(it, mode) for it in items]
    return [view_budget_batches(views, batch_size, range(s, min(s + shard_size, len(items))))
            for s in range(0, len(items), shard_size)]
