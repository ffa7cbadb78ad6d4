"""DeepSeek-OCR 2's Qwen2 encoder attention: packed views, GQA, the prefix mask and RoPE in one launch.

Every view of a batch (m visual tokens then m learned queries; m = 144 for 768 crops, 256 for 1024 global
views) sits in packed token-major buffers, q [T, H, D] and k, v [T, KV, D] (views of the q/k/v linears'
outputs: row strides free, last dim contiguous). Per view and query head h (kv head h // (H / KV)):

    out[r] = softmax_c(rope(q[r]) . rope(k[c]) * scale, c <= max(r, m - 1)) v[c]      r, c in 0 .. 2m - 1

rope(x)[pos] = x cos[pos] + rotate_half(x) sin[pos], positions 0 .. 2m - 1 within the view (gundam.model's
apply_rope with rope_tables' fp32 tables). Visual rows see the m visual keys; query row r sees them and
queries m .. r. No attention across views.

Design:
- Program table (host-built, `PrefixSegments.program_table`): one row per (view, block of rows) that never
  straddles the visual / query boundary, grid (programs, heads): no idle programs whatever the mix of m. A
  block's visible keys are a prefix of the view: m keys for a visual block, r0 + BLOCK_M for a query block
  starting at row r0. The key loop runs in two stages (as Triton's fused-attention tutorial): the masked one
  (the prefix's end: the keys not every row of the block sees; never empty, so it runs first and the
  other's zero-trip path does not serialize the wgmmas, C7515), then the key blocks every row sees, without a
  mask. Work per view and head is ~2m^2 + m^2/2 query x key products instead of (2m)^2.
- RoPE on load: q and k are loaded as their two halves of the head dim (x1 = x[:D/2], x2 = x[D/2:]) and
  rotated in fp32, [x1 c - x2 s, x2 c + x1 s], then cast back to the input dtype for the tensor cores; the
  scores are the sum of two dots over the halves (no register shuffles to rebuild rotate_half). The tables'
  halves are equal (emb = cat(freqs, freqs)), so only cos[:, :D/2] and sin[:, :D/2] are read: the
  [BLOCK_N, D/2] fp32 table tiles cost as much as the K tile, not twice. Halves narrower than 16 (D = 16)
  are zero-padded to 16 columns (tl.dot's minimum), which adds nothing to the dots.
- Online softmax in fp32, base 2 (scale * log2(e) folded into one multiply); the log-sum-exp [H, T] is
  stored when training (HAS_LSE).

Backward (`PrefixAttentionFunction`, FlashAttention-2 style, deterministic, no atomics, no N x N tensor):
delta = rowsum(dO * O) in torch, then
- `_prefix_attention_bwd_dq_kernel`: program per (view, query block) x head, the forward's key stages with
  P = exp2(s - lse) recomputed: dQ_rot = scale dS K_rot (two halves), then RoPE's backward (the transposed
  rotation, sin -> -sin) gives dQ.
- `_prefix_rope_kernel` writes rope(q) once ([T, H, D], q's dtype, the forward's rotation by the same helpers),
  and `_prefix_attention_bwd_dkdv_kernel` reads it: rotating every query block again for every key block (the
  tables, the fp32 halves) made that kernel spill on sm_80 at every tile above 16 keys x 16 rows.
- `_prefix_attention_bwd_dkdv_kernel`: program per (view, key block) x kv head, looping over the kv head's
  H / KV query heads and over the rows that see the block (all 2m rows for a visual key block; rows from the
  block's first key on for a query key block, the first BLOCK_N of them masked): dV = sum P^T dO,
  dK_rot = scale sum dS^T Q_rot, then the inverse rotation. The GQA sum runs inside the program: no atomics.
Accumulators and the LSE follow the input: fp32, fp64 for fp64 inputs (gradient checks in the interpreter).
"""

import torch
import triton
import triton.language as tl

from gundam.kernels.launch import (GRAD_DTYPES, acc_dtype, check_scale, check_tensor, dot_precision, resolve_config,
                                   tl_acc_dtype)
from gundam.kernels.tiling import prefix_attention_config
from gundam.kernels.prefix_segments import (PSEG_END, PSEG_M, PSEG_START, PSEG_TOKEN, PrefixSegments,
                                            build_prefix_segments)

__all__ = ["prefix_attention", "prefix_attention_lse", "prefix_attention_reference", "PrefixAttentionFunction",
           "build_prefix_segments", "PrefixSegments"]

LOG2E = 1.4426950408889634
ROPE_BLOCK_M = 32       # rows per program of _prefix_rope_kernel
_LOG2E = tl.constexpr(LOG2E)                 # the same, for the kernels
_LN2 = tl.constexpr(0.6931471805599453)
_TOKEN, _M, _START, _END = map(tl.constexpr, (PSEG_TOKEN, PSEG_M, PSEG_START, PSEG_END))


# ------------------------------------------------------------------------------------------------ kernels

@triton.jit
def _load_halves(base, row_off, row_ok, offs_h, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """The two halves x[:, :HALF], x[:, HALF:] of rows base + row_off, each [R, BLOCK_H]; columns past HALF
    (BLOCK_H = 16 > HALF for head_dim 16) and rows not row_ok are zeros."""
    ptrs = base + row_off[:, None] + offs_h[None, :]
    if BLOCK_H == HALF:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_h < HALF)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0), tl.load(ptrs + HALF, mask=mask, other=0.0)


@triton.jit
def _store_halves(base, row_off, row_ok, offs_h, x1, x2, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    ptrs = base + row_off[:, None] + offs_h[None, :]
    if BLOCK_H == HALF:
        mask = row_ok[:, None]
    else:
        mask = row_ok[:, None] & (offs_h < HALF)[None, :]
    tl.store(ptrs, x1.to(base.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, x2.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _rope_tables(cos_ptr, sin_ptr, pos, ok, offs_h, stride_cos, stride_sin, HALF: tl.constexpr,
                 BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    """cos, sin [R, BLOCK_H] of positions pos (first halves of the tables: both halves are equal)."""
    if BLOCK_H == HALF:
        mask = ok[:, None]
    else:
        mask = ok[:, None] & (offs_h < HALF)[None, :]
    c = tl.load(cos_ptr + pos[:, None] * stride_cos + offs_h[None, :], mask=mask, other=0.0).to(ACC)
    s = tl.load(sin_ptr + pos[:, None] * stride_sin + offs_h[None, :], mask=mask, other=0.0).to(ACC)
    return c, s


@triton.jit
def _rope(x1, x2, c, s, ACC: tl.constexpr):
    """rope(x) = x cos + rotate_half(x) sin on the halves: [x1 c - x2 s, x2 c + x1 s] (fp32 / fp64)."""
    x1 = x1.to(ACC)
    x2 = x2.to(ACC)
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def _rope_bwd(g1, g2, c, s):
    """RoPE's backward: the transposed rotation (sin -> -sin) of the gradient w.r.t. the rotated halves."""
    return g1 * c + g2 * s, g2 * c - g1 * s


@triton.jit
def _view_block(prog, BLOCK_M: tl.constexpr):
    """A program's view (first token, m) and block: rows r0 .. r0 + BLOCK_M - 1 of the view, real where
    below the part's end (m for visual blocks, 2m for query blocks)."""
    tok0 = tl.load(prog + _TOKEN)
    m = tl.load(prog + _M)
    r0 = tl.load(prog + _START)
    end = tl.load(prog + _END)
    offs_r = r0 + tl.arange(0, BLOCK_M)
    return tok0, m, r0, end, offs_r, offs_r < end


@triton.jit
def _block_rotated_queries(prog, head, q_ptr, cos_ptr, sin_ptr, stride_q_t, stride_q_h, stride_cos, stride_sin,
                           BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, ACC: tl.constexpr):
    """A program's view and block of rows (_view_block), their token indices, and their queries of `head`
    rotated by RoPE, as two halves of the head dim in q's dtype (the prologue of the forward, the dQ kernel
    and the rotation kernel)."""
    tok0, m, r0, end, offs_r, r_ok = _view_block(prog, BLOCK_M)
    offs_h = tl.arange(0, BLOCK_H)
    q_tok = (tok0 + offs_r).to(tl.int64)
    q1, q2 = _load_halves(q_ptr + head * stride_q_h, q_tok * stride_q_t, r_ok, offs_h, HALF, BLOCK_H)
    c, s = _rope_tables(cos_ptr, sin_ptr, offs_r, r_ok, offs_h, stride_cos, stride_sin, HALF, BLOCK_H, ACC)
    q1, q2 = _rope(q1, q2, c, s, ACC)
    return (tok0, m, r0, end, offs_r, r_ok, q_tok, offs_h, q1.to(q_ptr.dtype.element_ty),
            q2.to(q_ptr.dtype.element_ty))


@triton.jit
def _key_stages(m, r0, end, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of a query block: [0, full) seen by every row of the block (no mask), [full, kv_end) masked.
    Visual blocks see keys < m; a query block from r0 sees keys <= r0 in every row and keys < r0 + BLOCK_M in
    some. The masked stage is never empty (no zero-trip path after the last MMA: C7515 on sm_90)."""
    visual = end == m
    kv_end = tl.where(visual, m, tl.minimum(r0 + BLOCK_M, 2 * m))
    seen_by_all = tl.where(visual, m, r0 + 1)
    full = (tl.minimum(seen_by_all, kv_end - 1) // BLOCK_N) * BLOCK_N
    return full, kv_end


@triton.jit
def _attn_inner(acc, l_i, m_i, q1, q2, k_view, v_view, cos_ptr, sin_ptr, qk_scale, offs_r, m, lo, hi,
                stride_k_t, stride_v_t, stride_cos, stride_sin, offs_h, offs_d,
                BLOCK_N: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, MASKED: tl.constexpr,
                DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """Online softmax over key blocks lo .. hi of the view (MASKED: keys past hi and past max(r, m - 1))."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_c = start + offs_n                                               # key positions in the view
        k_ok = offs_c < hi
        k1, k2 = _load_halves(k_view, offs_c * stride_k_t, k_ok, offs_h, HALF, BLOCK_H)   # [BLOCK_N, BLOCK_H]
        c, s = _rope_tables(cos_ptr, sin_ptr, offs_c, k_ok, offs_h, stride_cos, stride_sin, HALF, BLOCK_H, ACC)
        k1, k2 = _rope(k1, k2, c, s, ACC)
        qk = tl.dot(q1, tl.trans(k1.to(q1.dtype)), input_precision=DOT_PRECISION)        # [BLOCK_M, BLOCK_N]
        qk = tl.dot(q2, tl.trans(k2.to(q2.dtype)), qk, input_precision=DOT_PRECISION)
        s = qk * qk_scale
        if MASKED:
            see = (offs_c[None, :] <= tl.maximum(offs_r, m - 1)[:, None]) & k_ok[None, :]
            s = tl.where(see, s, float("-inf"))
        # base 2; the first masked block has a visible key in every row, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(v_view + (offs_c * stride_v_t)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _prefix_attention_kernel(
    q_ptr,          # [T, H, D] queries (before RoPE)
    k_ptr,          # [T, KV, D] keys (before RoPE)
    v_ptr,          # [T, KV, D] values
    cos_ptr,        # [L >= max 2m, D] fp32 RoPE tables (first halves read)
    sin_ptr,        # [L, D]
    prog_ptr,       # int32 [P, PSEG_COLS] program table: (view token offset, m, first row, part end)
    out_ptr,        # [T, H * D] output
    lse_ptr,        # [H, T] fp32 / fp64 natural-log log-sum-exp of the scores (HAS_LSE)
    qk_scale,       # scale * log2(e)
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_cos, stride_sin, stride_prog, stride_out_t, stride_lse_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # program = (view, block of rows) x query head; kv head = head // GROUP (GROUP = H / KV)
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    kv_head = head // GROUP
    HALF: tl.constexpr = HEAD_DIM // 2
    tok0, m, r0, end, offs_r, r_ok, q_tok, offs_h, q1, q2 = _block_rotated_queries(
        prog, head, q_ptr, cos_ptr, sin_ptr, stride_q_t, stride_q_h, stride_cos, stride_sin, BLOCK_M, HALF,
        BLOCK_H, ACC)
    offs_d = tl.arange(0, HEAD_DIM)

    # keys of the view: 32-bit offsets from its first row (the launcher checks a view's span fits)
    k_view = k_ptr + tok0.to(tl.int64) * stride_k_t + kv_head * stride_k_h
    v_view = v_ptr + tok0.to(tl.int64) * stride_v_t + kv_head * stride_v_h
    full, kv_end = _key_stages(m, r0, end, BLOCK_M, BLOCK_N)
    tl.assume(kv_end > full)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=ACC)
    # the masked stage first: it always runs (a visible key in every row of its first block, so m_i is finite
    # after it), and the unmasked stage's zero-trip path then leaves the accumulator as the last wgmma wrote it
    # (zero-initialised accumulators on a zero-trip path serialize the wgmmas: C7515)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q1, q2, k_view, v_view, cos_ptr, sin_ptr, qk_scale, offs_r, m,
                                full, kv_end, stride_k_t, stride_v_t, stride_cos, stride_sin, offs_h, offs_d,
                                BLOCK_N, HALF, BLOCK_H, True, DOT_PRECISION, ACC)
    acc, l_i, m_i = _attn_inner(acc, l_i, m_i, q1, q2, k_view, v_view, cos_ptr, sin_ptr, qk_scale, offs_r, m,
                                0, full, stride_k_t, stride_v_t, stride_cos, stride_sin, offs_h, offs_d,
                                BLOCK_N, HALF, BLOCK_H, False, DOT_PRECISION, ACC)

    acc = acc / l_i[:, None]
    out_ptrs = out_ptr + q_tok[:, None] * stride_out_t + head * HEAD_DIM + offs_d[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None])
    if HAS_LSE:     # natural log, for the backward
        tl.store(lse_ptr + head.to(tl.int64) * stride_lse_h + q_tok, (m_i + tl.math.log2(l_i)) * _LN2, mask=r_ok)


@triton.jit
def _dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_view, v_view, cos_ptr, sin_ptr, qk_scale, offs_r, m, lo, hi,
              stride_k_t, stride_v_t, stride_cos, stride_sin, offs_h, offs_d,
              BLOCK_N: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, MASKED: tl.constexpr,
              DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dQ_rot (two halves) over key blocks lo .. hi: P recomputed from the LSE, dS = P (dP - delta)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        offs_c = start + offs_n
        k_ok = offs_c < hi
        k1, k2 = _load_halves(k_view, offs_c * stride_k_t, k_ok, offs_h, HALF, BLOCK_H)
        c, s = _rope_tables(cos_ptr, sin_ptr, offs_c, k_ok, offs_h, stride_cos, stride_sin, HALF, BLOCK_H, ACC)
        k1, k2 = _rope(k1, k2, c, s, ACC)
        k1 = k1.to(q1.dtype)
        k2 = k2.to(q2.dtype)
        qk = tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION)
        qk = tl.dot(q2, tl.trans(k2), qk, input_precision=DOT_PRECISION)
        s = qk * qk_scale
        if MASKED:
            see = (offs_c[None, :] <= tl.maximum(offs_r, m - 1)[:, None]) & k_ok[None, :]
            s = tl.where(see, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])                                           # softmax probabilities
        v = tl.load(v_view + (offs_c * stride_v_t)[:, None] + offs_d[None, :], mask=k_ok[:, None], other=0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)                   # [BLOCK_M, BLOCK_N]
        ds = (p * (dp - delta[:, None])).to(k1.dtype)                                 # d loss / d score
        dq1 = tl.dot(ds, k1, dq1, input_precision=DOT_PRECISION)
        dq2 = tl.dot(ds, k2, dq2, input_precision=DOT_PRECISION)
    return dq1, dq2


@triton.jit
def _prefix_attention_bwd_dq_kernel(
    q_ptr,          # [T, H, D] queries (before RoPE)
    k_ptr,          # [T, KV, D]
    v_ptr,          # [T, KV, D]
    cos_ptr,        # [L, D] fp32
    sin_ptr,        # [L, D]
    prog_ptr,       # int32 [P, PSEG_COLS] the forward's program table (blocks of BLOCK_M rows)
    do_ptr,         # [T, H * D] gradient of the output
    lse_ptr,        # [H, T] the forward's log-sum-exp
    delta_ptr,      # [H, T] rowsum(dO * O)
    dq_ptr,         # [T, H, D] gradient of q (out)
    qk_scale, scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_cos, stride_sin, stride_prog, stride_do_t, stride_lse_h, stride_dq_t, stride_dq_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # program = (view, block of rows) x query head, over the forward's key stages
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    kv_head = head // GROUP
    HALF: tl.constexpr = HEAD_DIM // 2
    tok0, m, r0, end, offs_r, r_ok, q_tok, offs_h, q1, q2 = _block_rotated_queries(
        prog, head, q_ptr, cos_ptr, sin_ptr, stride_q_t, stride_q_h, stride_cos, stride_sin, BLOCK_M, HALF,
        BLOCK_H, ACC)
    offs_d = tl.arange(0, HEAD_DIM)
    do = tl.load(do_ptr + q_tok[:, None] * stride_do_t + head * HEAD_DIM + offs_d[None, :],
                 mask=r_ok[:, None], other=0.0)
    # rows outside the block's part: lse = +inf gives P = 0
    lse2 = tl.load(lse_ptr + head.to(tl.int64) * stride_lse_h + q_tok, mask=r_ok, other=float("inf")) * _LOG2E
    delta = tl.load(delta_ptr + head.to(tl.int64) * stride_lse_h + q_tok, mask=r_ok, other=0.0)

    k_view = k_ptr + tok0.to(tl.int64) * stride_k_t + kv_head * stride_k_h
    v_view = v_ptr + tok0.to(tl.int64) * stride_v_t + kv_head * stride_v_h
    full, kv_end = _key_stages(m, r0, end, BLOCK_M, BLOCK_N)
    tl.assume(kv_end > full)

    dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_view, v_view, cos_ptr, sin_ptr, qk_scale, offs_r, m,
                         0, full, stride_k_t, stride_v_t, stride_cos, stride_sin, offs_h, offs_d,
                         BLOCK_N, HALF, BLOCK_H, False, DOT_PRECISION, ACC)
    dq1, dq2 = _dq_inner(dq1, dq2, q1, q2, do, lse2, delta, k_view, v_view, cos_ptr, sin_ptr, qk_scale, offs_r, m,
                         full, kv_end, stride_k_t, stride_v_t, stride_cos, stride_sin, offs_h, offs_d,
                         BLOCK_N, HALF, BLOCK_H, True, DOT_PRECISION, ACC)
    # the tables again rather than live across the key loop (registers)
    c, s = _rope_tables(cos_ptr, sin_ptr, offs_r, r_ok, offs_h, stride_cos, stride_sin, HALF, BLOCK_H, ACC)
    dq1, dq2 = _rope_bwd(dq1 * scale, dq2 * scale, c, s)
    _store_halves(dq_ptr + head * stride_dq_h, q_tok * stride_dq_t, r_ok, offs_h, dq1, dq2, HALF, BLOCK_H)


@triton.jit
def _prefix_rope_kernel(
    x_ptr,          # [T, heads, D] q (before RoPE)
    cos_ptr,        # [L, D] fp32
    sin_ptr,        # [L, D]
    prog_ptr,       # int32 [P, PSEG_COLS] program table (blocks of BLOCK_M rows)
    y_ptr,          # [T, heads, D] rope(x), x's dtype (out)
    stride_x_t, stride_x_h, stride_cos, stride_sin, stride_prog, stride_y_t, stride_y_h,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr,
):
    # program = (view, block of rows) x head; the forward's rotation (the same prologue, so the same values), for the
    # dK/dV kernel: rotating each query block there for each key block costs registers it does not have
    prog = prog_ptr + tl.program_id(0) * stride_prog
    head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    _, _, _, _, _, r_ok, tok, offs_h, x1, x2 = _block_rotated_queries(
        prog, head, x_ptr, cos_ptr, sin_ptr, stride_x_t, stride_x_h, stride_cos, stride_sin, BLOCK_M, HALF, BLOCK_H,
        ACC)
    _store_halves(y_ptr + head * stride_y_h, tok * stride_y_t, r_ok, offs_h, x1, x2, HALF, BLOCK_H)


@triton.jit
def _dkdv_inner(dk1, dk2, dv, k1, k2, v, q_head, do_head, lse_head, delta_head, qk_scale,
                offs_c, m, tok0, lo, hi, stride_q_t, stride_do_t, offs_h, offs_d,
                BLOCK_M: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, MASKED: tl.constexpr,
                DOT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """dK_rot (two halves) and dV of one key block over row blocks lo .. hi of one query head, transposed like
    the scores (s^T [keys, rows]): dV += P^T dO, dK_rot += dS^T Q_rot need no register transposes."""
    n_rows = 2 * m
    for r0 in range(lo, hi, BLOCK_M):
        offs_r = r0 + tl.arange(0, BLOCK_M)
        r_ok = offs_r < n_rows
        q_tok = (tok0 + offs_r).to(tl.int64)
        q1, q2 = _load_halves(q_head, q_tok * stride_q_t, r_ok, offs_h, HALF, BLOCK_H)    # rope(q) [BLOCK_M, BLOCK_H]
        do = tl.load(do_head + (q_tok * stride_do_t)[:, None] + offs_d[None, :], mask=r_ok[:, None], other=0.0)
        lse2 = tl.load(lse_head + q_tok, mask=r_ok, other=float("inf")) * _LOG2E       # past the view: P = 0
        delta = tl.load(delta_head + q_tok, mask=r_ok, other=0.0)
        qkT = tl.dot(k1, tl.trans(q1), input_precision=DOT_PRECISION)                  # [BLOCK_N, BLOCK_M]
        qkT = tl.dot(k2, tl.trans(q2), qkT, input_precision=DOT_PRECISION)
        sT = qkT * qk_scale
        if MASKED:
            sT = tl.where(offs_c[:, None] <= tl.maximum(offs_r, m - 1)[None, :], sT, float("-inf"))
        pT = tl.math.exp2(sT - lse2[None, :])
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)                  # [BLOCK_N, BLOCK_M]
        dsT = (pT * (dpT - delta[None, :])).to(q1.dtype)
        dk1 = tl.dot(dsT, q1, dk1, input_precision=DOT_PRECISION)
        dk2 = tl.dot(dsT, q2, dk2, input_precision=DOT_PRECISION)
    return dk1, dk2, dv


@triton.jit
def _prefix_attention_bwd_dkdv_kernel(
    q_ptr,          # [T, H, D] rope(q): _prefix_rope_kernel's output
    k_ptr,          # [T, KV, D] keys (before RoPE)
    v_ptr,          # [T, KV, D]
    cos_ptr,        # [L, D] fp32
    sin_ptr,        # [L, D]
    prog_ptr,       # int32 [P, PSEG_COLS] program table of key blocks (blocks of BLOCK_N rows)
    do_ptr,         # [T, H * D] gradient of the output
    lse_ptr,        # [H, T]
    delta_ptr,      # [H, T]
    dk_ptr,         # [T, KV, D] gradient of k (out)
    dv_ptr,         # [T, KV, D] gradient of v (out)
    qk_scale, scale,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_cos, stride_sin, stride_prog, stride_do_t, stride_lse_h, stride_dk_t, stride_dk_h,
    stride_dv_t, stride_dv_h,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC: tl.constexpr,
):
    # program = (view, key block) x kv head; sums over the kv head's GROUP query heads in a fixed order
    prog = prog_ptr + tl.program_id(0) * stride_prog
    kv_head = tl.program_id(1)
    HALF: tl.constexpr = HEAD_DIM // 2
    tok0, m, c0, end, offs_c, c_ok = _view_block(prog, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    k_tok = (tok0 + offs_c).to(tl.int64)
    k1, k2 = _load_halves(k_ptr + kv_head * stride_k_h, k_tok * stride_k_t, c_ok, offs_h, HALF, BLOCK_H)
    c, s = _rope_tables(cos_ptr, sin_ptr, offs_c, c_ok, offs_h, stride_cos, stride_sin, HALF, BLOCK_H, ACC)
    k1, k2 = _rope(k1, k2, c, s, ACC)
    k1 = k1.to(k_ptr.dtype.element_ty)
    k2 = k2.to(k_ptr.dtype.element_ty)
    v = tl.load(v_ptr + (k_tok * stride_v_t)[:, None] + kv_head * stride_v_h + offs_d[None, :],
                mask=c_ok[:, None], other=0.0)

    # rows that see the block: all 2m for a visual key block (no mask); for a query key block rows from c0 on,
    # the first BLOCK_N of them (rounded up to row blocks) masked, then rows past every key of the block
    MASKED_ROWS: tl.constexpr = (BLOCK_N + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    visual = end == m
    lo = tl.where(visual, 0, c0)
    mid = tl.where(visual, 0, tl.minimum(c0 + MASKED_ROWS, 2 * m))
    dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=ACC)
    for g in range(GROUP):
        head = kv_head * GROUP + g
        q_head = q_ptr + head * stride_q_h
        do_head = do_ptr + head * HEAD_DIM
        lse_head = lse_ptr + head.to(tl.int64) * stride_lse_h
        delta_head = delta_ptr + head.to(tl.int64) * stride_lse_h
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, q_head, do_head, lse_head, delta_head,
                                   qk_scale, offs_c, m, tok0, lo, mid, stride_q_t, stride_do_t, offs_h, offs_d,
                                   BLOCK_M, HALF, BLOCK_H, True, DOT_PRECISION, ACC)
        dk1, dk2, dv = _dkdv_inner(dk1, dk2, dv, k1, k2, v, q_head, do_head, lse_head, delta_head,
                                   qk_scale, offs_c, m, tok0, mid, 2 * m, stride_q_t, stride_do_t, offs_h, offs_d,
                                   BLOCK_M, HALF, BLOCK_H, False, DOT_PRECISION, ACC)
    c, s = _rope_tables(cos_ptr, sin_ptr, offs_c, c_ok, offs_h, stride_cos, stride_sin, HALF, BLOCK_H, ACC)
    dk1, dk2 = _rope_bwd(dk1 * scale, dk2 * scale, c, s)
    _store_halves(dk_ptr + kv_head * stride_dk_h, k_tok * stride_dk_t, c_ok, offs_h, dk1, dk2, HALF, BLOCK_H)
    tl.store(dv_ptr + (k_tok * stride_dv_t)[:, None] + kv_head * stride_dv_h + offs_d[None, :],
             dv.to(dv_ptr.dtype.element_ty), mask=c_ok[:, None])


# ---------------------------------------------------------------------------------------------- heuristic

_POW2 = ("BLOCK_M", "BLOCK_N", "num_warps", "BWD_BLOCK_M", "BWD_BLOCK_N", "bwd_num_warps", "KV_BLOCK_N", "KV_BLOCK_M",
         "kv_num_warps")


def _resolve(fn, head_dim, dtype, config):
    cfg = resolve_config(fn, prefix_attention_config(head_dim, dtype), config, pow2=_POW2)
    small = [k for k in _POW2 if "warps" not in k and cfg[k] < 16]
    if small:
        got = ", ".join(f"{k}={cfg[k]}" for k in small)
        raise ValueError(f"{fn}: config {got}, expected >= 16 (tensor-core tiles)")
    return cfg


# ----------------------------------------------------------------------------------------------- launcher

def _check_inputs(fn, q, k, v, segments, cos, sin, scale):
    """All launch checks; returns (T, H, KV, D, scale)."""
    check_tensor(fn, "q", q, ndim=3, dtypes=GRAD_DTYPES, unit_stride=True)
    T, H, D = q.shape
    if D not in (16, 32, 64, 128):
        raise ValueError(f"{fn}: q has head_dim {D}, expected a power of two in 16..128")
    like = dict(dtype=q.dtype, device=q.device)
    check_tensor(fn, "k", k, ndim=3, unit_stride=True, **like)
    KV = k.shape[1]
    check_tensor(fn, "k", k, shape=(T, None, D))
    check_tensor(fn, "v", v, shape=(T, KV, D), unit_stride=True, **like)
    if KV < 1 or H % KV:
        raise ValueError(f"{fn}: q has {H} heads and k {KV} kv heads, expected a multiple of the kv heads")
    if not isinstance(segments, PrefixSegments):
        raise TypeError(f"{fn}: segments is a {type(segments).__name__}, expected PrefixSegments "
                        f"(build_prefix_segments)")
    if segments.device != q.device:
        raise ValueError(f"{fn}: segments are for {segments.device}, expected q's {q.device} "
                         f"(build_prefix_segments(..., device) or segments.to(...))")
    if segments.end_token > T:
        raise ValueError(f"{fn}: segments reach token {segments.end_token}, expected at most q's {T} tokens")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(fn, name, t, ndim=2, dtype=torch.float32, device=q.device, unit_stride=True)
        if t.shape[0] < segments.max_len or t.shape[1] != D:
            raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected (>= {segments.max_len}, {D}) "
                             f"(rope_tables of the longest view's 2m positions)")
    if segments.max_len * max(q.stride(0), k.stride(0), v.stride(0)) >= 2**31:
        raise ValueError(f"{fn}: a view of {segments.max_len} tokens at row stride "
                         f"{max(q.stride(0), k.stride(0), v.stride(0))}, expected fewer than 2**31 elements per view")
    scale = check_scale(fn, scale, D)
    return T, H, KV, D, scale



def _forward(q, k, v, segments, cos, sin, scale, cfg, with_lse):
    """The forward launch; returns (out [T, H * D], lse [H, T] or None)."""
    T, H, D = q.shape
    alloc = torch.empty if segments.end_token == T else torch.zeros     # views cover [0, end_token)
    out = alloc(T, H * D, device=q.device, dtype=q.dtype)
    lse = torch.empty(H, T, device=q.device, dtype=acc_dtype(q.dtype)) if with_lse else None
    if segments.num_views == 0 or H == 0:
        return out, lse
    progs = segments.program_table(cfg["BLOCK_M"])
    _prefix_attention_kernel[(progs.shape[0], H)](
        q, k, v, cos, sin, progs, out, lse if with_lse else out,
        qk_scale=scale * LOG2E,
        stride_q_t=q.stride(0), stride_q_h=q.stride(1), stride_k_t=k.stride(0), stride_k_h=k.stride(1),
        stride_v_t=v.stride(0), stride_v_h=v.stride(1), stride_cos=cos.stride(0), stride_sin=sin.stride(0),
        stride_prog=progs.stride(0), stride_out_t=out.stride(0), stride_lse_h=T,
        GROUP=H // k.shape[1], HEAD_DIM=D, BLOCK_H=max(16, D // 2), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        HAS_LSE=with_lse, DOT_PRECISION=dot_precision(q.dtype), ACC=tl_acc_dtype(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse


def _backward(dout, q, k, v, cos, sin, out, lse, segments, scale, cfg):
    """(dq, dk, dv) for the gradient dout of out; see the module docstring."""
    T, H, D = q.shape
    KV = k.shape[1]
    alloc = torch.empty if segments.end_token == T else torch.zeros
    dq = alloc(T, H, D, device=q.device, dtype=q.dtype)
    dk = alloc(T, KV, D, device=q.device, dtype=q.dtype)
    dv = alloc(T, KV, D, device=q.device, dtype=q.dtype)
    if segments.num_views == 0 or H == 0:
        return dq, dk, dv
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    acc = acc_dtype(q.dtype)
    delta = torch.einsum("thd,thd->ht", dout.view(T, H, D).to(acc), out.view(T, H, D).to(acc)).contiguous()  # [H, T]
    common = dict(
        qk_scale=scale * LOG2E, scale=scale,
        stride_k_t=k.stride(0), stride_k_h=k.stride(1),
        stride_v_t=v.stride(0), stride_v_h=v.stride(1), stride_cos=cos.stride(0), stride_sin=sin.stride(0),
        GROUP=H // KV, HEAD_DIM=D, BLOCK_H=max(16, D // 2), DOT_PRECISION=dot_precision(q.dtype),
        ACC=tl_acc_dtype(q.dtype), num_stages=cfg["bwd_num_stages"],
    )
    progs = segments.program_table(cfg["BWD_BLOCK_M"])
    _prefix_attention_bwd_dq_kernel[(progs.shape[0], H)](
        q, k, v, cos, sin, progs, dout, lse, delta, dq,
        stride_q_t=q.stride(0), stride_q_h=q.stride(1), stride_prog=progs.stride(0), stride_do_t=dout.stride(0),
        stride_lse_h=T,
        stride_dq_t=dq.stride(0), stride_dq_h=dq.stride(1),
        BLOCK_M=cfg["BWD_BLOCK_M"], BLOCK_N=cfg["BWD_BLOCK_N"], num_warps=cfg["bwd_num_warps"], **common,
    )
    q_rot = torch.empty_like(q, memory_format=torch.contiguous_format)      # rope(q) for the dK/dV kernel
    progs = segments.program_table(ROPE_BLOCK_M)
    _prefix_rope_kernel[(progs.shape[0], H)](
        q, cos, sin, progs, q_rot,
        stride_x_t=q.stride(0), stride_x_h=q.stride(1), stride_cos=cos.stride(0), stride_sin=sin.stride(0),
        stride_prog=progs.stride(0), stride_y_t=q_rot.stride(0), stride_y_h=q_rot.stride(1),
        HEAD_DIM=D, BLOCK_H=max(16, D // 2), BLOCK_M=ROPE_BLOCK_M, ACC=tl_acc_dtype(q.dtype), num_warps=4,
    )
    progs = segments.program_table(cfg["KV_BLOCK_N"])
    _prefix_attention_bwd_dkdv_kernel[(progs.shape[0], KV)](
        q_rot, k, v, cos, sin, progs, dout, lse, delta, dk, dv,
        stride_q_t=q_rot.stride(0), stride_q_h=q_rot.stride(1), stride_prog=progs.stride(0),
        stride_do_t=dout.stride(0), stride_lse_h=T,
        stride_dk_t=dk.stride(0), stride_dk_h=dk.stride(1), stride_dv_t=dv.stride(0), stride_dv_h=dv.stride(1),
        BLOCK_M=cfg["KV_BLOCK_M"], BLOCK_N=cfg["KV_BLOCK_N"], num_warps=cfg["kv_num_warps"], **common,
    )
    return dq, dk, dv


class PrefixAttentionFunction(torch.autograd.Function):
    """`prefix_attention` with a backward (FlashAttention-2 style, deterministic, no N x N tensor).

    Saved: q, k, v (views of the linears' outputs), cos, sin, out and the log-sum-exp [H, T] (fp32; fp64 for
    fp64 inputs). Gradients for q, k, v (not the RoPE tables)."""

    @staticmethod
    def forward(ctx, q, k, v, segments, cos, sin, scale, cfg):
        out, lse = _forward(q, k, v, segments, cos, sin, scale, cfg, with_lse=True)
        ctx.save_for_backward(q, k, v, cos, sin, out, lse)
        ctx.segments, ctx.scale, ctx.cfg = segments, scale, cfg
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cos, sin, out, lse = ctx.saved_tensors
        dq, dk, dv = _backward(dout, q, k, v, cos, sin, out, lse, ctx.segments, ctx.scale, ctx.cfg)
        return dq, dk, dv, None, None, None, None, None


def prefix_attention(q, k, v, segments, cos, sin, *, scale=None, config=None):
    """DeepSeek-OCR 2's encoder attention over every view of `segments` in one launch; returns out [T, H * D].

    q: [T, H, D] queries, k, v: [T, KV, D] (before RoPE; views of the linears' outputs, last dim contiguous),
        fp32/fp16/bf16 (fp64 for gradient checks in Triton's interpreter); H a multiple of KV; D in 16..128.
    segments: PrefixSegments from build_prefix_segments, for q's device.
    cos, sin: fp32 [L >= max 2m, D], gundam.model.rope_tables (positions 0 .. L-1; their halves are equal,
        as transformers' default RoPE builds them: only cos[:, :D/2], sin[:, :D/2] are read).
    scale: logit scale, default D ** -0.5.
    config: overrides of tiling.prefix_attention_config (BLOCK_M, BLOCK_N, num_warps, num_stages, BWD_*, KV_*, ...).
    Tokens outside every view get zeros. Differentiable in q, k, v when autograd records
    (PrefixAttentionFunction).
    """
    fn = "prefix_attention"
    T, H, KV, D, scale = _check_inputs(fn, q, k, v, segments, cos, sin, scale)
    cfg = _resolve(fn, D, q.dtype, config)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return PrefixAttentionFunction.apply(q, k, v, segments, cos, sin, scale, cfg)
    return _forward(q, k, v, segments, cos, sin, scale, cfg, with_lse=False)[0]


def prefix_attention_lse(q, k, v, segments, cos, sin, *, scale=None, config=None):
    """(out, lse [H, T]): the training forward's outputs (natural-log log-sum-exp of the scaled scores)."""
    fn = "prefix_attention_lse"
    T, H, KV, D, scale = _check_inputs(fn, q, k, v, segments, cos, sin, scale)
    return _forward(q, k, v, segments, cos, sin, scale, _resolve(fn, D, q.dtype, config), with_lse=True)


# ---------------------------------------------------------------------------------------------- reference

def prefix_attention_reference(q, k, v, segments, cos, sin, *, scale=None, config=None, compute_dtype=torch.float64):
    """Pure-torch reference of `prefix_attention` (same arguments; config is ignored): per view, apply_rope,
    repeat the kv heads, the explicit prefix mask, softmax, in `compute_dtype`. Differentiable (the
    backward's reference). Returns out [T, H * D] in q's dtype."""
    from gundam.model import apply_rope, prefix_mask

    T, H, KV, D, scale = _check_inputs("prefix_attention_reference", q, k, v, segments, cos, sin, scale)
    out = torch.zeros(T, H * D, device=q.device, dtype=q.dtype)
    cd = compute_dtype
    for off, m in zip(segments.offsets, segments.view_lengths):
        n = 2 * m
        qs = q[off:off + n].to(cd).transpose(0, 1)                   # [H, n, D]
        ks = k[off:off + n].to(cd).transpose(0, 1)                   # [KV, n, D]
        vs = v[off:off + n].to(cd).transpose(0, 1)
        c, s = cos[:n].to(cd), sin[:n].to(cd)
        qs, ks = apply_rope(qs, c, s), apply_rope(ks, c, s)
        ks, vs = ks.repeat_interleave(H // KV, dim=0), vs.repeat_interleave(H // KV, dim=0)   # [H, n, D]
        logits = (qs @ ks.transpose(1, 2)) * scale                   # [H, n, n]
        logits = logits.masked_fill(~prefix_mask(m, q.device), float("-inf"))
        o = torch.softmax(logits, dim=-1) @ vs                       # [H, n, D]
        out[off:off + n] = o.transpose(0, 1).reshape(n, H * D).to(out.dtype)
    return out
