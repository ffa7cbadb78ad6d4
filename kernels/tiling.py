"""Block sizes: the heuristics that pick every kernel's tiles, warps and stages, and the padding work a tiling
costs (`mma_work`). Planning code: imports with torch alone (no Triton). Every launcher takes its defaults
from here; `config=` overrides them (launch.resolve_config).
"""
import math

import torch

from gundam.kernels.segments import default_blocking, default_tail, query_blocks


def next_power_of_2(n):
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << max(n - 1, 0).bit_length()


def round_up(x, m):
    return -(-x // m) * m


# ---------------------------------------------------------------------------------------------- attention

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
        issued += count * rows * round_up(gh, block_kh) * round_up(gw, block_kw)
        useful += count * n * n
    return issued, useful


def pick_key_tile(shapes, block_n):
    """(BLOCK_KH, BLOCK_KW) with BLOCK_KH * BLOCK_KW = block_n that wastes the fewest key slots.

    shapes: ((GH, GW), number of groups) pairs. Waste is weighted by the queries that see it; ties go to the
    squarest tile (fewest bias loads per block: BLOCK_KH + BLOCK_KW), then to the wider one.
    """
    best = None
    kw = 1
    while kw <= block_n:
        kh = block_n // kw
        slots = sum(cnt * gh * gw * round_up(gh, kh) * round_up(gw, kw) for (gh, gw), cnt in shapes)
        key = (slots, abs(math.log2(kw) - math.log2(kh)), -kw)
        if best is None or key < best[0]:
            best = (key, kh, kw)
        kw *= 2
    return best[1], best[2]


def fewest_slots(shapes, block_m, tail_m, sizes, block_kw=None):
    """(BLOCK_KH, BLOCK_KW) of the key tile, among tiles of `sizes` keys, that issues the fewest key slots
    (mma_work); ties to the larger tile. block_kw: a fixed tile width (then BLOCK_KH = max(1, size // width))."""
    best = None
    for n in sizes:
        if block_kw:
            kh, kw = max(1, n // block_kw), block_kw
        else:
            kh, kw = pick_key_tile(shapes, n) if shapes else (1, n)
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
    kh, kw = fewest_slots(shapes, block_m, tail_m, sizes)
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
    full_rows = None if segments.class_token or not shapes else next_power_of_2(segments.max_gw)
    kh, kw = fewest_slots(shapes, block_m, tail_m, sizes, full_rows)
    kv_kh, kv_kw = pick_key_tile(shapes, sizes[0]) if shapes else (1, sizes[0])
    return dict(BWD_BLOCK_M=block_m, BWD_TAIL_M=tail_m, BWD_BLOCK_KH=kh, BWD_BLOCK_KW=kw,
                bwd_num_warps=8 if segments.max_group_tokens >= 1024 else 4, KV_BLOCK_M=32, KV_BLOCK_KH=kv_kh,
                KV_BLOCK_KW=kv_kw, kv_num_warps=4, bwd_num_stages=2)


def relpos_block(rows):
    """BLOCK_R of a rel-pos kernel whose tile spans `rows` table rows (or per-token table columns): a power of
    two, at least tl.dot's 16."""
    return max(16, next_power_of_2(rows))


def relpos_warps(block_rh, block_rw):
    # the scattered store holds a 64-bit address per element: 8 warps for the 127-row tables of 64-wide views
    return 8 if max(block_rh, block_rw) >= 128 else 4


# ------------------------------------------------------------------------------------ the row-wise kernels

def layer_norm_config(C):
    # ~8 elements per thread: 16-byte vector loads for 16-bit dtypes and no register pressure.
    return dict(num_warps=min(max(next_power_of_2(C) // 256, 1), 8))


def rms_norm_config(C):
    # LayerNorm's reasoning (a whole row per program, ~8 elements per thread): 4 warps for Qwen2's C = 896
    return layer_norm_config(C)


def silu_mul_config(I):
    """BLOCK columns of one row per program on a 2-D grid (rows x column blocks), 8 elements per thread.

    A program's columns are one contiguous run of each row, whatever the row strides of gate and up (halves of
    a [T, 2I] GEMM output have stride 2I): 16-byte vector accesses for 16-bit dtypes when the row strides are
    multiples of 8 elements (I and 2I are for 4864), and no per-element division to find the row, which a 1-D
    grid over the elements of strided rows would need. Qwen2's I = 4864
    gives 5 programs per row, the last 3/4 full (95% of the lanes busy); a short row gets one block."""
    block = min(1024, max(16, next_power_of_2(I)))
    return dict(BLOCK=block, num_warps=max(1, min(4, block // 256)))


def project_layout_config(T_out):
    # N = 1280 gives only 10 column tiles and a batch has hundreds to a few thousand output rows, so small
    # row tiles keep the SMs busy; big batches take 128-row tiles for twice the reuse of each weight tile.
    # BLOCK_K = 64 keeps the 3-stage pipeline's smem at 48-96 KB (fits sm_80 and sm_90); 8 warps keep the
    # gathered-row pointers and the fp32 accumulator under ~210 registers (4 warps spill at 128 rows).
    return dict(BLOCK_M=128 if T_out >= 4096 else 64, BLOCK_N=128, BLOCK_K=64, num_warps=8)


def quick_gelu_config():
    # 4096 elements per program, 8 per thread: 16-byte vector accesses for 16-bit dtypes.
    return dict(BLOCK=4096, num_warps=16)


def prefix_attention_config(head_dim, dtype):
    """Block sizes of the three kernels (keys of `config=`), for bf16 / fp16 at head_dim 64:
    - forward: BLOCK_M = 64 query rows (one wgmma warpgroup on sm_90; a 144-row part ends in a 16-row block)
      x BLOCK_N = 64 keys, 4 warps, 3 stages;
    - dQ: BWD_BLOCK_M = 64 x BWD_BLOCK_N = 32 (64 keys spill on sm_80: dQ's two halves, dO and the tables stay
      live);
    - dK/dV: KV_BLOCK_N = 64 keys (the M of its wgmmas) x KV_BLOCK_M = 16 rows per step, over pre-rotated q
      (32 rows spill on sm_80: dK's halves, dV, K and V stay live across the loops).
    All compile for sm_80 and sm_90 without spills or ptxas warnings (compile_check). fp32 / fp64 and
    head_dim 128 halve the key blocks (registers)."""
    small = head_dim > 64 or dtype in (torch.float32, torch.float64)
    n = 32 if small else 64
    return dict(BLOCK_M=64, BLOCK_N=n, num_warps=4, num_stages=3,
                BWD_BLOCK_M=64, BWD_BLOCK_N=n // 2, bwd_num_warps=4,
                KV_BLOCK_N=n, KV_BLOCK_M=16, kv_num_warps=4, bwd_num_stages=2)
