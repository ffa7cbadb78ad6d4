"""Host-built tables the kernels are launched with: attention's segment and program tables, the projector's row
map. Planning code: imports with torch alone (no Triton), and never reads a device value.

A segment table has one row per attention group (a 14x14 window of a view, a whole view, or a CLIP view with its
class token); a program table has one row per program of a launch (a group's row plus the program's first query
or key tile), so no program is idle whatever the mix of group sizes. A row map says where each row of the
packed encoder output comes from.
"""
import dataclasses
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from gundam.kernels.launch import check_tensor

# Segment table columns (int32 [G, SEG_COLS]); a program table row is a segment row plus the program's first
# query or key tile (PROG_Q0). The attention kernels read them by these indices.
SEG_TOKEN, SEG_H, SEG_W, SEG_ROW0, SEG_COL0, SEG_GH, SEG_GW, SEG_RH_OFF, SEG_RW_OFF = range(9)
SEG_COLS = 9
PROG_Q0 = SEG_COLS
PROG_COLS = SEG_COLS + 1

RELPOS_BLOCK_M = 32         # query block of the rel-pos kernels: their program table is built with the segments
RELPOS_BWD_SUB_BLOCKS = 4   # query blocks per rel-pos backward program: fewer partial table gradients

NEWLINE = -1    # row-map code in the CLIP column: write image_newline
SEPARATOR = -2  # row-map code in the CLIP column: write view_seperator


class View(NamedTuple):
    """One view in a packed token buffer: a row-major h x w grid starting at token `offset` (CLIP: the class
    token sits at `offset`, the grid follows it)."""
    offset: int
    h: int
    w: int


# ----------------------------------------------------------------------------------------------- segments

@dataclass(frozen=True)
class SegmentTable:
    """One row per attention group (columns SEG_*) on the host, the kernels' program tables on the device, and
    the host-side facts the launcher needs (it never reads a device value).

    A row is (token offset of the view, view H, view W, group origin row, origin col, group rows GH,
    group cols GW, first row of the group's Rh in the packed rel_pos_h, first row of its Rw in rel_pos_w).
    Query/key i of a group sits at view position (row0 + i // GW, col0 + i % GW), token
    offset + row * W + col; positions outside the H x W view are padding. A CLIP group is a 1 x (1 + h*w)
    "view", so its tokens are contiguous with the class token first.

    A program table (`program_table(block_m, tail_m)`) has one row per query block of every group (the
    group's row plus the block's first query), so a launch has no idle programs whatever the mix of group
    sizes. Tables for the default blockings are built with the segment table; others on first use.
    """
    rows: torch.Tensor          # int32 [G, SEG_COLS], on the host
    device: torch.device        # where the program tables live: the device of the qkv they will be used with
    max_group_tokens: int       # max GH * GW
    max_gh: int                 # widths of the per-token rel-pos tables
    max_gw: int
    end_token: int              # one past the last token any group touches
    max_view_tokens: int        # max H * W: offsets within a view are 32-bit
    covered_tokens: int         # tokens inside some group (end_token when the views leave no gaps)
    rel_sizes_h: tuple          # group heights in packed rel_pos_h order (table k has 2 * size - 1 rows)
    rel_sizes_w: tuple
    class_token: bool           # CLIP groups: no rel-pos
    group_shapes: tuple = ()    # ((GH, GW), number of groups) pairs: block-size choice without a device read
    programs: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)  # blocking: device table

    @property
    def num_groups(self):
        return self.rows.shape[0]

    def program_table(self, block_m, tail_m):
        """int32 [P, PROG_COLS] on `device`: one row per query block (see query_blocks), groups in order."""
        key = (block_m, tail_m)
        if key not in self.programs:
            progs = [(*row, q0) for row in self.rows.tolist()
                     for q0, _ in query_blocks(row[SEG_GH] * row[SEG_GW], block_m, tail_m)]
            self.programs[key] = torch.tensor(progs, dtype=torch.int32, device=self.device).reshape(-1, PROG_COLS)
        return self.programs[key]

    def key_tile_table(self, block_kh, block_kw):
        """int32 [P, PROG_COLS] on `device`: one row per (group, key tile) of the backward's dK/dV kernel, the
        tile's index (row-major over the group's BLOCK_KH x BLOCK_KW tiles) in the PROG_Q0 column."""
        key = ("key_tiles", block_kh, block_kw)
        if key not in self.programs:
            progs = [(*row, t) for row in self.rows.tolist()
                     for t in range(-(-row[SEG_GH] // block_kh) * -(-row[SEG_GW] // block_kw))]
            self.programs[key] = torch.tensor(progs, dtype=torch.int32, device=self.device).reshape(-1, PROG_COLS)
        return self.programs[key]

    def relpos_backward_table(self, block_m):
        """(int32 [P, PROG_COLS] on `device`, runs): the rel-pos backward's programs, one per block_m queries of
        every group, groups sorted by shape; runs = [(GH, GW, RH_OFF, RW_OFF, first program, end)] so the
        partial table gradients of one shape are one contiguous range of programs (a deterministic sum)."""
        rows = sorted(self.rows.tolist(), key=lambda r: (r[SEG_GH], r[SEG_GW]))    # stable: groups in order
        runs, start = [], 0
        for row in rows:
            n = len(query_blocks(row[SEG_GH] * row[SEG_GW], block_m, block_m))
            shape = (row[SEG_GH], row[SEG_GW], row[SEG_RH_OFF], row[SEG_RW_OFF])
            if runs and runs[-1][:4] == shape:
                runs[-1] = (*shape, runs[-1][4], start + n)
            else:
                runs.append((*shape, start, start + n))
            start += n
        key = ("relpos_backward", block_m)
        if key not in self.programs:
            progs = [(*row, q0) for row in rows for q0, _ in query_blocks(row[SEG_GH] * row[SEG_GW], block_m, block_m)]
            self.programs[key] = torch.tensor(progs, dtype=torch.int32, device=self.device).reshape(-1, PROG_COLS)
        return self.programs[key], runs

    def to(self, device):
        device = device_of(device)
        return dataclasses.replace(self, device=device, programs={k: p.to(device) for k, p in self.programs.items()})


def device_of(device):
    """torch.device as a tensor on it reports it ("cuda" -> "cuda:0"), to compare with a tensor's .device."""
    return torch.empty(0, device=device).device


def query_blocks(n, block_m, tail_m):
    """[(first query, block size)] covering the n queries of a group: blocks of block_m, except that the last
    block is a smaller tail_m one when its queries fit in it (a 196-query window: 64, 64, 64, 16)."""
    return [(q0, tail_m if n - q0 <= tail_m else block_m) for q0 in range(0, n, block_m)]


def default_blocking(group_shapes):
    """(BLOCK_M, TAIL_M) for groups of these shapes; see tiling.choose_config."""
    block_m = 128 if max((gh * gw for (gh, gw), _ in group_shapes), default=0) >= 1024 else 64
    return block_m, default_tail(group_shapes, block_m)


def default_tail(group_shapes, block_m, tail_m=16):
    """tail_m if some group ends in a block of at most tail_m queries, else block_m (no tail path compiled)."""
    if tail_m < block_m and any(0 < gh * gw % block_m <= tail_m for (gh, gw), _ in group_shapes):
        return tail_m
    return block_m


def _rel_offsets(sizes):
    """Distinct sizes (ascending) -> {size: first row in the packed table}; tables have 2*size-1 rows."""
    offsets, row = {}, 0
    for s in sorted(set(sizes)):
        offsets[s] = row
        row += 2 * s - 1
    return offsets


def build_segments(views, window=None, *, class_token=False, device=None):
    """Segment table for the views of a packed buffer.

    views: list of View (offset, h, w), one per view (CLIP: the h x w grid, the view then spans 1 + h*w
    tokens from offset, class token first). window=None: one whole-view group per view (SAM global
    blocks, CLIP); window=S: one group per S x S window, row-major over the windows of each view, padded at
    the bottom/right edge. The packed rel-pos tables are ordered by `rel_sizes_h` / `rel_sizes_w`
    (use `pack_rel_pos`). device: where the program tables go (qkv's device); built here for the default
    blockings, so a launch uploads nothing.
    """
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if class_token and window is not None:
        raise ValueError(f"class_token groups are whole views; got window={window}")
    spans = []
    for v in views:
        if len(v) != 3 or not all(isinstance(x, (int, np.integer)) for x in v):
            raise ValueError(f"build_segments: view {v!r}, expected View(offset, h, w) of ints")
        off, h, w = (int(x) for x in v)
        if off < 0 or h < 1 or w < 1:
            raise ValueError(f"build_segments: view {v!r}, expected offset >= 0 and h, w >= 1")
        spans.append((off, off + h * w + (1 if class_token else 0), h, w))
    order = sorted(spans)
    for a, b in zip(order, order[1:]):
        if b[0] < a[1]:
            raise ValueError(f"views overlap in the token buffer: tokens [{a[0]}, {a[1]}) and [{b[0]}, {b[1]})")

    rows = []
    if class_token:
        for off, end, h, w in spans:
            n = end - off                                   # class token + h*w grid tokens, one flat row
            rows.append((off, 1, n, 0, 0, 1, n, 0, 0))
        sizes_h, sizes_w = (), ()
    elif window is None:
        sizes_h = tuple(sorted({h for _, _, h, _ in spans}))
        sizes_w = tuple(sorted({w for _, _, _, w in spans}))
        off_h, off_w = _rel_offsets(sizes_h), _rel_offsets(sizes_w)
        for off, _, h, w in spans:
            rows.append((off, h, w, 0, 0, h, w, off_h[h], off_w[w]))
    else:
        sizes_h = sizes_w = (window,) if spans else ()
        for off, _, h, w in spans:
            for r0 in range(0, h, window):
                for c0 in range(0, w, window):
                    rows.append((off, h, w, r0, c0, window, window, 0, 0))
    shapes = tuple(sorted(Counter((r[SEG_GH], r[SEG_GW]) for r in rows).items()))
    table = SegmentTable(
        rows=torch.tensor(rows, dtype=torch.int32).reshape(-1, SEG_COLS),     # [G, 9]
        device=device_of(device),
        max_group_tokens=max((r[SEG_GH] * r[SEG_GW] for r in rows), default=0),
        max_gh=max((r[SEG_GH] for r in rows), default=0),
        max_gw=max((r[SEG_GW] for r in rows), default=0),
        end_token=max((end for _, end, _, _ in spans), default=0),
        max_view_tokens=max((r[SEG_H] * r[SEG_W] for r in rows), default=0),
        covered_tokens=sum(end - off for off, end, _, _ in spans),
        rel_sizes_h=sizes_h, rel_sizes_w=sizes_w, class_token=class_token, group_shapes=shapes,
    )
    table.program_table(*default_blocking(shapes))
    if not class_token:
        table.program_table(RELPOS_BLOCK_M, RELPOS_BLOCK_M)
    return table


def pack_rel_pos(tables, sizes):
    """Concatenate per-size rel-pos tables ((2*s-1) x head_dim each, in `sizes` order) into one packed table.

    sizes is `segments.rel_sizes_h` (or `_w`); the segment rows address the result by RH_OFF / RW_OFF.
    """
    tables, sizes = list(tables), list(sizes)
    if len(tables) != len(sizes):
        raise ValueError(f"got {len(tables)} rel-pos tables for {len(sizes)} sizes {sizes}")
    if not tables:
        raise ValueError("no rel-pos tables to pack")
    for t, s in zip(tables, sizes):
        if t.dim() != 2 or t.shape[0] != 2 * s - 1:
            raise ValueError(f"rel-pos table for size {s} must be ({2 * s - 1}, head_dim), got {tuple(t.shape)}")
        if t.shape[1] != tables[0].shape[1] or t.dtype != tables[0].dtype:
            raise ValueError(f"rel-pos tables disagree: {tuple(t.shape)} {t.dtype} vs "
                             f"{tuple(tables[0].shape)} {tables[0].dtype}")
    return torch.cat(tables, dim=0)


# ------------------------------------------------------------------------------------------------ row map

@dataclass(frozen=True)
class RowMap:
    """Where each output row of the projector + layout kernel comes from: rows[r] = (CLIP row, SAM row) of a
    projected token, or (NEWLINE | SEPARATOR, -1). The bounds and the backward's index lists are made on the
    host, so neither the launcher nor the backward waits for the device."""
    rows: torch.Tensor            # int32 [T_out, 2], contiguous
    clip_rows: int                # 1 + largest CLIP row read
    sam_rows: int                 # 1 + largest SAM row read
    token_rows: torch.Tensor      # int64 [n_tok]: output rows that are projected tokens
    token_clip: torch.Tensor      # int64 [n_tok]: their CLIP rows
    token_sam: torch.Tensor       # int64 [n_tok]: their SAM rows
    newline_rows: torch.Tensor    # int64 [n_newline]
    separator_rows: torch.Tensor  # int64 [n_images]

    @staticmethod
    def from_host(rows: torch.Tensor, device=None) -> "RowMap":
        """From an integer CPU tensor [T_out, 2] (e.g. built with the codes above)."""
        check_tensor("RowMap", "rows", rows, ndim=2, shape=(None, 2), device=torch.device("cpu"))
        if rows.is_floating_point():
            raise TypeError(f"RowMap: rows has dtype {rows.dtype}, expected an integer dtype")
        top = int(rows.max()) if rows.numel() else -1
        if top >= 2**31:
            raise ValueError(f"RowMap: source row {top} does not fit int32")
        rows = rows.long()
        token = (rows[:, 0] >= 0).nonzero().flatten()
        on = lambda t: t.contiguous().to(device)   # noqa: E731
        return RowMap(
            rows=on(rows.to(torch.int32)),
            clip_rows=int(rows[:, 0].max()) + 1 if rows.numel() else 0,
            sam_rows=int(rows[:, 1].max()) + 1 if rows.numel() else 0,
            token_rows=on(token), token_clip=on(rows[token, 0]), token_sam=on(rows[token, 1]),
            newline_rows=on((rows[:, 0] == NEWLINE).nonzero().flatten()),
            separator_rows=on((rows[:, 0] == SEPARATOR).nonzero().flatten()),
        )
