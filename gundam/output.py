"""What a forward returns: `EncoderOutput` (all images' tokens packed, per-image offsets) and the stage timer
behind its `timings`. Both encoder paths and the CUDA-graph replay (gundam.graphs) make these."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

# `EncoderOutput.timings` keys per encoder family, both backends ("layout": projector + layout)
TIMED_STAGES = {"deepseek-ocr": ("sam", "clip", "layout"), "deepseek-ocr2": ("sam", "qwen2", "layout")}


class StageTimer:
    """Seconds per stage of one forward. On CUDA, events are recorded between stages and read only when the
    timings are asked for, so timing adds no host synchronisation to the forward."""

    def __init__(self, device: torch.device, stages: tuple[str, ...] = TIMED_STAGES["deepseek-ocr"],
                 enabled: bool = True):
        self.cuda, self.enabled, self.stages = device.type == "cuda", enabled, stages
        self.marks = [("start", self._now())] if enabled else []

    def _now(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def mark(self, stage: str):
        if self.enabled:
            self.marks.append((stage, self._now()))

    def seconds(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        if self.cuda:
            self.marks[-1][1].synchronize()
        out = dict.fromkeys(self.stages, 0.0)
        for (_, t0), (stage, t1) in zip(self.marks, self.marks[1:]):
            out[stage] += t0.elapsed_time(t1) / 1e3 if self.cuda else t1 - t0
        return out


@dataclass
class EncoderOutput:
    """All images' tokens packed: image i is embeddings[offsets[i]:offsets[i+1]]."""
    embeddings: torch.Tensor          # [total_tokens, n_embed]
    offsets: torch.Tensor             # [n_images + 1], int64, on the CPU
    timer: StageTimer | None = field(default=None, repr=False)

    @property
    def timings(self) -> dict[str, float]:
        """Seconds per stage of the forward that made this output: "sam", "clip" (DeepSeek-OCR) or "qwen2"
        (DeepSeek-OCR 2), "layout"."""
        return self.timer.seconds() if self.timer else {}

    def split(self) -> list[torch.Tensor]:
        return list(torch.split(self.embeddings, torch.diff(self.offsets).tolist()))
