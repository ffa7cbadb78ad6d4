"""Segmented attention: every SAM window, every global view and every CLIP view of a batch in one launch.

The packed token-major `qkv` buffer ([total_tokens, 3, heads, head_dim], a view of the fused qkv linear's
[T, 3C] output) holds all views of a batch, each a row-major H x W grid at some token offset. A segment table
(`segments.build_segments`) lists the attention groups: a 14x14 window of a view (padded at the bottom/right
edge), a whole view (SAM global blocks) or a class token + h*w tokens (CLIP). One launch computes all groups of
a table:

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
- Padding work (`tiling.mma_work`: issued / useful query x key products): a 14 x 14 window is issued 208 query rows
  x 224 key slots (7 tiles of 2 x 16) = 1.21x its 196 x 196; 64-row blocks and 8 x 8 tiles issued
  256 x 256 = 1.71x. Why this tiling on sm_90: query rows come in 64s per warpgroup (wgmma M) plus the 16-row
  tail; p.v needs key tiles in 16s (its K); the outer-sum bias needs rectangular power-of-two tiles, so 14
  columns cost 16 slots and 14 x 16 = 224 is the fewest. 2 x 16 tiles get there in 32-key steps (1 x 16 takes
  twice the softmax steps for the same slots; 4 x 16 and 8 x 8 round the 14 rows up to 16: 256). Flat 16-key
  runs would issue 208 (1.13x) but turn the bias into a per-score gather; holding a window's K/V across its
  query blocks is not expressible in Triton without unrolling the key loop.
- Block sizes come from `tiling.choose_config` (a heuristic on the group shapes); any BLOCK_M / TAIL_M /
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
`tiling.choose_backward_config`; the training forward and every backward kernel are in the compile check.
"""
import torch
import triton
import triton.language as tl

from gundam.kernels.launch import (GRAD_DTYPES, acc_dtype, check_scale, check_tensor, dot_precision, resolve_config,
                                   tl_acc_dtype)
from gundam.kernels.segments import (PROG_Q0, RELPOS_BLOCK_M, RELPOS_BWD_SUB_BLOCKS, SEG_COL0, SEG_GH, SEG_GW, SEG_H,
                                     SEG_RH_OFF, SEG_ROW0, SEG_RW_OFF, SEG_TOKEN, SEG_W, SegmentTable, default_tail)
from gundam.kernels.tiling import choose_backward_config, choose_config, relpos_block, relpos_warps, round_up

# ------------------------------------------------------------------------------------------------ kernels

LOG2E = tl.constexpr(1.4426950408889634)    # scores are kept in base 2 (exp2); ln x = log2 x / LOG2E
# the program table's columns (segments.SEG_* and PROG_Q0) as constexprs for the kernels
_TOKEN, _H, _W, _ROW0, _COL0, _GH, _GW, _RH_OFF, _RW_OFF, _Q0 = map(tl.constexpr, (
    SEG_TOKEN, SEG_H, SEG_W, SEG_ROW0, SEG_COL0, SEG_GH, SEG_GW, SEG_RH_OFF, SEG_RW_OFF, PROG_Q0))


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
def _scores(qk, qk_scale, k_in, q_real, relh_rows, relw_rows, kh0, kw0, offs_kr, offs_kc,
            BLOCK_M: tl.constexpr, BLOCK_KH: tl.constexpr, BLOCK_KW: tl.constexpr, HAS_REL: tl.constexpr,
            TRANSPOSED: tl.constexpr):
    """Scores in log2 units of a query block against a key tile, s = qk * qk_scale + bias: [BLOCK_M, BLOCK_N]
    (queries x keys), or s^T [BLOCK_N, BLOCK_M] for qk^T with TRANSPOSED (the dK/dV kernel).

    With rel-pos, bias = rel_h[q, kh] + rel_w[q, kw] from the per-token tables (relh_rows / relw_rows: each
    query's row, [BLOCK_M] pointers; the tile's rows in the group are kh0 + offs_kr, its columns kw0 + offs_kc),
    an outer sum of two thin tiles; the tables hold -inf past the group's edge and are padded to whole
    tiles, so only the row mask: the loads stay 16-byte vectors, and no tile coordinates stay live across a
    pipelined loop. Without rel-pos, -inf for keys outside the group (k_in [BLOCK_N])."""
    BLOCK_N: tl.constexpr = BLOCK_KH * BLOCK_KW
    if HAS_REL:
        if TRANSPOSED:
            bh = tl.load(relh_rows[None, :] + (kh0 + offs_kr)[:, None], mask=q_real[None, :], other=0.0)  # [KH, M]
            bw = tl.load(relw_rows[None, :] + (kw0 + offs_kc)[:, None], mask=q_real[None, :], other=0.0)  # [KW, M]
            bias = tl.reshape(bh[:, None, :] + bw[None, :, :], (BLOCK_N, BLOCK_M))   # [KH, KW, M] -> [N, M]
        else:
            bh = tl.load(relh_rows[:, None] + (kh0 + offs_kr)[None, :], mask=q_real[:, None], other=0.0)  # [M, KH]
            bw = tl.load(relw_rows[:, None] + (kw0 + offs_kc)[None, :], mask=q_real[:, None], other=0.0)  # [M, KW]
            bias = tl.reshape(bh[:, :, None] + bw[:, None, :], (BLOCK_M, BLOCK_N))   # [M, KH, KW] -> [M, N]
        s = qk * qk_scale + bias
    else:
        k_add = tl.where(k_in, 0.0, float("-inf"))
        if TRANSPOSED:
            s = qk * qk_scale + k_add[:, None]
        else:
            s = qk * qk_scale + k_add[None, :]
    return s


@triton.jit
def _store_rel(q, q_g, q_real, table_ptr, stride_table, OFF, G, offs_d, out_base, out_rows, row_len,
               BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out[m, k] = log2(e) * q[m] . R[q_g[m] - k + G - 1] for k in [0, G), R = table rows OFF.. OFF+2G-2;
    -inf for k in [G, row_len): keys past the group's edge, so the attention kernel needs no column mask.
    Row m of out starts at out_base + out_rows[m] (32-bit offsets: half the address registers)."""
    offs_r = tl.arange(0, BLOCK_R)
    r = tl.load(table_ptr + (OFF + offs_r)[:, None] * stride_table + offs_d[None, :],
                mask=(offs_r < 2 * G - 1)[:, None], other=0.0)
    p = tl.dot(q, tl.trans(r), input_precision=DOT_PRECISION) * LOG2E                # [M, R]
    k = q_g[:, None] + G - 1 - offs_r[None, :]                                    # table row i -> key k
    tl.store(out_base + (out_rows[:, None] + k), p, mask=q_real[:, None] & (k >= 0) & (k < G))
    pad = q_real[:, None] & ((offs_r >= G) & (offs_r < row_len))[None, :]
    tl.store(out_base + (out_rows[:, None] + offs_r[None, :]), tl.full(p.shape, float("-inf"), p.dtype),
             mask=pad)


@triton.jit
def _relpos_kernel(
    qkv_ptr,                    # [T, 3, heads, HEAD_DIM] packed q, k, v: q is read
    prog_ptr,                   # int32 [P, PROG_COLS]: (group, query block of BLOCK_M) per program
    rph_ptr,                    # [sum over rel_sizes_h of 2*GH-1, HEAD_DIM] packed rel_pos_h
    rpw_ptr,                    # [sum over rel_sizes_w of 2*GW-1, HEAD_DIM] packed rel_pos_w
    relh_ptr,                   # out [heads, T, len_relh], fp32 (fp64): log2(e) q . Rh[qh - kh + GH - 1]
    relw_ptr,                   # out [heads, T, len_relw], fp32 (fp64): log2(e) q . Rw[qw - kw + GW - 1]
    stride_qkv_t, stride_qkv_h,                 # qkv's token and head strides (head_dim contiguous)
    stride_prog,                                # PROG_COLS
    stride_rph, stride_rpw,                     # table row strides
    stride_relh_head, stride_relh_t,            # relh's head and token strides
    stride_relw_head, stride_relw_t,            # relw's
    len_relh, len_relw,         # row lengths of relh / relw: >= max GH / GW, whole key tiles, 16-aligned
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,      # queries per program (RELPOS_BLOCK_M)
    BLOCK_RH: tl.constexpr,     # power of two >= 2 * max GH - 1 and >= len_relh
    BLOCK_RW: tl.constexpr,     # power of two >= 2 * max GW - 1 and >= len_relw
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 / fp64 inputs (exact dots), "tf32" (ignored) for 16-bit
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
    """One query block of one group, one head: flash attention over the group's key tiles (arguments as
    _attention_kernel's; prog: this program's table row)."""
    tok0, H, W, R0, C0, GH, GW, q_gh, q_gw, q_real, q_tok = _block_queries(prog, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(qkv_ptr + q_tok[:, None] * stride_qkv_t + head * stride_qkv_h + offs_d[None, :],
                mask=q_real[:, None], other=0.0)
    relh_rows = relh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t    # [BLOCK_M] (HAS_REL)
    relw_rows = relw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t

    # keys: BLOCK_KH x BLOCK_KW sub-rectangles of the group grid; key j of a block is at (j // KW, j % KW)
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
        s = _scores(qk, qk_scale, k_in, q_real, relh_rows, relw_rows, kh0, kw0, offs_kr, offs_kc,
                    BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, False)

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
        lse = (m_i + tl.math.log2(l_i)) * (1 / LOG2E)
        tl.store(lse_ptr + head.to(tl.int64) * stride_lse_head + q_tok, lse, mask=q_real)


@triton.jit
def _attention_kernel(
    qkv_ptr,                    # [T, 3, heads, HEAD_DIM] packed q, k, v (a view of the qkv linear's output)
    kvpad_ptr,                  # one token row laid out like qkv's: the k, v of padded keys (the qkv bias)
    prog_ptr,                   # int32 [P, PROG_COLS]: (group, query block) per program
    relh_ptr,                   # [heads, T, >= max GH], fp32 (fp64): log2(e) q . Rh per query (HAS_REL)
    relw_ptr,                   # [heads, T, >= max GW], fp32 (fp64): log2(e) q . Rw (HAS_REL)
    out_ptr,                    # out [T, heads * HEAD_DIM]: real queries' rows written
    lse_ptr,                    # out [heads, T], ACC: natural-log log-sum-exp per query (HAS_LSE)
    qk_scale,                   # scale * log2(e)
    stride_qkv_t, stride_qkv_s, stride_qkv_h,   # qkv's token, q/k/v and head strides (head_dim contiguous)
    stride_prog,                                # PROG_COLS
    stride_relh_head, stride_relh_t,            # relh's head and token strides (0 without rel-pos)
    stride_relw_head, stride_relw_t,            # relw's
    stride_out_t, stride_out_h,                 # out's token and head strides
    stride_lse_head,                            # T
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,      # queries per program
    TAIL_M: tl.constexpr,       # queries of a group's last program when they fit (< BLOCK_M), else BLOCK_M
    BLOCK_KH: tl.constexpr,     # key tile: BLOCK_KH rows x BLOCK_KW columns of the group
    BLOCK_KW: tl.constexpr,
    HAS_REL: tl.constexpr,      # add the decomposed rel-pos bias
    HAS_LSE: tl.constexpr,      # write the log-sum-exp (training)
    ALIGNED: tl.constexpr,      # every K/V row 16-byte aligned: vectorised, pipelined loads
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 / fp64 inputs (exact dots), "tf32" (ignored) for 16-bit
    ACC: tl.constexpr,          # accumulator dtype: tl.float32 (tl.float64 for fp64 inputs)
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
    time) and dRel_w = sum over kh of dS (key tiles span whole group rows: accumulated in registers).
    Arguments as _attention_bwd_dq_kernel's; prog: this program's table row."""
    tok0, H, W, R0, C0, GH, GW, q_gh, q_gw, q_real, q_tok = _block_queries(prog, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    q = tl.load(qkv_ptr + q_tok[:, None] * stride_qkv_t + head * stride_qkv_h + offs_d[None, :],
                mask=q_real[:, None], other=0.0)
    do = tl.load(do_ptr + q_tok[:, None] * stride_do_t + head * stride_do_h + offs_d[None, :],
                 mask=q_real[:, None], other=0.0)
    # padded queries: lse = +inf gives P = 0, so they add nothing anywhere
    lse2 = tl.load(lse_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real,
                   other=float("inf")) * LOG2E
    delta = tl.load(delta_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real, other=0.0)
    relh_rows = relh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t    # [BLOCK_M] (HAS_REL)
    relw_rows = relw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t
    if HAS_REL:
        drelh_rows = drelh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t
        drelw_rows = drelw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t
        drel_w = tl.zeros([BLOCK_M, BLOCK_KW], dtype=ACC)

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
        s = _scores(qk, qk_scale, k_in, q_real, relh_rows, relw_rows, kh0, kw0, offs_kr, offs_kc,
                    BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, False)
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
    qkv_ptr,                    # [T, 3, heads, HEAD_DIM] packed q, k, v, as the forward's
    kvpad_ptr,                  # the k, v of padded keys (the qkv bias), as the forward's
    prog_ptr,                   # int32 [P, PROG_COLS]: the forward's (group, query block) programs
    relh_ptr, relw_ptr,         # [heads, T, >= max GH / GW], ACC: the forward's per-token rel-pos tables
    do_ptr,                     # [T, heads * HEAD_DIM] gradient of out
    lse_ptr,                    # [heads, T], ACC: the forward's log-sum-exp
    delta_ptr,                  # [heads, T], ACC: rowsum(dO * O) per (head, query)
    dq_ptr,                     # out [T, heads, HEAD_DIM]: dq of the q.k part (ACC scratch with rel-pos)
    drelh_ptr, drelw_ptr,       # out, shaped and strided like relh / relw: dRel_h, dRel_w of the scores
    qk_scale,                   # scale * log2(e)
    scale,                      # the logit scale
    stride_qkv_t, stride_qkv_s, stride_qkv_h,   # qkv's token, q/k/v and head strides
    stride_prog,                                # PROG_COLS
    stride_relh_head, stride_relh_t,            # relh's (and drelh's) head and token strides (0 without rel-pos)
    stride_relw_head, stride_relw_t,            # relw's (and drelw's)
    stride_do_t, stride_do_h,                   # dO's token and head strides
    stride_lse_head,                            # T (lse and delta)
    stride_dq_t, stride_dq_h,                   # dq's token and head strides
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,      # queries per program
    TAIL_M: tl.constexpr,       # queries of a group's last program when they fit (< BLOCK_M), else BLOCK_M
    BLOCK_KH: tl.constexpr,     # key tile rows; with rel-pos BLOCK_KW spans whole group rows
    BLOCK_KW: tl.constexpr,
    HAS_REL: tl.constexpr,
    ALIGNED: tl.constexpr,      # every K/V row 16-byte aligned
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 / fp64 inputs (exact dots), "tf32" (ignored) for 16-bit
    ACC: tl.constexpr,          # accumulator dtype: tl.float32 (tl.float64 for fp64 inputs)
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
    qkv_ptr,                    # [T, 3, heads, HEAD_DIM] packed q, k, v, as the forward's
    kvpad_ptr,                  # the k, v of padded keys (the qkv bias), as the forward's
    prog_ptr,                   # int32 [P, PROG_COLS]: (group, key tile index in PROG_Q0) per program
    relh_ptr, relw_ptr,         # [heads, T, >= max GH / GW], ACC: the forward's per-token rel-pos tables
    do_ptr,                     # [T, heads * HEAD_DIM] gradient of out
    lse_ptr,                    # [heads, T], ACC: the forward's log-sum-exp
    delta_ptr,                  # [heads, T], ACC: rowsum(dO * O) per (head, query)
    dqkv_ptr,                   # out [T, 3, heads, HEAD_DIM]: token keys' dk, dv rows
    dpad_ptr,                   # out [P, heads, 2, HEAD_DIM], ACC: this program's padded keys' dk, dv sums
    qk_scale,                   # scale * log2(e)
    scale,                      # the logit scale
    stride_qkv_t, stride_qkv_s, stride_qkv_h,   # qkv's token, q/k/v and head strides
    stride_prog,                                # PROG_COLS
    stride_relh_head, stride_relh_t,            # relh's head and token strides (0 without rel-pos)
    stride_relw_head, stride_relw_t,            # relw's
    stride_do_t, stride_do_h,                   # dO's token and head strides
    stride_lse_head,                            # T (lse and delta)
    stride_dqkv_t, stride_dqkv_s, stride_dqkv_h,    # dqkv's token, q/k/v and head strides
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,      # queries per step of the loop over the group's queries
    BLOCK_KH: tl.constexpr,     # key tile: BLOCK_KH rows x BLOCK_KW columns of the group
    BLOCK_KW: tl.constexpr,
    HAS_REL: tl.constexpr,
    ALIGNED: tl.constexpr,      # every K/V row 16-byte aligned
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 / fp64 inputs (exact dots), "tf32" (ignored) for 16-bit
    ACC: tl.constexpr,          # accumulator dtype: tl.float32 (tl.float64 for fp64 inputs)
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
                       other=float("inf")) * LOG2E
        delta = tl.load(delta_ptr + head.to(tl.int64) * stride_lse_head + q_tok, mask=q_real, other=0.0)
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)                                # [BLOCK_N, BLOCK_M]
        relh_rows = relh_ptr + head.to(tl.int64) * stride_relh_head + q_tok * stride_relh_t   # (HAS_REL)
        relw_rows = relw_ptr + head.to(tl.int64) * stride_relw_head + q_tok * stride_relw_t
        sT = _scores(qkT, qk_scale, k_in, q_real, relh_rows, relw_rows, kh0, kw0, offs_kr, offs_kc,
                     BLOCK_M, BLOCK_KH, BLOCK_KW, HAS_REL, True)
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
    qkv_ptr,                    # [T, 3, heads, HEAD_DIM] packed q, k, v: q is read
    prog_ptr,                   # int32 [P, PROG_COLS]: (group, first query) per program, groups sorted by shape
    rp_ptr,                     # this axis's packed rel-pos table, [sum of 2*G-1, HEAD_DIM]
    drel_ptr,                   # [heads, T, >= max G], ACC: dRel_h (AXIS 0) or dRel_w (AXIS 1)
    dq_in_ptr,                  # [T, heads, HEAD_DIM] dq so far
    dq_out_ptr,                 # out [T, heads, HEAD_DIM]: dq_in + G R (may be dq_in: in place)
    part_ptr,                   # out [P, heads, BLOCK_R, HEAD_DIM], ACC: this program's partial dR = G^T q
    stride_qkv_t, stride_qkv_h,                 # qkv's token and head strides
    stride_prog,                                # PROG_COLS
    stride_rp,                                  # table row stride
    stride_drel_head, stride_drel_t,            # drel's head and token strides
    stride_dq_in_t, stride_dq_in_h,             # dq_in's token and head strides
    stride_dq_out_t, stride_dq_out_h,           # dq_out's
    AXIS: tl.constexpr,         # 0: rows (Rh, GH), 1: columns (Rw, GW)
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,      # queries per step (RELPOS_BLOCK_M)
    SUB_BLOCKS: tl.constexpr,   # steps per program (RELPOS_BWD_SUB_BLOCKS)
    BLOCK_R: tl.constexpr,      # power of two >= 2 * max G - 1
    DOT_PRECISION: tl.constexpr,    # "ieee" for fp32 / fp64 inputs (exact dots), "tf32" (ignored) for 16-bit
    ACC: tl.constexpr,          # accumulator dtype: tl.float32 (tl.float64 for fp64 inputs)
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
    scale = check_scale(fn, scale, head_dim)
    return T, heads, head_dim, has_rel, scale



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
    rh_len = round_up(max(round_up(segments.max_gh, kh) for kh in kh_tiles), 16)
    rw_len = round_up(max(round_up(segments.max_gw, kw) for kw in kw_tiles), 16)
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
    block_rh = relpos_block(max(2 * segments.max_gh - 1, rh_len))
    block_rw = relpos_block(max(2 * segments.max_gw - 1, rw_len))
    progs = segments.program_table(RELPOS_BLOCK_M, RELPOS_BLOCK_M)
    _relpos_kernel[(progs.shape[0], heads)](
        qkv_ptr=qkv, prog_ptr=progs, rph_ptr=rel_pos_h, rpw_ptr=rel_pos_w, relh_ptr=relh, relw_ptr=relw,
        stride_qkv_t=qkv.stride(0), stride_qkv_h=qkv.stride(2),
        stride_prog=progs.stride(0), stride_rph=rel_pos_h.stride(0), stride_rpw=rel_pos_w.stride(0),
        stride_relh_head=relh.stride(0), stride_relh_t=relh.stride(1),
        stride_relw_head=relw.stride(0), stride_relw_t=relw.stride(1),
        len_relh=rh_len, len_relw=rw_len,
        HEAD_DIM=head_dim, BLOCK_M=RELPOS_BLOCK_M, BLOCK_RH=block_rh, BLOCK_RW=block_rw,
        DOT_PRECISION=dot_precision(qkv.dtype), num_warps=relpos_warps(block_rh, block_rw),
    )
    return relh, relw


def _aligned(qkv):
    """Every K/V row start (token rows and the bias row) 16-byte aligned -> vectorised, pipelined K/V loads."""
    esize = qkv.element_size()
    return qkv.data_ptr() % 16 == 0 and all(st * esize % 16 == 0 for st in qkv.stride()[:3])


def _rel_strides(relh, relw, has_rel):
    """The per-token rel-pos tables' stride arguments (0 when there are none: the kernels never read them)."""
    strides = (relh.stride(0), relh.stride(1), relw.stride(0), relw.stride(1)) if has_rel else (0, 0, 0, 0)
    return dict(zip(("stride_relh_head", "stride_relh_t", "stride_relw_head", "stride_relw_t"), strides))


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
        qkv_ptr=qkv, kvpad_ptr=kvpad, prog_ptr=progs, relh_ptr=relh, relw_ptr=relw, out_ptr=out,
        lse_ptr=lse if with_lse else out,
        qk_scale=scale * LOG2E.value,
        stride_qkv_t=qkv.stride(0), stride_qkv_s=qkv.stride(1), stride_qkv_h=qkv.stride(2),
        stride_prog=progs.stride(0), **_rel_strides(relh, relw, has_rel),
        stride_out_t=out.stride(0), stride_out_h=head_dim, stride_lse_head=T,
        HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], TAIL_M=cfg["TAIL_M"], BLOCK_KH=cfg["BLOCK_KH"],
        BLOCK_KW=cfg["BLOCK_KW"], HAS_REL=has_rel, HAS_LSE=with_lse, ALIGNED=_aligned(qkv),
        DOT_PRECISION=dot_precision(qkv.dtype), ACC=tl_acc_dtype(qkv.dtype),
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
    # arguments both backward kernels take
    common = dict(qkv_ptr=qkv, kvpad_ptr=kvpad, relh_ptr=relh, relw_ptr=relw, do_ptr=dout, lse_ptr=lse,
                  delta_ptr=delta, qk_scale=scale * LOG2E.value, scale=scale,
                  stride_qkv_t=qkv.stride(0), stride_qkv_s=qkv.stride(1), stride_qkv_h=qkv.stride(2),
                  **_rel_strides(relh, relw, has_rel), stride_do_t=dout.stride(0), stride_do_h=head_dim,
                  stride_lse_head=T, HEAD_DIM=head_dim, HAS_REL=has_rel, ALIGNED=_aligned(qkv),
                  DOT_PRECISION=dot_precision(qkv.dtype), ACC=tl_acc_dtype(qkv.dtype),
                  num_stages=cfg["bwd_num_stages"])

    progs = segments.program_table(cfg["BWD_BLOCK_M"], cfg["BWD_TAIL_M"])
    _attention_bwd_dq_kernel[(progs.shape[0], heads)](
        prog_ptr=progs, dq_ptr=dq, drelh_ptr=drelh, drelw_ptr=drelw,
        stride_prog=progs.stride(0), stride_dq_t=dq.stride(0), stride_dq_h=dq.stride(1),
        BLOCK_M=cfg["BWD_BLOCK_M"], TAIL_M=cfg["BWD_TAIL_M"], BLOCK_KH=cfg["BWD_BLOCK_KH"],
        BLOCK_KW=cfg["BWD_BLOCK_KW"], num_warps=cfg["bwd_num_warps"], **common,
    )

    progs = segments.key_tile_table(cfg["KV_BLOCK_KH"], cfg["KV_BLOCK_KW"])
    dpad = torch.empty(progs.shape[0], heads, 2, head_dim, device=dev, dtype=acc)    # padded keys' dK, dV sums
    _attention_bwd_dkdv_kernel[(progs.shape[0], heads)](
        prog_ptr=progs, dqkv_ptr=dqkv, dpad_ptr=dpad,
        stride_prog=progs.stride(0),
        stride_dqkv_t=dqkv.stride(0), stride_dqkv_s=dqkv.stride(1), stride_dqkv_h=dqkv.stride(2),
        BLOCK_M=cfg["KV_BLOCK_M"], BLOCK_KH=cfg["KV_BLOCK_KH"], BLOCK_KW=cfg["KV_BLOCK_KW"],
        num_warps=cfg["kv_num_warps"], **common,
    )
    dkv_pad = dpad.sum(0).transpose(0, 1)                                       # [2, heads, head_dim]

    if has_rel:
        progs, runs = segments.relpos_backward_table(RELPOS_BLOCK_M * RELPOS_BWD_SUB_BLOCKS)
        q_out = dqkv[:, 0]
        for axis, table, drel, dtable, size in ((0, rel_pos_h, drelh, drh, segments.max_gh),
                                                (1, rel_pos_w, drelw, drw, segments.max_gw)):
            block_r = relpos_block(2 * size - 1)
            part = torch.empty(progs.shape[0], heads, block_r, head_dim, device=dev, dtype=acc)
            dq_out = dq if axis == 0 else q_out           # rows pass: dq += G_h Rh in place; columns: -> dqkv
            _relpos_bwd_kernel[(progs.shape[0], heads)](
                qkv_ptr=qkv, prog_ptr=progs, rp_ptr=table, drel_ptr=drel, dq_in_ptr=dq, dq_out_ptr=dq_out,
                part_ptr=part,
                stride_qkv_t=qkv.stride(0), stride_qkv_h=qkv.stride(2), stride_prog=progs.stride(0),
                stride_rp=table.stride(0), stride_drel_head=drel.stride(0), stride_drel_t=drel.stride(1),
                stride_dq_in_t=dq.stride(0), stride_dq_in_h=dq.stride(1),
                stride_dq_out_t=dq_out.stride(0), stride_dq_out_h=dq_out.stride(1),
                AXIS=axis, HEAD_DIM=head_dim, BLOCK_M=RELPOS_BLOCK_M, SUB_BLOCKS=RELPOS_BWD_SUB_BLOCKS,
                BLOCK_R=block_r, DOT_PRECISION=dot_precision(qkv.dtype), ACC=tl_acc_dtype(qkv.dtype),
                num_warps=relpos_warps(block_r, block_r),
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
