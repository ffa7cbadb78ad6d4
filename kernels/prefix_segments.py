"""Segment tables of DeepSeek-OCR 2's Qwen2 encoder attention (`prefix_attention`): host-side planning, no Triton.

A batch packs its views token-major: view i is a run of 2 m_i tokens at offset 2 (m_0 + ... + m_{i-1}), its
m_i visual tokens then its m_i learned queries. The kernels' program tables list blocks of rows of a view
that never straddle the visual / query boundary, so each block's visible keys are one contiguous prefix:
a visual block sees the m visual keys, a query block [r0, r0 + B) keys 0 .. r0 + B - 1.
"""
import dataclasses
from dataclasses import dataclass

import torch

from gundam.kernels.segments import device_of

# Program table columns (int32 [P, PSEG_COLS]): token offset of the view, its m, the block's first row within
# the view and the end of the block's part (m for the visual part, 2m for the queries).
PSEG_TOKEN, PSEG_M, PSEG_START, PSEG_END = range(4)
PSEG_COLS = 4


def row_blocks(m, block):
    """[(first row, part end)] of a view with m visual tokens: blocks of `block` rows over the visual part
    [0, m), then over the queries [m, 2m); a part's last block may be partial."""
    return [(r, m) for r in range(0, m, block)] + [(r, 2 * m) for r in range(m, 2 * m, block)]


@dataclass(frozen=True)
class PrefixSegments:
    """The views of a packed batch (m per view, token offsets) and the kernels' program tables on `device`,
    one row per (view, block of `block` rows), built on first use per block size and cached."""
    view_lengths: tuple         # m of each view (its visual tokens; the view spans 2m tokens)
    offsets: tuple              # first token of each view
    device: torch.device        # where the program tables live: the device of q, k, v
    end_token: int              # one past the last token of the last view
    max_len: int                # max 2m: rows of the RoPE tables the kernels read
    programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @property
    def num_views(self):
        return len(self.view_lengths)

    def program_table(self, block):
        """int32 [P, PSEG_COLS] on `device`: one row per block of `block` rows of every view (row_blocks)."""
        if block not in self.programs:
            rows = [(off, m, r0, end) for off, m in zip(self.offsets, self.view_lengths)
                    for r0, end in row_blocks(m, block)]
            self.programs[block] = torch.tensor(rows, dtype=torch.int32).reshape(-1, PSEG_COLS).to(self.device)
        return self.programs[block]

    def to(self, device):
        device = device_of(device)
        return dataclasses.replace(self, device=device, programs={k: p.to(device) for k, p in self.programs.items()})


def build_prefix_segments(view_lengths_m, device=None):
    """PrefixSegments for views of m_0, m_1, ... visual tokens packed back to back (offsets 0, 2 m_0,
    2 m_0 + 2 m_1, ...). device: q's device (the program tables are built there on first use)."""
    lengths = list(view_lengths_m)
    for m in lengths:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"build_prefix_segments: view length {m!r}, expected a positive int (visual tokens m)")
    offsets, off = [], 0
    for m in lengths:
        offsets.append(off)
        off += 2 * m
    return PrefixSegments(view_lengths=tuple(lengths), offsets=tuple(offsets), device=device_of(device),
                          end_token=off, max_len=2 * max(lengths, default=0))
