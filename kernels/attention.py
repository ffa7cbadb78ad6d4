"""Segmented attention: every SAM window, every global view and every CLIP view of a batch in one launch.

The packed token-major `qkv` buffer ([total_tokens, 3, heads, head_dim], a view of the fused qkv linear's
[T, 3C] output) holds all views of a batch, each a row-major H x W grid at some token offset. A segment table
lists the attention groups: a 14x14 window of a view (padded at the bottom/right edge), a whole view (SAM
global blocks) or a class token + h*w tokens (CLIP). One launch computes all groups of a table:

    out[q] = softmax_k(q . k * scale + bias[q, k]) v            per group, per head, fp32 softmax
    bias[q, k] = q . Rh[qh - kh + GH - 1] + q . Rw[qw - kw + GW - 1]     (unscaled q; optional)

Padded window positions are keys whose k and v are the qkv bias (the vendor pads the normed input with zeros
*before* the qkv linear); they are not masked. Padded queries are computed but never stored.

Design, and what it does for the H100 targets (bf16, head_dim 64):
- No N x N tensor anywhere. The decomposed rel-pos terms rel_h[q, kh] = q . Rh[qh - kh + GH - 1] and
  rel_w[q, kw] are projected once per query by `_relpos_kernel` (one tensor-core dot of a query block
  against the group's (2S-1) x head_dim table; the per-query shift qh - kh is done by the scattered store)
  into fp32 tables [heads, T, ~max GH] and [heads, T, ~max GW]: O(N * (H + W)) per head, 25 MB for a 1024
  view's global block against 400 MB for the vendor's bf16 N x N bias. Computing the terms inside the
  attention kernel would redo the projection for every key block or need a register gather; the separate
  pass moves ~56 MB through HBM, estimated at 10-15% of the attention time for that block.
- Key blocks are BLOCK_KH x BLOCK_KW sub-rectangles of the group grid, not runs of flat indices. The bias of
  a block is then an outer sum of two thin tiles, rel_h[q, kh0:kh0+BLOCK_KH] + rel_w[q, kw0:kw0+BLOCK_KW]:
  BLOCK_KH + BLOCK_KW fp32 loads per query per block (16 for an 8 x 8 block, vectorised and pipelined into
  shared memory like K and V) instead of BLOCK_N gathers, and one add per score. The [M, KH, KW] -> [M, N]
  reshape lands in the MMA accumulator layout with no layout conversion. Both tables are stored
  pre-multiplied by log2(e), so scale and bias cost one FMA + one add per score over plain flash attention.
  Out-of-group keys get -inf from the tables themselves (`_relpos_kernel` writes -inf past the group's
  edge), so no tile coordinates stay live across the pipelined key loop.
- Padded keys point at the bias row instead of a token row (one select on BLOCK_N row pointers; the bias row
  is laid out like a token's, so v = k + stride for both), so K/V stay plain masked loads that Triton turns
  into cp.async pipelines; no per-element select.
- Query blocks are flat runs of the group's row-major query index; addresses come straight from the packed
  layout (no window partition or unpartition copies) and only real query rows are stored, in place, in the
  [T, heads * head_dim] output.
- Grid (programs, heads) over a host-built program table: one row per (group, query block), so no program
  is idle whatever the mix of group sizes (a 640 view's global block has 13 query blocks where a 1024 view's
  has 32); consecutive programs share a group's K/V in L2. A group's last query block is a TAIL_M = 16-row
  one (mma.sync) when its queries fit: sm_90's wgmma takes 64 query rows per warpgroup, so a 196-query
  window is 64 + 64 + 64 + 16 rows instead of 4 x 64.
- Padding work (`mma_work`: issued / useful query x key products): a 14 x 14 window is issued 208 query rows
  x 224 key slots (7 tiles of 2 x 16) = 1.21x its 196 x 196; 64-row blocks and 8 x 8 tiles issued
  256 x 256 = 1.71x. Why this tiling on sm_90: query rows come in 64s per warpgroup (wgmma M) plus the 16-row
  tail; p.v needs key tiles in 16s (its K); the outer-sum bias needs rectangular power-of-two tiles, so 14
  columns cost 16 slots and 14 x 16 = 224 is the fewest. 2 x 16 tiles get there in 32-key steps (1 x 16 takes
  twice the softmax steps for the same slots; 4 x 16 and 8 x 8 round the 14 rows up to 16: 256). Flat 16-key
  runs would issue 208 (1.13x) but turn the bias into a per-score gather; holding a window's K/V across its
  query blocks is not expressible in Triton without unrolling the key loop.
- Block sizes come from `choose_config` (a heuristic on the group shapes); any BLOCK_M / TAIL_M /
  BLOCK_KH / BLOCK_KW is correct. The production configs compile for sm_80 and sm_90 without spills or ptxas
  performance warnings, with HMMA / HGMMA; the SAM global config runs 2 CTAs per SM on sm_90
  (bench/compile_report.py).

Backward (`AttentionFunction`, FlashAttention-2 style: deterministic, no N x N tensor). While autograd records,
the forward also writes the log-sum-exp per (head, query) (HAS_LSE; fp32) and saves qkv, out, the LSE and the
small packed tables; the per-token rel-pos tables are not saved but recomputed (one `_relpos_kernel` launch).
Each kernel recomputes the scores as the forward does, P = exp2(s - lse), dS = P (dP - delta) with
delta = rowsum(dO * O) (torch):
- `_attention_bwd_dq_kernel`, program per (group, query block) x head over the key tiles: dQ = scale dS K, and
  the scores' rel-pos gradients dRel_h[q, kh] = sum over kw of dS, dRel_w[q, kw] = sum over kh of dS into
  per-token tables shaped like relh / relw. Its key tiles span whole group rows, so dRel_w accumulates in
  registers and each dRel_h entry is stored by one tile: no kernel reads back what it wrote.
- `_attention_bwd_dkdv_kernel`, program per (group, key tile) x head over the group's queries, transposed
  (s^T [keys, queries]): dV = P^T dO, dK = scale dS^T Q. Token keys store their rows of dqkv; padded keys (the qkv
  bias) are summed per program into partials that torch reduces into qkv_bias's k and v parts (q: zero).
- `_relpos_bwd_kernel`, the mirror of `_relpos_kernel`, one launch per axis: gathers dRel back to table rows
  (G), adds G Rh (then G Rw) to dQ (fp32 scratch, then dqkv), and writes per-program partials of dRh = G^T q,
  which torch sums over programs and heads, one contiguous run of programs per group shape.
Every reduction is a fixed-order sum (no atomics, no index_add_): repeated backwards are bit-identical. Padded
queries get lse = +inf (P = 0): they contribute nothing. Accumulators, scratch tables and the LSE follow the
input: fp32, fp64 for fp64 inputs (gradient checks to ~1e-10 in Triton's interpreter). Block sizes come from
`choose_backward_config`; the training forward and every backward kernel are in the compile check.
"""
import dataclasses
import inspect
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import GRAD_DTYPES, acc_dtype, check_tensor, resolve_config, tl_acc_dtype

# Segment table columns (int32 [G, SEG_COLS]); a program table row is a segment row plus the program's first
# query (PROG_Q0). The same indices as constexprs for the kernels.
SEG_TOKEN, SEG_H, SEG_W, SEG_ROW0, SEG_COL0, SEG_GH, SEG_GW, SEG_RH_OFF, SEG_RW_OFF = range(9)
SEG_COLS = 9
PROG_Q0 = SEG_COLS
PROG_COLS = SEG_COLS + 1
_TOKEN, _H, _W, _ROW0, _COL0, _GH, _GW, _RH_OFF, _RW_OFF, _Q0 = map(tl.constexpr, range(PROG_COLS))

LOG2E = 1.4426950408889634
RELPOS_BLOCK_M = 32     # query block of _relpos_kernel and _relpos_bwd_kernel
RELPOS_BWD_SUB_BLOCKS = 4   # query blocks per _relpos_bwd_kernel program: fewer partial table gradients


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
        device = _device(device)
        return dataclasses.replace(self, device=device, programs={k: p.to(device) for k, p in self.programs.items()})


def _device(device):
    """torch.device as a tensor on it reports it ("cuda" -> "cuda:0"), to compare with qkv.device."""
    return torch.empty(0, device=device).device


def query_blocks(n, block_m, tail_m):
    """[(first query, block size)] covering the n queries of a group: blocks of block_m, except that the last
    block is a smaller tail_m one when its queries fit in it (a 196-query window: 64, 64, 64, 16)."""
    return [(q0, tail_m if n - q0 <= tail_m else block_m) for q0 in range(0, n, block_m)]


def default_blocking(group_shapes):
    """(BLOCK_M, TAIL_M) for groups of these shapes; see choose_config."""
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
        device=_device(device),
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


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _group(prog):
    """A program's group: token offset of the view, view H x W, group origin (R0, C0), group GH x GW."""
    return (tl.load(prog + _TOKEN), tl.load(prog + _H), tl.load(prog + _W), tl.load(prog + _ROW0),
            tl.load(prog + _COL0), tl.load(prog + _GH), tl.load(prog + _GW))


@triton.jit
def _queries(q0, tok0, H, W, R0, C0, GH, GW, BLOCK_M: tl.constexpr):
    """Queries q0 .. q0 + BLOCK_M - 1 of a group: positions in the group, realness, packed token index."""
    # queries: a flat run of the group's row-major index, addressed in the packed layout
    offs_m = q0 + tl.arange(0, BLOCK_M)
    q_gh = offs_m // GW
    q_gw = offs_m % GW
    q_y = R0 + q_gh
    q_x = C0 + q_gw
    q_real = (offs_m < GH * GW) & (q_y < H) & (q_x < W)  # padded / out-of-group rows: computed, not stored
    q_tok = (tok0 + q_y * W + q_x).to(tl.int64)
    return q_gh, q_gw, q_real, q_tok


@triton.jit
def _block_queries(prog, BLOCK_M: tl.constexpr):
    """A program's group and query block: positions in the group, realness, packed token index."""
    tok0, H, W, R0, C0, GH, GW = _group(prog)
    q_gh, q_gw, q_real, q_tok = _queries(tl.load(prog + _Q0), tok0, H, W, R0, C0, GH, GW, BLOCK_M)
    return tok0, H, W, R0, C0, GH, GW, q_gh, q_gw, q_real, q_tok


@triton.jit
def _key_tile(t, n_col_tiles, H, W, R0, C0, GH, GW, k_view, pad_k_ptr, stride_qkv_t,
              BLOCK_KH: tl.constexpr, BLOCK_KW: tl.constexpr, ALIGNED: tl.constexpr):
    """Key tile t of a group (row-major over BLOCK_KH x BLOCK_KW rectangles): its origin, which keys are in
    the group (padding included) and which are tokens, their token index within the view, and each key's k row
    (the bias row for padded keys)."""
    BLOCK_N: tl.constexpr = BLOCK_KH * BLOCK_KW
    offs_n = tl.arange(0, BLOCK_N)
    kh0 = (t // n_col_tiles) * BLOCK_KH
    kw0 = (t % n_col_tiles) * BLOCK_KW
    k_gh = kh0 + offs_n // BLOCK_KW
    k_gw = kw0 + offs_n % BLOCK_KW
    k_in = (k_gh < GH) & (k_gw < GW)                 # inside the group (padding included)
    k_y = R0 + k_gh
    k_x = C0 + k_gw
    k_real = k_in & (k_y < H) & (k_x < W)
    # one pointer select per key row, and v = k + stride_qkv_s for token and bias rows alike: fewer live
    # 64-bit values (125 registers for the 8-warp global config on sm_90: 2 CTAs per SM)
    k_idx = k_y * W + k_x
    k_rows = tl.where(k_real, k_view + k_idx * stride_qkv_t, pad_k_ptr)
    if ALIGNED:     # the select hides the rows' 16-byte alignment from Triton; without it no cp.async
        k_rows = tl.multiple_of(k_rows, 16)
    return kh0, kw0, k_in, k_real, k_idx, k_rows


@triton.jit
def _store_rel(q, q_g, q_real, table_ptr, stride_table, OFF, G, offs_d, out_base, out_rows, row_len,
               BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[m, k] = log2(e) * q[m] . R[q_g[m] - k + G - 1] for k in [0, G), R = table rows OFF.. OFF+2G-2;
    -inf for k in [G, row_len): keys past the group's edge, so the attention kernel needs no column mask.
    Row m of out starts at out_base + out_rows[m] (32-bit offsets: half the address registers)."""
    offs_r = tl.arange(0, BLOCK_R)
    r = tl.load(table_ptr + (OFF + offs_r)[:, None] * stride_table + offs_d[None, :],
                mask=(offs_r < 2 * G - 1)[:, None], other=0.0)
    p = tl.dot(q, tl.trans(r), input_precision=DOT_PRECISION) * 1.4426950408889634   # * log2(e): [M, R]
    k = q_g[:, None] + G - 1 - offs_r[None, :]                                    # table row i -> key k
    tl.store(out_base + (out_rows[:, None] + k), p, mask=q_real[:, None] & (k >= 0) & (k < G))
    pad = q_real[:, None] & ((offs_r >= G) & (offs_r < row_len))[None, :]
    tl.store(out_base + (out_rows[:, None] + offs_r[None, :]), tl.full(p.shape, float("-inf"), p.dtype),
             mask=pad)


@triton.jit
def _relpos_kernel(
    qkv_ptr, prog_ptr, rph_ptr, rpw_ptr, relh_ptr, relw_ptr,
    stride_qkv_t, stride_qkv_h,
    stride_prog, stride_rph, stride_rpw,
    stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t, len_relh, len_relw,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_RH: tl.constexpr, BLOCK_RW: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # rel_h[head, token(q), kh] = log2(e) * q . Rh[qh - kh + GH - 1] for every real query q of a group.
    # One dot of the query block against all 2*GH-1 table rows gives q . Rh[i]; row i lands at
    # kh = qh + GH - 1 - i (a per-query shift, done by the scattered store).
    prog = prog_ptr + tl.program_id(0) * stride_prog      # program = (group, query block) x head
    head = tl.program_id(1)
    tok0, H, W, R0, C0, GH, GW, q_gh, q_gw, q_real, q_tok = _block_queries(prog, BLOCK_M)
    RH_OFF = tl.load(prog + _RH_OFF)
    RW_OFF = tl.load(prog + _RW_OFF)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(qkv_ptr + q_tok[:, None] * stride_qkv_t + head * stride_qkv_h + offs_d[None, :],
                mask=q_real[:, None], other=0.0)

    q_view = (q_tok - tok0).to(tl.int32)                  # token index within the view
    _store_rel(q, q_gh, q_real, rph_ptr, stride_rph, RH_OFF, GH, offs_d,
               relh_ptr + head.to(tl.int64) * stride_relh_head + tok0.to(tl.int64) * stride_relh_t,
               q_view * stride_relh_t, len_relh, BLOCK_RH, DOT_PRECISION)
    _store_rel(q, q_gw, q_real, rpw_ptr, stride_rpw, RW_OFF, GW, offs_d,
               relw_ptr + head.to(tl.int64) * stride_relw_head + tok0.to(tl.int64) * stride_relw_t,
               q_view * stride_relw_t, len_relw, BLOCK_RW, DOT_PRECISION)


@triton.jit
def _attend(
    prog, head, qkv_ptr, kvpad_ptr, relh_ptr, relw_ptr, out_ptr, lse_ptr, qk_scale,
    stride_qkv_t, stride_qkv_s, stride_qkv_h,
    stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t, stride_out_t, stride_out_h, stride_lse_head,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_KW: tl.constexpr,
    HAS_REL: tl.constexpr, HAS_LSE: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    """One query block of one group, one head: flash attention over the group's key tiles."""
    tok0, H, W, R0, C0, GH, GW, q_gh, q_gw, q_real, q_tok = _block_queries(prog, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(qkv_ptr + q_tok[:, None] * stride_qkv_t + head * stride_qkv_h + offs_d[None, :],
                mask=q_real[:, None], other=0.0)
    if HAS_REL:
        relh_rows = relh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t    # [BLOCK_M]
        relw_rows = relw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t

    # keys: BLOCK_KH x BLOCK_KW sub-rectangles of the group grid; key j of a block is at (j // KW, j % KW)
    BLOCK_N: tl.constexpr = BLOCK_KH * BLOCK_KW
    offs_kr = tl.arange(0, BLOCK_KH)
    offs_kc = tl.arange(0, BLOCK_KW)
    # real keys: int32 offsets from the view's first k row (the launcher checks a view's span fits);
    # padded keys read k, v from the qkv bias (the linear of a zero input), a row laid out like a token's
    k_view = qkv_ptr + tok0.to(tl.int64) * stride_qkv_t + 1 * stride_qkv_s + head * stride_qkv_h
    pad_k_ptr = kvpad_ptr + 1 * stride_qkv_s + head * stride_qkv_h
    n_col_tiles = tl.cdiv(GW, BLOCK_KW)
    n_tiles = tl.cdiv(GH, BLOCK_KH) * n_col_tiles
    # Every group has a key tile. Saying so removes the loop's zero-trip path, on which the zeroed accumulator
    # is written between the last wgmma and its wait: ptxas then serializes every wgmma (C7515).
    tl.assume(n_tiles > 0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    for t in range(0, n_tiles):
        kh0, kw0, k_in, k_real, k_idx, k_rows = _key_tile(t, n_col_tiles, H, W, R0, C0, GH, GW, k_view, pad_k_ptr,
                                                   stride_qkv_t, BLOCK_KH, BLOCK_KW, ALIGNED)
        v_rows = k_rows + stride_qkv_s
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=k_in[:, None], other=0.0)      # [BLOCK_N, D]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                       # [BLOCK_M, BLOCK_N]

        if HAS_REL:
            # bias (log2 units) = rel_h[q, kh] + rel_w[q, kw]; the tables hold -inf past the group's edge and
            # are padded to whole tiles, so only the row mask: the loads stay 16-byte vectors, and no tile
            # coordinates stay live across the pipelined loop
            bh = tl.load(relh_rows[:, None] + (kh0 + offs_kr)[None, :], mask=q_real[:, None], other=0.0)
            bw = tl.load(relw_rows[:, None] + (kw0 + offs_kc)[None, :], mask=q_real[:, None], other=0.0)
            bias = tl.reshape(bh[:, :, None] + bw[:, None, :], (BLOCK_M, BLOCK_N))   # [M, KH, KW] -> [M, N]
            s = qk * qk_scale + bias
        else:
            s = qk * qk_scale + tl.where(k_in, 0.0, float("-inf"))[None, :]

        # online softmax in base 2; every block has an in-group key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=k_in[:, None], other=0.0)      # [BLOCK_N, D]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + q_tok[:, None] * stride_out_t + head * stride_out_h + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_real[:, None])
    if HAS_LSE:     # natural-log log-sum-exp of the scores, for the backward
        lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453
        tl.store(lse_ptr + head.to(tl.int64) * stride_lse_head + q_tok, lse, mask=q_real)


@triton.jit
def _attention_kernel(
    qkv_ptr, kvpad_ptr, prog_ptr, relh_ptr, relw_ptr, out_ptr, lse_ptr,
    qk_scale,
    stride_qkv_t, stride_qkv_s, stride_qkv_h,
    stride_prog,
    stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t,
    stride_out_t, stride_out_h, stride_lse_head,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_KH: tl.constexpr,
    BLOCK_KW: tl.constexpr, HAS_REL: tl.constexpr, HAS_LSE: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # program = (group, query block) x head; a group's last block is a TAIL_M one when its queries fit
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    args = (prog, head, qkv_ptr, kvpad_ptr, relh_ptr, relw_ptr, out_ptr, lse_ptr, qk_scale,
            stride_qkv_t, stride_qkv_s, stride_qkv_h,
            stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t, stride_out_t, stride_out_h,
            stride_lse_head)
    if TAIL_M < BLOCK_M:
        if tl.load(prog + _GH) * tl.load(prog + _GW) - tl.load(prog + _Q0) <= TAIL_M:
            _attend(*args, HEAD_DIM, TAIL_M, BLOCK_KH, BLOCK_KW, HAS_REL, HAS_LSE, ALIGNED, DOT_PRECISION, ACC)
        else:
            _attend(*args, HEAD_DIM, BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, HAS_LSE, ALIGNED, DOT_PRECISION, ACC)
    else:
        _attend(*args, HEAD_DIM, BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, HAS_LSE, ALIGNED, DOT_PRECISION, ACC)


@triton.jit
def _attend_dq(
    prog, head, qkv_ptr, kvpad_ptr, relh_ptr, relw_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, drelh_ptr, drelw_ptr,
    qk_scale, scale,
    stride_qkv_t, stride_qkv_s, stride_qkv_h,
    stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t, stride_do_t, stride_do_h, stride_lse_head,
    stride_dq_t, stride_dq_h,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_KW: tl.constexpr,
    HAS_REL: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    """dQ of one query block of one group, one head, over the group's key tiles (the forward's loop, with P
    recomputed from the log-sum-exp); with rel-pos also dRel_h = sum over kw of dS (one tile's rows kh0.. at a
    time) and dRel_w = sum over kh of dS (key tiles span whole group rows: accumulated in registers)."""
    tok0, H, W, R0, C0, GH, GW, q_gh, q_gw, q_real, q_tok = _block_queries(prog, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(qkv_ptr + q_tok[:, None] * stride_qkv_t + head * stride_qkv_h + offs_d[None, :],
                mask=q_real[:, None], other=0.0)
    do = tl.load(do_ptr + q_tok[:, None] * stride_do_t + head * stride_do_h + offs_d[None, :],
                 mask=q_real[:, None], other=0.0)
    # padded queries: lse = +inf gives P = 0, so they add nothing anywhere
    lse2 = tl.load(lse_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real,
                   other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real, other=0.0)
    if HAS_REL:
        relh_rows = relh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t    # [BLOCK_M]
        relw_rows = relw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t
        drelh_rows = drelh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t
        drelw_rows = drelw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t
        drel_w = tl.zeros([BLOCK_M, BLOCK_KW], dtype=ACC)

    BLOCK_N: tl.constexpr = BLOCK_KH * BLOCK_KW
    offs_kr = tl.arange(0, BLOCK_KH)
    offs_kc = tl.arange(0, BLOCK_KW)
    k_view = qkv_ptr + tok0.to(tl.int64) * stride_qkv_t + 1 * stride_qkv_s + head * stride_qkv_h
    pad_k_ptr = kvpad_ptr + 1 * stride_qkv_s + head * stride_qkv_h
    n_col_tiles = tl.cdiv(GW, BLOCK_KW)       # 1 with rel-pos (the launcher makes tiles span whole rows)
    n_tiles = tl.cdiv(GH, BLOCK_KH) * n_col_tiles
    tl.assume(n_tiles > 0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    for t in range(0, n_tiles):
        kh0, kw0, k_in, k_real, k_idx, k_rows = _key_tile(t, n_col_tiles, H, W, R0, C0, GH, GW, k_view, pad_k_ptr,
                                                   stride_qkv_t, BLOCK_KH, BLOCK_KW, ALIGNED)
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=k_in[:, None], other=0.0)      # [BLOCK_N, D]
        v = tl.load((k_rows + stride_qkv_s)[:, None] + offs_d[None, :], mask=k_in[:, None], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)                       # [BLOCK_M, BLOCK_N]
        if HAS_REL:
            bh = tl.load(relh_rows[:, None] + (kh0 + offs_kr)[None, :], mask=q_real[:, None], other=0.0)
            bw = tl.load(relw_rows[:, None] + (kw0 + offs_kc)[None, :], mask=q_real[:, None], other=0.0)
            s = qk * qk_scale + tl.reshape(bh[:, :, None] + bw[:, None, :], (BLOCK_M, BLOCK_N))
        else:
            s = qk * qk_scale + tl.where(k_in, 0.0, float("-inf"))[None, :]
        p = tl.math.exp2(s - lse2[:, None])                                               # softmax probabilities
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])                                                   # d loss / d score
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
        if HAS_REL:
            ds3 = tl.reshape(ds, (BLOCK_M, BLOCK_KH, BLOCK_KW))
            # this tile alone covers rows kh0 .. kh0 + KH - 1 of the group: each entry written once
            tl.store(drelh_rows[:, None] + (kh0 + offs_kr)[None, :], tl.sum(ds3, 2), mask=q_real[:, None])
            drel_w += tl.sum(ds3, 1)

    dq_ptrs = dq_ptr + q_tok[:, None] * stride_dq_t + head * stride_dq_h + offs_d[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_real[:, None])
    if HAS_REL:
        tl.store(drelw_rows[:, None] + offs_kc[None, :], drel_w, mask=q_real[:, None])


@triton.jit
def _attention_bwd_dq_kernel(
    qkv_ptr, kvpad_ptr, prog_ptr, relh_ptr, relw_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, drelh_ptr, drelw_ptr,
    qk_scale, scale,
    stride_qkv_t, stride_qkv_s, stride_qkv_h,
    stride_prog,
    stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t,
    stride_do_t, stride_do_h, stride_lse_head, stride_dq_t, stride_dq_h,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, TAIL_M: tl.constexpr, BLOCK_KH: tl.constexpr,
    BLOCK_KW: tl.constexpr, HAS_REL: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ACC: tl.constexpr,
):
    # program = (group, query block) x head, the forward's program table
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    args = (prog, head, qkv_ptr, kvpad_ptr, relh_ptr, relw_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, drelh_ptr,
            drelw_ptr, qk_scale, scale, stride_qkv_t, stride_qkv_s, stride_qkv_h,
            stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t, stride_do_t, stride_do_h,
            stride_lse_head, stride_dq_t, stride_dq_h)
    if TAIL_M < BLOCK_M:
        if tl.load(prog + _GH) * tl.load(prog + _GW) - tl.load(prog + _Q0) <= TAIL_M:
            _attend_dq(*args, HEAD_DIM, TAIL_M, BLOCK_KH, BLOCK_KW, HAS_REL, ALIGNED, DOT_PRECISION, ACC)
        else:
            _attend_dq(*args, HEAD_DIM, BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, ALIGNED, DOT_PRECISION, ACC)
    else:
        _attend_dq(*args, HEAD_DIM, BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, ALIGNED, DOT_PRECISION, ACC)


@triton.jit
def _attention_bwd_dkdv_kernel(
    qkv_ptr, kvpad_ptr, prog_ptr, relh_ptr, relw_ptr, do_ptr, lse_ptr, delta_ptr, dqkv_ptr, dpad_ptr,
    qk_scale, scale,
    stride_qkv_t, stride_qkv_s, stride_qkv_h,
    stride_prog,
    stride_relh_head, stride_relh_t, stride_relw_head, stride_relw_t,
    stride_do_t, stride_do_h, stride_lse_head, stride_dqkv_t, stride_dqkv_s, stride_dqkv_h,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_KW: tl.constexpr,
    HAS_REL: tl.constexpr, ALIGNED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # program = (group, key tile) x head, looping over the group's queries in flat runs of BLOCK_M.
    # Transposed like the scores: s^T [keys, queries], so dV += P^T dO and dK += dS^T Q need no transposes
    # of register tiles; Q^T, the bias tiles and the row statistics are loaded transposed.
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    tok0, H, W, R0, C0, GH, GW = _group(prog)
    BLOCK_N: tl.constexpr = BLOCK_KH * BLOCK_KW
    offs_d = tl.arange(0, HEAD_DIM)
    offs_kr = tl.arange(0, BLOCK_KH)
    offs_kc = tl.arange(0, BLOCK_KW)
    k_view = qkv_ptr + tok0.to(tl.int64) * stride_qkv_t + 1 * stride_qkv_s + head * stride_qkv_h
    pad_k_ptr = kvpad_ptr + 1 * stride_qkv_s + head * stride_qkv_h
    kh0, kw0, k_in, k_real, k_idx, k_rows = _key_tile(tl.load(prog + _Q0), tl.cdiv(GW, BLOCK_KW), H, W, R0, C0, GH, GW,
                                               k_view, pad_k_ptr, stride_qkv_t, BLOCK_KH, BLOCK_KW, ALIGNED)
    k = tl.load(k_rows[:, None] + offs_d[None, :], mask=k_in[:, None], other=0.0)          # [BLOCK_N, D]
    v = tl.load((k_rows + stride_qkv_s)[:, None] + offs_d[None, :], mask=k_in[:, None], other=0.0)
    k_add = tl.where(k_in, 0.0, float("-inf"))       # out-of-group keys (no rel-pos: the tables do it otherwise)

    n_q = GH * GW
    tl.assume(n_q > 0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    for q0 in range(0, n_q, BLOCK_M):
        q_gh, q_gw, q_real, q_tok = _queries(q0, tok0, H, W, R0, C0, GH, GW, BLOCK_M)
        qT = tl.load(qkv_ptr + q_tok[None, :] * stride_qkv_t + head * stride_qkv_h + offs_d[:, None],
                     mask=q_real[None, :], other=0.0)                                  # [D, BLOCK_M]
        do = tl.load(do_ptr + q_tok[:, None] * stride_do_t + head * stride_do_h + offs_d[None, :],
                     mask=q_real[:, None], other=0.0)                                  # [BLOCK_M, D]
        lse2 = tl.load(lse_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real,
                       other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)                                # [BLOCK_N, BLOCK_M]
        if HAS_REL:
            relh_rows = relh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t
            relw_rows = relw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t
            bhT = tl.load(relh_rows[None, :] + (kh0 + offs_kr)[:, None], mask=q_real[None, :], other=0.0)
            bwT = tl.load(relw_rows[None, :] + (kw0 + offs_kc)[:, None], mask=q_real[None, :], other=0.0)
            sT = qkT * qk_scale + tl.reshape(bhT[:, None, :] + bwT[None, :, :], (BLOCK_N, BLOCK_M))
        else:
            sT = qkT * qk_scale + k_add[:, None]
        pT = tl.math.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)                     # [BLOCK_N, BLOCK_M]
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    dk = dk * scale

    # token keys: their rows of dqkv; padded keys (the qkv bias): this program's sums, reduced by the launcher
    dk_view = dqkv_ptr + tok0.to(tl.int64) * stride_dqkv_t + 1 * stride_dqkv_s + head * stride_dqkv_h
    dk_ptrs = dk_view + (k_idx * stride_dqkv_t)[:, None] + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
    tl.store(dk_ptrs + stride_dqkv_s, dv.to(dqkv_ptr.dtype.element_ty), mask=k_real[:, None])
    pad = (k_in & ~k_real)[:, None]
    dpad = dpad_ptr + (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + head) * (2 * HEAD_DIM) + offs_d
    tl.store(dpad, tl.sum(tl.where(pad, dk, 0.0), 0))
    tl.store(dpad + HEAD_DIM, tl.sum(tl.where(pad, dv, 0.0), 0))


@triton.jit
def _relpos_bwd_kernel(
    qkv_ptr, prog_ptr, rp_ptr, drel_ptr, dq_in_ptr, dq_out_ptr, part_ptr,
    stride_qkv_t, stride_qkv_h,
    stride_prog, stride_rp, stride_drel_head, stride_drel_t,
    stride_dq_in_t, stride_dq_in_h, stride_dq_out_t, stride_dq_out_h,
    AXIS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, SUB_BLOCKS: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # The backward of _relpos_kernel for one axis (AXIS 0: rows, Rh; 1: columns, Rw), program = (group,
    # SUB_BLOCKS query blocks of BLOCK_M) x head. dRel is gathered back to table rows (the inverse of the
    # forward's scattered store): G[q, i] = dRel_h[q, kh] for i = qh - kh + GH - 1. Then dq_out = dq_in + G Rh,
    # and this program's partial dRh = G^T q, reduced over programs and heads by the launcher. One axis per
    # launch keeps one [BLOCK_R, HEAD_DIM] accumulator live (both spill for 127-row tables).
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    tok0, H, W, R0, C0, GH, GW = _group(prog)
    q_first = tl.load(prog + _Q0)
    if AXIS == 0:
        OFF = tl.load(prog + _RH_OFF)
        G = GH
    else:
        OFF = tl.load(prog + _RW_OFF)
        G = GW
    offs_d = tl.arange(0, HEAD_DIM)
    offs_r = tl.arange(0, BLOCK_R)
    table = tl.load(rp_ptr + (OFF + offs_r)[:, None] * stride_rp + offs_d[None, :],
                    mask=(offs_r < 2 * G - 1)[:, None], other=0.0)                          # [BLOCK_R, D]
    drel_base = drel_ptr + head.to(tl.int64) * stride_drel_head + tok0.to(tl.int64) * stride_drel_t
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=ACC)
    q_end = tl.minimum(q_first + SUB_BLOCKS * BLOCK_M, GH * GW)        # only the group's query blocks
    tl.assume(q_end > q_first)  # no zero-trip path: it would serialize the wgmmas (C7515), as in _attend
    for q0 in range(q_first, q_end, BLOCK_M):
        q_gh, q_gw, q_real, q_tok = _queries(q0, tok0, H, W, R0, C0, GH, GW, BLOCK_M)
        q = tl.load(qkv_ptr + q_tok[:, None] * stride_qkv_t + head * stride_qkv_h + offs_d[None, :],
                    mask=q_real[:, None], other=0.0)
        q_view = (q_tok - tok0).to(tl.int32)              # token index within the view
        k = (q_gh if AXIS == 0 else q_gw)[:, None] + G - 1 - offs_r[None, :]           # table row i -> key k
        g = tl.load(drel_base + (q_view * stride_drel_t)[:, None] + k,
                    mask=q_real[:, None] & (k >= 0) & (k < G), other=0.0).to(table.dtype)   # [BLOCK_M, BLOCK_R]
        dq = tl.load(dq_in_ptr + q_tok[:, None] * stride_dq_in_t + head * stride_dq_in_h + offs_d[None, :],
                     mask=q_real[:, None], other=0.0)
        dq = tl.dot(g, table, dq, input_precision=DOT_PRECISION)
        tl.store(dq_out_ptr + q_tok[:, None] * stride_dq_out_t + head * stride_dq_out_h + offs_d[None, :],
                 dq.to(dq_out_ptr.dtype.element_ty), mask=q_real[:, None])
        acc = tl.dot(tl.trans(g), q, acc, input_precision=DOT_PRECISION)
    part = (tl.program_id(0).to(tl.int64) * tl.num_programs(1) + head) * BLOCK_R * HEAD_DIM
    tl.store(part_ptr + part + offs_r[:, None] * HEAD_DIM + offs_d[None, :], acc)


# ---------------------------------------------------------------------------------------------- heuristic

def mma_work(group_shapes, block_m, tail_m, block_kh, block_kw):
    """(issued, useful) query x key products of one head of a launch; issued / useful is its padding ratio.

    Both tensor-core products of a program (q.k and p.v, each x head_dim) scale with its query rows x key
    slots: a group of n = GH * GW queries is issued sum(query_blocks sizes) rows x (GH rounded up to
    BLOCK_KH) * (GW rounded up to BLOCK_KW) key slots, of which n x n are the attention itself (padded window
    keys are real keys, the qkv bias)."""
    issued = useful = 0
    for (gh, gw), count in group_shapes:
        n = gh * gw
        rows = sum(size for _, size in query_blocks(n, block_m, tail_m))
        issued += count * rows * _round_up(gh, block_kh) * _round_up(gw, block_kw)
        useful += count * n * n
    return issued, useful


def _pick_key_tile(shapes, block_n):
    """(BLOCK_KH, BLOCK_KW) with BLOCK_KH * BLOCK_KW = block_n that wastes the fewest key slots.

    shapes: ((GH, GW), number of groups) pairs. Waste is weighted by the queries that see it; ties go to the
    squarest tile (fewest bias loads per block: BLOCK_KH + BLOCK_KW), then to the wider one.
    """
    best = None
    kw = 1
    while kw <= block_n:
        kh = block_n // kw
        slots = sum(cnt * gh * gw * _round_up(gh, kh) * _round_up(gw, kw) for (gh, gw), cnt in shapes)
        key = (slots, abs(math.log2(kw) - math.log2(kh)), -kw)
        if best is None or key < best[0]:
            best = (key, kh, kw)
        kw *= 2
    return best[1], best[2]


def _fewest_slots(shapes, block_m, tail_m, sizes, block_kw=None):
    """(BLOCK_KH, BLOCK_KW) of the key tile, among tiles of `sizes` keys, that issues the fewest key slots
    (mma_work); ties to the larger tile. block_kw: a fixed tile width (then BLOCK_KH = max(1, size // width))."""
    best = None
    for n in sizes:
        if block_kw:
            kh, kw = max(1, n // block_kw), block_kw
        else:
            kh, kw = _pick_key_tile(shapes, n) if shapes else (1, n)
        issued = mma_work(shapes, block_m, tail_m, kh, kw)[0]
        if best is None or issued < best[0]:
            best = (issued, kh, kw)
    return best[1], best[2]


def choose_config(segments, head_dim, dtype, *, block_m=None, block_n=None, num_warps=None, num_stages=None):
    """Block sizes for a launch: dict(BLOCK_M, TAIL_M, BLOCK_KH, BLOCK_KW, num_warps, num_stages).

    sm_90's wgmma multiplies 64 query rows per warpgroup (M = 64), with key tiles whose count is a multiple
    of 16 (the K of the p.v product); the rel-pos bias stays an outer sum of two thin tiles only for key
    tiles that are BLOCK_KH x BLOCK_KW sub-rectangles of the group with power-of-two sides.
    - Large groups (SAM global: 1600 or 4096 tokens): 128 x 64 tiles, 8 warps (two warpgroups of 64 query
      rows), 3 stages of K/V in shared memory, 8 x 8 key tiles (no waste on 64 x 64 and 40 x 40 views).
      On sm_90 it needs 125 registers and 80 KB: 2 CTAs (16 warps) per SM, so one CTA's softmax can
      overlap the other's wgmma.
    - Small groups (14 x 14 windows, CLIP's 101 / 257 tokens): 64-row query blocks, 4 warps, and a 16-row
      tail block (mma.sync) when a group's last block has at most 16 queries: a 196-query window is issued
      64 + 64 + 64 + 16 = 208 query rows instead of 256.
    - The key tile is the one with the fewest issued slots (mma_work) among 64 and 32 keys per block, ties
      to the larger: 2 x 16 for 14 x 14 windows (224 key slots, not 256), 1 x 32 for 257-token CLIP groups.
      Windows issue 208 x 224 / 196^2 = 1.21x their useful work (was 256 x 256 / 196^2 = 1.71x).
    - head_dim 128 and fp32 halve the key block to stay inside registers and shared memory.
    These compile for sm_80 and sm_90 without spills or ptxas performance warnings (tests/test_compile.py,
    bench/compile_report.py). Keyword overrides fix BLOCK_M / BLOCK_N (= BLOCK_KH * BLOCK_KW) / warps /
    stages and keep the tile choice (bench/attention.py --sweep tries a few on a GPU).
    """
    shapes = segments.group_shapes
    big = segments.max_group_tokens >= 1024
    block_m = block_m or default_blocking(shapes)[0]
    tail_m = default_tail(shapes, block_m)
    sizes = [block_n] if block_n else [64, 32]
    if head_dim > 64 or dtype in (torch.float32, torch.float64):
        sizes = [max(16, n // 2) for n in sizes] if not block_n else sizes
    kh, kw = _fewest_slots(shapes, block_m, tail_m, sizes)
    return dict(BLOCK_M=block_m, TAIL_M=tail_m, BLOCK_KH=kh, BLOCK_KW=kw,
                num_warps=num_warps or (8 if big else 4), num_stages=num_stages or 3)


def choose_backward_config(segments, head_dim, dtype):
    """Block sizes of the backward kernels (keys of `attention`'s config=, next to choose_config's):

    - dQ kernel (program per query block, the forward's program table): BWD_BLOCK_M / BWD_TAIL_M as the
      forward's, key tiles BWD_BLOCK_KH x BWD_BLOCK_KW of 64 or 32 keys, whichever issues fewer key slots. With
      rel-pos a tile spans whole group rows (BWD_BLOCK_KW >= every GW), so dRel_w accumulates in registers and
      each dRel_h entry has one writer (nothing written to global memory is read back inside a kernel): 1 x 64
      for 64-wide views (40-wide ones issue 64 slots per row: 1.6x on their products), 2 x 16 for 14 x 14
      windows (224 key slots, as the forward); CLIP (no rel-pos): the forward's choice. 8 warps for large
      groups, 4 otherwise: 253 registers, no spills on sm_90 for the global config.
    - dK/dV kernel (program per key tile, looping over the group's queries): KV_BLOCK_KH x KV_BLOCK_KW = 64
      keys (the M of its dK, dV products: one wgmma warpgroup) with the fewest wasted slots, KV_BLOCK_M = 32
      queries per step, 4 warps: 64-query steps spill (dK, dV, K, V and four [keys, queries] fp32 tiles).
    - head_dim 128 and fp32 halve the key tiles (registers and shared memory).
    These compile for sm_80 and sm_90 without spills or ptxas warnings (tests/test_compile.py).
    """
    shapes = segments.group_shapes
    block_m, tail_m = default_blocking(shapes)
    sizes = [64, 32] if head_dim <= 64 and dtype not in (torch.float32, torch.float64) else [32, 16]
    full_rows = None if segments.class_token or not shapes else triton.next_power_of_2(segments.max_gw)
    kh, kw = _fewest_slots(shapes, block_m, tail_m, sizes, full_rows)
    kv_kh, kv_kw = _pick_key_tile(shapes, sizes[0]) if shapes else (1, sizes[0])
    return dict(BWD_BLOCK_M=block_m, BWD_TAIL_M=tail_m, BWD_BLOCK_KH=kh, BWD_BLOCK_KW=kw,
                bwd_num_warps=8 if segments.max_group_tokens >= 1024 else 4, KV_BLOCK_M=32, KV_BLOCK_KH=kv_kh,
                KV_BLOCK_KW=kv_kw, kv_num_warps=4, bwd_num_stages=2)


def _round_up(x, m):
    return -(-x // m) * m


def _relpos_warps(block_rh, block_rw):
    # the scattered store holds a 64-bit address per element: 8 warps for the 127-row tables of 64-wide views
    return 8 if max(block_rh, block_rw) >= 128 else 4


# ----------------------------------------------------------------------------------------------- launcher

def _check_inputs(fn, qkv, segments, rel_pos_h, rel_pos_w, qkv_bias, out, scale):
    """All launch checks; returns (T, heads, head_dim, has_rel, scale)."""
    check_tensor(fn, "qkv", qkv, ndim=4, dtypes=GRAD_DTYPES, unit_stride=True)
    T, three, heads, head_dim = qkv.shape
    if three != 3:
        raise ValueError(f"{fn}: qkv has shape {tuple(qkv.shape)}, expected (total_tokens, 3, heads, head_dim)")
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"{fn}: qkv has head_dim {head_dim}, expected a power of two in 16..128")
    like = dict(dtype=qkv.dtype, device=qkv.device)
    if not isinstance(segments, SegmentTable):
        raise TypeError(f"{fn}: segments is a {type(segments).__name__}, expected a SegmentTable (build_segments)")
    if segments.device != qkv.device:
        raise ValueError(f"{fn}: segments are for {segments.device}, expected qkv's {qkv.device} "
                         f"(build_segments(device=...) or segments.to(...))")
    if segments.end_token > T:
        raise ValueError(f"{fn}: segments reach token {segments.end_token}, expected at most qkv's {T} tokens")

    if (rel_pos_h is None) != (rel_pos_w is None):
        raise ValueError(f"{fn}: got only one of rel_pos_h and rel_pos_w, expected both or neither")
    has_rel = rel_pos_h is not None
    if has_rel:
        if segments.class_token:
            raise ValueError(f"{fn}: rel-pos tables given for class-token (CLIP) segments, expected none")
        for name, t, sizes in (("rel_pos_h", rel_pos_h, segments.rel_sizes_h),
                               ("rel_pos_w", rel_pos_w, segments.rel_sizes_w)):
            need = sum(2 * s - 1 for s in sizes)
            check_tensor(fn, name, t, shape=(need, head_dim), unit_stride=True, **like)
    if qkv_bias is not None:
        check_tensor(fn, "qkv_bias", qkv_bias, shape=(3 * heads * head_dim,), **like)
    if out is not None:
        check_tensor(fn, "out", out, shape=(T, heads * head_dim), unit_stride=True, **like)
    if scale is None:
        scale = head_dim ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"{fn}: scale={scale!r}, expected a positive float")
    return T, heads, head_dim, has_rel, float(scale)


def _dot_precision(dtype):
    return "tf32" if dtype in (torch.float16, torch.bfloat16) else "ieee"    # "tf32" is ignored for 16-bit inputs


def _resolve(fn, segments, head_dim, dtype, has_rel, config):
    """choose_config + choose_backward_config with the caller's overrides, checked."""
    defaults = {**choose_config(segments, head_dim, dtype), **choose_backward_config(segments, head_dim, dtype)}
    cfg = resolve_config(fn, defaults, config, pow2=("BLOCK_M", "TAIL_M", "BLOCK_KH", "BLOCK_KW", "num_warps",
                                                     "BWD_BLOCK_M", "BWD_TAIL_M", "BWD_BLOCK_KH", "BWD_BLOCK_KW",
                                                     "bwd_num_warps", "KV_BLOCK_M", "KV_BLOCK_KH", "KV_BLOCK_KW",
                                                     "kv_num_warps"))
    for m, tail in (("BLOCK_M", "TAIL_M"), ("BWD_BLOCK_M", "BWD_TAIL_M")):
        if config and m in config and tail not in config:     # the tail that goes with that BLOCK_M
            cfg[tail] = default_tail(segments.group_shapes, cfg[m])
    for pre in ("", "BWD_"):
        bm, tm, n = cfg[pre + "BLOCK_M"], cfg[pre + "TAIL_M"], cfg[pre + "BLOCK_KH"] * cfg[pre + "BLOCK_KW"]
        if not 16 <= tm <= bm or n < 16:
            raise ValueError(f"{fn}: config {pre}BLOCK_M={bm}, {pre}TAIL_M={tm}, {pre}BLOCK_KH*{pre}BLOCK_KW={n}, "
                             f"expected 16 <= {pre}TAIL_M <= {pre}BLOCK_M and {pre}BLOCK_KH*{pre}BLOCK_KW >= 16 "
                             f"(tensor-core tiles)")
    if cfg["KV_BLOCK_M"] < 16 or cfg["KV_BLOCK_KH"] * cfg["KV_BLOCK_KW"] < 16:
        raise ValueError(f"{fn}: config KV_BLOCK_M={cfg['KV_BLOCK_M']}, KV_BLOCK_KH*KV_BLOCK_KW="
                         f"{cfg['KV_BLOCK_KH'] * cfg['KV_BLOCK_KW']}, expected both >= 16 (tensor-core tiles)")
    if has_rel and cfg["BWD_BLOCK_KW"] < segments.max_gw:
        raise ValueError(f"{fn}: config BWD_BLOCK_KW={cfg['BWD_BLOCK_KW']}, expected >= {segments.max_gw} (the "
                         f"widest group: with rel-pos the dQ kernel's key tiles span whole group rows)")
    return cfg


def _rel_lens(segments, kh_tiles, kw_tiles):
    """Row lengths of the per-token rel-pos tables: whole key tiles of every kernel that reads them, 16-aligned."""
    rh_len = _round_up(max(_round_up(segments.max_gh, kh) for kh in kh_tiles), 16)
    rw_len = _round_up(max(_round_up(segments.max_gw, kw) for kw in kw_tiles), 16)
    return rh_len, rw_len


def _check_span(fn, segments, row):
    if segments.max_view_tokens * row >= 2**31:
        raise ValueError(f"{fn}: a view of {segments.max_view_tokens} tokens at row stride {row}, expected fewer "
                         f"than 2**31 elements per view (32-bit offsets within a view)")


def _kvpad(qkv, qkv_bias):
    """k, v of padded keys: the qkv bias (zeros for a bias-free linear) as one token row with qkv's strides."""
    _, _, heads, head_dim = qkv.shape
    s_s, s_h = qkv.stride(1), qkv.stride(2)
    kvpad = torch.zeros(2 * s_s + (heads - 1) * s_h + head_dim, device=qkv.device, dtype=qkv.dtype)
    if qkv_bias is not None:
        kvpad.as_strided((3, heads, head_dim), (s_s, s_h, 1)).copy_(qkv_bias.view(3, heads, head_dim))
    return kvpad


def _rel_tables(qkv, segments, rel_pos_h, rel_pos_w, rh_len, rw_len):
    """Per-token rel-pos projections (`_relpos_kernel`), log2 units, fp32 (fp64 for fp64 inputs):
    relh [heads, T, rh_len >= max GH] and relw [heads, T, rw_len]; for real tokens entries GH.. (GW..) hold -inf."""
    T, _, heads, head_dim = qkv.shape
    acc = acc_dtype(qkv.dtype)
    relh = torch.empty(heads, T, rh_len, device=qkv.device, dtype=acc)
    relw = torch.empty(heads, T, rw_len, device=qkv.device, dtype=acc)
    block_rh = max(16, triton.next_power_of_2(max(2 * segments.max_gh - 1, rh_len)))
    block_rw = max(16, triton.next_power_of_2(max(2 * segments.max_gw - 1, rw_len)))
    progs = segments.program_table(RELPOS_BLOCK_M, RELPOS_BLOCK_M)
    _relpos_kernel[(progs.shape[0], heads)](
        qkv, progs, rel_pos_h, rel_pos_w, relh, relw,
        qkv.stride(0), qkv.stride(2),
        progs.stride(0), rel_pos_h.stride(0), rel_pos_w.stride(0),
        relh.stride(0), relh.stride(1), relw.stride(0), relw.stride(1), rh_len, rw_len,
        HEAD_DIM=head_dim, BLOCK_M=RELPOS_BLOCK_M, BLOCK_RH=block_rh, BLOCK_RW=block_rw,
        DOT_PRECISION=_dot_precision(qkv.dtype), num_warps=_relpos_warps(block_rh, block_rw),
    )
    return relh, relw


def _aligned(qkv):
    """Every K/V row start (token rows and the bias row) 16-byte aligned -> vectorised, pipelined K/V loads."""
    esize = qkv.element_size()
    return qkv.data_ptr() % 16 == 0 and all(st * esize % 16 == 0 for st in qkv.stride()[:3])


def _forward(qkv, segments, rel_pos_h, rel_pos_w, qkv_bias, out, scale, cfg, with_lse):
    """The forward launches; returns (out, lse [heads, T] or None)."""
    fn = "attention"
    T, _, heads, head_dim = qkv.shape
    has_rel = rel_pos_h is not None
    acc = acc_dtype(qkv.dtype)
    if out is None:   # every row is written when the groups cover all T tokens: no fill
        alloc = torch.empty if segments.covered_tokens == T else torch.zeros
        out = alloc(T, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    # only real queries' entries are written (and read by the backward)
    lse = torch.empty(heads, T, device=qkv.device, dtype=acc) if with_lse else None
    if segments.num_groups == 0 or heads == 0:
        return out, lse
    # per-token rel-pos rows: padded to whole key tiles (the kernel reads whole tiles), 16-aligned
    rh_len, rw_len = _rel_lens(segments, [cfg["BLOCK_KH"]], [cfg["BLOCK_KW"]])
    _check_span(fn, segments, max(qkv.stride(0), rh_len, rw_len) if has_rel else qkv.stride(0))
    kvpad = _kvpad(qkv, qkv_bias)
    if has_rel:
        relh, relw = _rel_tables(qkv, segments, rel_pos_h, rel_pos_w, rh_len, rw_len)
    else:
        relh = relw = torch.empty(1, device=qkv.device, dtype=acc)     # unused (HAS_REL=False)

    progs = segments.program_table(cfg["BLOCK_M"], cfg["TAIL_M"])
    _attention_kernel[(progs.shape[0], heads)](
        qkv, kvpad, progs, relh, relw, out, lse if with_lse else out,
        scale * LOG2E,
        qkv.stride(0), qkv.stride(1), qkv.stride(2),
        progs.stride(0),
        relh.stride(0) if has_rel else 0, relh.stride(1) if has_rel else 0,
        relw.stride(0) if has_rel else 0, relw.stride(1) if has_rel else 0,
        out.stride(0), head_dim, T,
        HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], TAIL_M=cfg["TAIL_M"], BLOCK_KH=cfg["BLOCK_KH"],
        BLOCK_KW=cfg["BLOCK_KW"], HAS_REL=has_rel, HAS_LSE=with_lse, ALIGNED=_aligned(qkv),
        DOT_PRECISION=_dot_precision(qkv.dtype), ACC=tl_acc_dtype(qkv.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def _backward(dout, qkv, out, lse, rel_pos_h, rel_pos_w, qkv_bias, segments, scale, cfg):
    """(dqkv, d rel_pos_h, d rel_pos_w, d qkv_bias) for the gradient dout of out; see the module docstring."""
    T, _, heads, head_dim = qkv.shape
    dev, acc, has_rel = qkv.device, acc_dtype(qkv.dtype), rel_pos_h is not None
    alloc = torch.empty if segments.covered_tokens == T else torch.zeros
    dqkv = alloc(T, 3, heads, head_dim, device=dev, dtype=qkv.dtype)       # every token of a group is written
    drh = torch.zeros(rel_pos_h.shape, device=dev, dtype=acc) if has_rel else None
    drw = torch.zeros(rel_pos_w.shape, device=dev, dtype=acc) if has_rel else None
    dkv_pad = torch.zeros(2, heads, head_dim, device=dev, dtype=acc)
    if segments.num_groups == 0 or heads == 0:
        return dqkv, drh, drw, dkv_pad
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    # delta[h, t] = dO . O per (head, query): [heads, T]
    delta = torch.einsum("thd,thd->ht", dout.view(T, heads, head_dim).to(acc), out.view(T, heads, head_dim).to(acc))
    delta = delta.contiguous()
    rh_len, rw_len = _rel_lens(segments, [cfg["BWD_BLOCK_KH"], cfg["KV_BLOCK_KH"]],
                               [cfg["BWD_BLOCK_KW"], cfg["KV_BLOCK_KW"]])
    kvpad = _kvpad(qkv, qkv_bias)
    if has_rel:     # recomputed, not saved: one cheap launch
        relh, relw = _rel_tables(qkv, segments, rel_pos_h, rel_pos_w, rh_len, rw_len)
        drelh, drelw = torch.empty_like(relh), torch.empty_like(relw)
        dq = torch.empty(T, heads, head_dim, device=dev, dtype=acc)     # dq of the scores' q.k part, then + rel
    else:
        relh = relw = drelh = drelw = torch.empty(1, device=dev, dtype=acc)
        dq = dqkv[:, 0]
    rel_strides = (relh.stride(0), relh.stride(1), relw.stride(0), relw.stride(1)) if has_rel else (0, 0, 0, 0)
    common = dict(HEAD_DIM=head_dim, HAS_REL=has_rel, ALIGNED=_aligned(qkv), DOT_PRECISION=_dot_precision(qkv.dtype),
                  ACC=tl_acc_dtype(qkv.dtype), num_stages=cfg["bwd_num_stages"])

    progs = segments.program_table(cfg["BWD_BLOCK_M"], cfg["BWD_TAIL_M"])
    _attention_bwd_dq_kernel[(progs.shape[0], heads)](
        qkv, kvpad, progs, relh, relw, dout, lse, delta, dq, drelh, drelw,
        scale * LOG2E, scale,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), progs.stride(0), *rel_strides,
        dout.stride(0), head_dim, T, dq.stride(0), dq.stride(1),
        BLOCK_M=cfg["BWD_BLOCK_M"], TAIL_M=cfg["BWD_TAIL_M"], BLOCK_KH=cfg["BWD_BLOCK_KH"],
        BLOCK_KW=cfg["BWD_BLOCK_KW"], num_warps=cfg["bwd_num_warps"], **common,
    )

    progs = segments.key_tile_table(cfg["KV_BLOCK_KH"], cfg["KV_BLOCK_KW"])
    dpad = torch.empty(progs.shape[0], heads, 2, head_dim, device=dev, dtype=acc)    # padded keys' dK, dV sums
    _attention_bwd_dkdv_kernel[(progs.shape[0], heads)](
        qkv, kvpad, progs, relh, relw, dout, lse, delta, dqkv, dpad,
        scale * LOG2E, scale,
        qkv.stride(0), qkv.stride(1), qkv.stride(2), progs.stride(0), *rel_strides,
        dout.stride(0), head_dim, T, dqkv.stride(0), dqkv.stride(1), dqkv.stride(2),
        BLOCK_M=cfg["KV_BLOCK_M"], BLOCK_KH=cfg["KV_BLOCK_KH"], BLOCK_KW=cfg["KV_BLOCK_KW"],
        num_warps=cfg["kv_num_warps"], **common,
    )
    dkv_pad = dpad.sum(0).transpose(0, 1)                                       # [2, heads, head_dim]

    if has_rel:
        progs, runs = segments.relpos_backward_table(RELPOS_BLOCK_M * RELPOS_BWD_SUB_BLOCKS)
        q_out = dqkv[:, 0]
        for axis, table, drel, dtable, size in ((0, rel_pos_h, drelh, drh, segments.max_gh),
                                                (1, rel_pos_w, drelw, drw, segments.max_gw)):
            block_r = max(16, triton.next_power_of_2(2 * size - 1))
            part = torch.empty(progs.shape[0], heads, block_r, head_dim, device=dev, dtype=acc)
            dq_out = dq if axis == 0 else q_out           # rows pass: dq += G_h Rh in place; columns: -> dqkv
            _relpos_bwd_kernel[(progs.shape[0], heads)](
                qkv, progs, table, drel, dq, dq_out, part,
                qkv.stride(0), qkv.stride(2), progs.stride(0), table.stride(0), drel.stride(0), drel.stride(1),
                dq.stride(0), dq.stride(1), dq_out.stride(0), dq_out.stride(1),
                AXIS=axis, HEAD_DIM=head_dim, BLOCK_M=RELPOS_BLOCK_M, SUB_BLOCKS=RELPOS_BWD_SUB_BLOCKS,
                BLOCK_R=block_r, DOT_PRECISION=_dot_precision(qkv.dtype), ACC=tl_acc_dtype(qkv.dtype),
                num_warps=_relpos_warps(block_r, block_r),
            )
            # every shape's programs are one contiguous run: sum over its programs and the heads (shared tables)
            for gh, gw, rh_off, rw_off, a, b in runs:
                off, n = (rh_off, 2 * gh - 1) if axis == 0 else (rw_off, 2 * gw - 1)
                dtable[off:off + n] += part[a:b].sum((0, 1))[:n]
    return dqkv, drh, drw, dkv_pad


class AttentionFunction(torch.autograd.Function):
    """`attention` with a backward (FlashAttention-2 style, deterministic, no N x N tensor).

    Saved for backward: qkv, out, the log-sum-exp [heads, T] (fp32; fp64 for fp64 inputs), the packed
    rel_pos_h / rel_pos_w tables and qkv_bias. Not saved: the per-token rel-pos projections (relh / relw,
    [heads, T, ~max GH]); the backward recomputes them with `_relpos_kernel`."""

    @staticmethod
    def forward(ctx, qkv, rel_pos_h, rel_pos_w, qkv_bias, segments, scale, cfg):
        out, lse = _forward(qkv, segments, rel_pos_h, rel_pos_w, qkv_bias, None, scale, cfg, with_lse=True)
        ctx.save_for_backward(qkv, out, lse, rel_pos_h, rel_pos_w, qkv_bias)
        ctx.segments, ctx.scale, ctx.cfg = segments, scale, cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        qkv, out, lse, rel_pos_h, rel_pos_w, qkv_bias = ctx.saved_tensors
        dqkv, drh, drw, dkv_pad = _backward(dout, qkv, out, lse, rel_pos_h, rel_pos_w, qkv_bias, ctx.segments,
                                            ctx.scale, ctx.cfg)
        dbias = None
        if qkv_bias is not None and ctx.needs_input_grad[3]:    # padded keys' k, v are the bias; q gets nothing
            dbias = torch.cat([torch.zeros_like(dkv_pad[0]).flatten(), dkv_pad.flatten()]).to(qkv_bias.dtype)
        if drh is not None:
            drh, drw = drh.to(rel_pos_h.dtype), drw.to(rel_pos_w.dtype)
        return dqkv, drh, drw, dbias, None, None, None


def attention(qkv, segments, *, rel_pos_h=None, rel_pos_w=None, qkv_bias=None, out=None, scale=None,
              config=None):
    """Attention over every group of `segments` in one launch; returns out [T, heads * head_dim].

    qkv: [T, 3, heads, head_dim] (e.g. `linear_out.view(T, 3, heads, head_dim)`), fp32/fp16/bf16 (fp64 for
        gradient checks in Triton's interpreter).
    segments: SegmentTable from build_segments, for qkv's device.
    rel_pos_h, rel_pos_w: packed rel-pos tables (pack_rel_pos over segments.rel_sizes_*), or None for no bias.
    qkv_bias: the qkv linear's bias (3 * heads * head_dim values): the k and v of padded window keys.
        None means a bias-free linear, i.e. padded keys have k = v = 0 (still keys, not masked).
    out: optional [T, heads * head_dim] output written in place; tokens outside every group are untouched.
        Default: a new tensor, zero outside the groups (not filled at all when the groups cover every token).
        Not with autograd.
    scale: logit scale, default head_dim ** -0.5.
    config: overrides of choose_config (BLOCK_M, TAIL_M, BLOCK_KH, BLOCK_KW, num_warps, num_stages) and of
        choose_backward_config (BWD_*, KV_*, bwd_num_warps, kv_num_warps, bwd_num_stages).
    Differentiable in qkv, rel_pos_h, rel_pos_w and qkv_bias when autograd records (AttentionFunction).
    """
    fn = "attention"
    T, heads, head_dim, has_rel, scale = _check_inputs(fn, qkv, segments, rel_pos_h, rel_pos_w, qkv_bias, out, scale)
    cfg = _resolve(fn, segments, head_dim, qkv.dtype, has_rel, config)
    tensors = (qkv, rel_pos_h, rel_pos_w, qkv_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        if out is not None:
            raise ValueError(f"{fn}: out= given while autograd records, expected out=None (a new output)")
        rh_len, rw_len = _rel_lens(segments, [cfg["BWD_BLOCK_KH"], cfg["KV_BLOCK_KH"]],
                                   [cfg["BWD_BLOCK_KW"], cfg["KV_BLOCK_KW"]])
        _check_span(fn, segments, max(qkv.stride(0), rh_len, rw_len) if has_rel else qkv.stride(0))
        return AttentionFunction.apply(qkv, rel_pos_h, rel_pos_w, qkv_bias, segments, scale, cfg)
    return _forward(qkv, segments, rel_pos_h, rel_pos_w, qkv_bias, out, scale, cfg, with_lse=False)[0]


# ---------------------------------------------------------------------------------------------- reference

def attention_reference(qkv, segments, *, rel_pos_h=None, rel_pos_w=None, qkv_bias=None, out=None, scale=None,
                        compute_dtype=torch.float64):
    """Pure-torch reference of `attention`: per group, gather (padding = qkv bias), materialised bias, softmax.

    Same arguments as `attention`; computes in `compute_dtype`. Differentiable (autograd through the gathers,
    the index stores and softmax): the backward's reference."""
    T, heads, head_dim, has_rel, scale = _check_inputs("attention_reference", qkv, segments, rel_pos_h, rel_pos_w,
                                                       qkv_bias, out, scale)
    if out is None:
        out = torch.zeros(T, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    dev, cd = qkv.device, compute_dtype
    pad = (torch.zeros(3, heads, head_dim, device=dev, dtype=cd) if qkv_bias is None
           else qkv_bias.reshape(3, heads, head_dim).to(cd))
    for tok0, H, W, r0, c0, GH, GW, rh_off, rw_off in segments.rows.tolist():
        gy = torch.arange(GH, device=dev).repeat_interleave(GW)          # [n] group row of each position
        gx = torch.arange(GW, device=dev).repeat(GH)                     # [n] group col
        y, x = r0 + gy, c0 + gx
        real = (y < H) & (x < W)
        tok = tok0 + y * W + x
        g = pad.expand(GH * GW, 3, heads, head_dim).clone()              # [n, 3, heads, hd]
        g[real] = qkv[tok[real]].to(cd)
        q, k, v = g.permute(1, 2, 0, 3).unbind(0)                        # each [heads, n, hd]
        logits = (q @ k.transpose(1, 2)) * scale                         # [heads, n, n]
        if has_rel:
            Rh = rel_pos_h[rh_off:rh_off + 2 * GH - 1].to(cd)            # [2GH-1, hd]
            Rw = rel_pos_w[rw_off:rw_off + 2 * GW - 1].to(cd)
            Rh_rel = Rh[torch.arange(GH, device=dev)[:, None] - torch.arange(GH, device=dev)[None, :] + GH - 1]
            Rw_rel = Rw[torch.arange(GW, device=dev)[:, None] - torch.arange(GW, device=dev)[None, :] + GW - 1]
            rel_h = torch.einsum("hnd,nkd->hnk", q, Rh_rel[gy])          # [heads, n, GH]: q . Rh[qh - kh + GH-1]
            rel_w = torch.einsum("hnd,nkd->hnk", q, Rw_rel[gx])          # [heads, n, GW]
            logits = logits + rel_h[:, :, gy] + rel_w[:, :, gx]          # bias[h, q, key] materialised
        o = torch.softmax(logits, dim=-1) @ v                            # [heads, n, hd]
        o = o.transpose(0, 1).reshape(GH * GW, heads * head_dim)         # [n, heads * hd]
        out[tok[real]] = o[real].to(out.dtype)
    return out




# ------------------------------------------------------------------------------------------ compile check

def _signature(kernel, dtype, acc_ptrs):
    """Compile signature: *dtype for data pointers, *fp32 for the fp32 scratch named in acc_ptrs, *i32 for the
    program table, fp32 for the scales, i32 for strides and lengths, constexpr for the constexprs."""
    sig = {}
    for n, prm in inspect.signature(kernel.fn).parameters.items():
        sig[n] = ("constexpr" if prm.annotation is tl.constexpr else "*i32" if n == "prog_ptr" else "*fp32" if n in acc_ptrs
                  else f"*{dtype}" if n.endswith("_ptr") else "fp32" if n.endswith("scale") else "i32")
    return sig


def _aligned_args(kernel, unaligned=()):
    """Args that are multiples of 16 in the real launches (Triton's divisibility specialisation): pointers and
    strides, except the program table's row stride (10) and those named."""
    args = [n for n, t in _signature(kernel, "bf16", ()).items() if t != "constexpr"]
    return [n for n in args if (n.endswith("_ptr") or n.startswith(("stride_", "len_")))
            and n not in ("stride_prog", *unaligned)]


PRODUCTION_CASES = [   # name, views, window, class_token: the launches of the real model (head_dim 64)
    ("sam-global-1024", [(0, 64, 64)], None, False),
    ("sam-global-640", [(0, 40, 40)], None, False),
    ("sam-global-mixed", [(0, 64, 64), (4096, 40, 40)], None, False),
    ("sam-window-14", [(0, 64, 64), (4096, 40, 40)], 14, False),
    ("clip-1024", [(0, 16, 16)], None, True),
    ("clip-640", [(0, 10, 10)], None, True),
]


def _production_configs():
    """What choose_config / choose_backward_config pick for the real launches, per dtype: the inference
    forward, the training forward (HAS_LSE), the dQ and dK/dV kernels and both rel-pos kernels."""
    entries = []
    acc = ("relh_ptr", "relw_ptr", "lse_ptr", "delta_ptr", "drelh_ptr", "drelw_ptr", "dpad_ptr", "drel_ptr", "part_ptr")
    for dtype, tname in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
        for name, views, window, cls in PRODUCTION_CASES:
            seg = build_segments(views, window, class_token=cls)
            c = {**choose_config(seg, 64, dtype), **choose_backward_config(seg, 64, dtype)}
            has_rel = not cls
            # stride_lse_head is T (any); without rel-pos the rel strides are 0 and dQ goes straight to dqkv
            unaligned = ["stride_lse_head"] + ([] if has_rel else ["stride_relh_head", "stride_relh_t",
                                                                    "stride_relw_head", "stride_relw_t"])
            flags = dict(HEAD_DIM=64, HAS_REL=has_rel, ALIGNED=True, DOT_PRECISION="tf32", ACC=tl.float32)
            big = {90: 2} if c["BLOCK_M"] >= 128 else {}
            tile = f"M{c['BLOCK_M']}" + (f"+{c['TAIL_M']}" if c["TAIL_M"] < c["BLOCK_M"] else "")
            for lse in (False, True):
                entries.append(dict(
                    name=f"attention{'-lse' if lse else ''}/{name}/{tname}", kernel=_attention_kernel,
                    signature=_signature(_attention_kernel, tname, acc),
                    constexprs=dict(flags, BLOCK_M=c["BLOCK_M"], TAIL_M=c["TAIL_M"], BLOCK_KH=c["BLOCK_KH"],
                                    BLOCK_KW=c["BLOCK_KW"], HAS_LSE=lse),
                    aligned=_aligned_args(_attention_kernel, unaligned),
                    num_warps=c["num_warps"], num_stages=c["num_stages"],
                    expect_mma=True, min_ctas_per_sm=big, note=f"{tile} N{c['BLOCK_KH']}x{c['BLOCK_KW']}",
                ))
            tile = f"M{c['BWD_BLOCK_M']}" + (f"+{c['BWD_TAIL_M']}" if c["BWD_TAIL_M"] < c["BWD_BLOCK_M"] else "")
            entries.append(dict(
                name=f"attention-bwd-dq/{name}/{tname}", kernel=_attention_bwd_dq_kernel,
                signature=_signature(_attention_bwd_dq_kernel, tname, acc + (("dq_ptr",) if has_rel else ())),
                constexprs=dict(flags, BLOCK_M=c["BWD_BLOCK_M"], TAIL_M=c["BWD_TAIL_M"], BLOCK_KH=c["BWD_BLOCK_KH"],
                                BLOCK_KW=c["BWD_BLOCK_KW"]),
                aligned=_aligned_args(_attention_bwd_dq_kernel, unaligned),
                num_warps=c["bwd_num_warps"], num_stages=c["bwd_num_stages"], expect_mma=True,
                note=f"{tile} N{c['BWD_BLOCK_KH']}x{c['BWD_BLOCK_KW']}",
            ))
            entries.append(dict(
                name=f"attention-bwd-dkdv/{name}/{tname}", kernel=_attention_bwd_dkdv_kernel,
                signature=_signature(_attention_bwd_dkdv_kernel, tname, acc),
                constexprs=dict(flags, BLOCK_M=c["KV_BLOCK_M"], BLOCK_KH=c["KV_BLOCK_KH"], BLOCK_KW=c["KV_BLOCK_KW"]),
                aligned=_aligned_args(_attention_bwd_dkdv_kernel, unaligned),
                num_warps=c["kv_num_warps"], num_stages=c["bwd_num_stages"], expect_mma=True,
                note=f"N{c['KV_BLOCK_KH']}x{c['KV_BLOCK_KW']} M{c['KV_BLOCK_M']}",
            ))
        for name, size in (("relpos-global-1024", 64), ("relpos-window-14", 14)):
            block_r = max(16, triton.next_power_of_2(2 * size - 1))
            entries.append(dict(
                name=f"attention/{name}/{tname}", kernel=_relpos_kernel, signature=_signature(_relpos_kernel, tname, acc),
                constexprs=dict(HEAD_DIM=64, BLOCK_M=RELPOS_BLOCK_M, BLOCK_RH=block_r, BLOCK_RW=block_r,
                                DOT_PRECISION="tf32"),
                aligned=_aligned_args(_relpos_kernel),     # table rows padded to 16s
                num_warps=_relpos_warps(block_r, block_r), num_stages=3, expect_mma=True,
                note=f"M{RELPOS_BLOCK_M} R{block_r}",
            ))
            for axis, last in ((0, False), (1, True)):    # rows: fp32 dq in place; columns: into dqkv
                entries.append(dict(
                    name=f"attention-bwd-{name}-{'hw'[axis]}/{tname}", kernel=_relpos_bwd_kernel,
                    signature=_signature(_relpos_bwd_kernel, tname, acc + ("dq_in_ptr",) + (() if last else
                                                                                            ("dq_out_ptr",))),
                    constexprs=dict(AXIS=axis, HEAD_DIM=64, BLOCK_M=RELPOS_BLOCK_M, SUB_BLOCKS=RELPOS_BWD_SUB_BLOCKS,
                                    BLOCK_R=block_r, DOT_PRECISION="tf32", ACC=tl.float32),
                    aligned=_aligned_args(_relpos_bwd_kernel),
                    num_warps=_relpos_warps(block_r, block_r), num_stages=3, expect_mma=True,
                    note=f"M{RELPOS_BLOCK_M}x{RELPOS_BWD_SUB_BLOCKS} R{block_r}",
                ))
    return entries


# Entries for gundam.kernels.compile_check: compile without a GPU at the production block sizes.
COMPILE_CONFIGS = _production_configs()
