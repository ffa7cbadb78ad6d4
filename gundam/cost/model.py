"""Analytic cost of encoding images: FLOPs, HBM bytes and memory per stage, and a roofline floor per GPU.

    r = estimate(2000, 3000, mode="gundam")           # CostReport
    r.stages["sam_global"].matmul_flops                # 2*M*N*K convention
    r.floor("h100")                                    # {stage: (Floor vendor, Floor fused)}
    r.to_dict("h100")                                  # all of it, JSON-ready

The text report, the sweep over sizes and its plot are in `gundam.cost.report`; the command is `gundam cost`.

The encoder is the mode's family's (`Mode.family`): DeepSeek-OCR's (an EncoderConfig) with stages `sam_global`,
`sam_crops`, `clip_global`, `clip_crops`, `projector_layout` (COST_STAGES), or DeepSeek-OCR 2's (an Ocr2Config, mode
`ocr2`) with `sam_global`, `sam_crops`, `qwen2_global`, `qwen2_crops`, `projector_layout` (OCR2_COST_STAGES). The
view layout (crop grid, crops, tokens) comes from `gundam.layout.image_layout`, so the model never sees crops that
preprocessing does not make (crop mode off, or the small-image rule: both sides <= 640 px, 768 for OCR 2).
What follows is stated for SAM and CLIP; SAM is the same in both families. The Qwen2 encoder is under
"DeepSeek-OCR 2" below.

FLOPs
- `matmul_flops`: what the vendor computes on tensor cores, counted 2*M*N*K: patch-embed and neck convs (no bias
  terms), every linear, attention q.k and p.v, the rel-pos einsums. In window blocks the vendor pads the normed
  grid to a multiple of the window before `qkv`, so `qkv`, `proj`, q.k, p.v and rel-pos run on the padded grid.
  `torch.utils.flop_counter` measures exactly this on the torch path.
- `matmul_flops_fused`: the fused path's count (`gundam.kernels`): `qkv`/`proj` on real tokens only; attention
  over the padded windows as the vendor (padded keys are real keys equal to the `qkv` bias; the kernel computes
  padded query rows and drops them); the rel-pos projection for real queries only, each against all 2S-1 rows
  of the table (the kernel's one dot per query block, scattered into per-key columns). Tile rounding is not
  counted.
- `train_matmul_flops` (`_fused`): a training step, forward + backward. The backward of a matmul computes the
  input's and the weight's gradients, 2x its forward; the patch embedding's input (the pixels) needs no
  gradient, so it adds 1x. The fused backward also recomputes the attention scores q.k (FlashAttention-style,
  no N x N tensor kept). `torch.utils.flop_counter` measures `train_matmul_flops` exactly on the torch path.
- `other_flops`, the vendor's non-matmul work, by this rule: every elementwise arithmetic op and every
  transcendental (exp, erf, sqrt) counts 1 per output element. So: linear/conv bias, residual add, position add,
  attention scale and bias add 1 each; rel_h + rel_w 1 per score; softmax 5 per score (max, subtract, exp, sum,
  divide); LayerNorm 7 per element (sum, subtract, square, sum, scale, weight, bias); GELU(erf) 5 per element
  (scale, erf, add, multiply, half); quick_gelu 5 per element (scale, exp, add, divide, multiply). Copies,
  padding and table interpolation count 0.

Bytes: two traffic models side by side. Both count compulsory HBM traffic at `dtype`: each pass reads its inputs
and writes its outputs once (re-reads inside a kernel are taken to hit cache), plus the weights it uses.
- vendor (`hbm_bytes_vendor`): the vendor's code, one kernel per torch op, one encoder pass per image and view
  kind (crops, then global): window pad + partition copies, qkv head-split copy, rel_h/rel_w einsums (with their
  layout copies), the materialised heads x N x N bias, SDPA reading it, head-merge copy, unpartition copies,
  LayerNorm2d as its eight separate elementwise passes, resized position tables recomputed per pass, the
  projector input concatenation and the layout concatenations.
- fused (`hbm_bytes_fused`): this project's Triton path (`gundam.kernels`): one pass over all views of all images,
  token-major packed buffers; linears and GELU each one pass over real tokens; each residual add fused into the
  LayerNorm that follows it (one pass reads both, writes the sum and the norm); the rel-pos projection writes fp32
  rel_h/rel_w rows (heads x tokens x S per axis) that attention reads back; attention reads q/k/v straight from the
  packed layout and writes only real rows (no partition copies, no N x N bias, no head split/merge copies); position
  and rel-pos tables cached; projector + layout one kernel writing the final rows. Weights are read once per call,
  charged to the global stages (every image has a global view); the crop stages add none.
Matmul bias adds are taken to be in the GEMM epilogue in both models.

Memory: `weight_bytes` = parameters the stage uses; `activation_bytes` (vendor) / `activation_bytes_fused` =
peak of (inputs + outputs of one pass + tensors held across it, e.g. the residual stream; a pass done in place,
like the fused path's GELU, counts its buffer once), for what runs at once: one image's views of that kind for
the vendor, all images' views for the fused path.

Training memory (`train_saved_bytes`, `_fused`): the bytes autograd keeps from a training step's forward to
its backward (parameters left out), per stage, for all of the batch's views: the torch path runs each view size
as one batch, the packed path all views in one pass. Each op keeps what its backward reads: a linear or conv
its input, LayerNorm its input (torch: plus fp32 mean and rstd per token; the Triton kernel: the input alone,
the residual sum when fused), GELU its input, quick_gelu its input and sigmoid, LayerNorm2d (the vendor's
explicit formula) x - mean twice, the normalised x and the std. Attention: the torch path (the vendor's
computation, SDPA's math backend as on CPU) keeps per head and group the N x N softmax weights, copies of q for
the rel-pos einsums and q, k, v; the Triton kernel keeps qkv, its output, an fp32 log-sum-exp per (head, token)
and the packed rel tables, nothing N x N. On CUDA, the memory-efficient SDPA backend keeps the N x N bias and
its output instead of the softmax weights and the scaled copies: within one [tokens, C] tensor per block of
this count. With activation checkpointing (`train_activation_bytes(checkpointing=True)`): what is kept outside
the blocks, each block's inputs (torch: the residual stream; packed: the stream and the last MLP output, its
residual add fused into the next LayerNorm) and the largest block's saved bytes, recomputed one block at a time
in the backward (`train_kept_bytes` + `train_block_bytes`; an upper bound by the block's input, kept once).
`tests/test_cost.py` measures all three with saved-tensor hooks on CPU: equal to the byte.

DeepSeek-OCR 2: per view, SAM (as above), then Qwen2 over n = 2m tokens (m visual tokens, then m learned queries)
under the prefix mask (visual -> visual; query i -> every visual token and queries 0..i), then the projector on the
queries' outputs.
- FLOPs: the q/k/v and o projections, SwiGLU's gate, up and down, q.k and p.v over all n x n pairs of every query
  head (SDPA computes the masked scores too); `torch.utils.flop_counter` measures exactly this, forward and
  training. Fused: the same linears, except that the last layer's o_proj and MLP run on the query rows only;
  q.k and p.v only over the pairs the mask keeps, 2m^2 + m(m+1)/2 of the n^2 (the kernel skips masked tiles; tile
  rounding not counted), and so does the backward's recomputed q.k. Other FLOPs: RMSNorm 4 per element (square,
  sum, scale, weight) + 3 per token (divide, eps, rsqrt), RoPE 3.5 per element of q and k (negate half, two
  multiplies, add), 7 per score (scale, mask add, softmax), SiLU 4 (negate, exp, add, divide) and the gate
  multiply 1 per hidden element, bias and residual adds 1. The mask and the RoPE tables count 0.
- vendor bytes: transformers 4.46.3's Qwen2 (the vendor's pin), one forward per image and view kind: the cat of
  SAM's tokens and the query table; per forward the [B, 1, n, n] additive mask in the activation dtype (a fill,
  the kept entries zeroed, torch.stack of the views' masks) and the fp32 RoPE tables; per layer RMSNorm as its
  separate passes (to fp32, pow, mean, + eps, rsqrt, multiply, cast back, weight), q_proj, k_proj, v_proj, RoPE as
  five passes per tensor (negate, cat, two multiplies, add), repeat_kv copies of K and V to every query head,
  q's contiguous copy (transformers makes it on CUDA when a mask is given), SDPA reading q, k, v and the mask,
  the head-merge copy, o_proj, the residual adds, SwiGLU as gate, SiLU, up, multiply, down; the final norm over
  every row. Peak: the residual stream, the mask, and the DynamicCache (use_cache is on), which keeps each
  layer's K and V until the forward ends. Projector: the linear per view kind, then cat(crops, global,
  separator) per image.
- fused bytes, an estimate of the Triton path (`gundam.packed`): one pass over every view (a varlen batch of
  2m-token sequences); the sequence written once from SAM's output and the query table; per layer the residual
  add fused into each RMSNorm (reads both, writes the sum and the norm), q_proj, k_proj and v_proj as three GEMMs
  (the host's three weights, no concatenated copy), attention reading them once (GQA: each K/V head serves its
  query heads), RoPE inside it from the fp32 tables' first halves, no mask in memory, writing token-major rows;
  o_proj; gate_proj and up_proj as two GEMMs, then silu(gate) * up in one pass; down. The last layer goes on
  with the query rows alone after attention (gathered: attention's output and the residual stream), so o_proj,
  the MLP and the final norm (the last residual fused into it) run on half the rows. Weights once per call,
  charged to `qwen2_global`; projector + layout one kernel writing the final rows.
- training memory: the torch path (measured: `tests/test_cost.py`) runs views in chunks of CHUNK_TOKENS, each
  with its cos/sin (kept by the first layer's RoPE) and its bool mask (a checkpoint's input). Per layer each
  RMSNorm keeps its fp32 input (the input itself in fp32), rstd, the normalised x and its output (the next
  linears' input); SDPA (CPU's flash kernel; CUDA's memory-efficient one keeps the same) the rotated q, the
  repeated k and v, its output, the fp32 log-sum-exp and the mask as a float [n, n]; SwiGLU the gate and up
  outputs, SiLU's output and their product; the final norm its fp32 input, rstd and the normalised x. The packed
  path (measured too): each fused RMSNorm its input and output, attention the unrotated q, k, v, its output and
  the log-sum-exp (the first layer also the fp32 RoPE tables), SwiGLU gate, up and their product; the last layer
  after attention its query rows only (the gathered attention output and their int64 indices, the norm,
  SwiGLU), and the final norm its input's query rows; nothing n x n.

Roofline: a stage's floor time = max(matmul FLOPs / peak dense tensor FLOP/s, bytes / HBM bandwidth), bound by
whichever is larger; `other_flops` are left out (they ride along the memory-bound passes). Stages run one after
another, so the total floor is the sum of the stages' floors.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import torch

from gundam.config import EncoderConfig, Mode, Ocr2Config, check_image_size, check_int, default_config, family_of
from gundam.layout import ImageLayout, has_newlines, image_layout
from gundam.model import CHUNK_TOKENS
from gundam.weights import resolve_dtype

COST_STAGES = ("sam_global", "sam_crops", "clip_global", "clip_crops", "projector_layout")          # DeepSeek-OCR
OCR2_COST_STAGES = ("sam_global", "sam_crops", "qwen2_global", "qwen2_crops", "projector_layout")  # DeepSeek-OCR 2
# the dtypes the roofline has peaks for (GPU.peak), by the short name reports print
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class GPU:
    name: str
    tensor_flops: float     # dense tensor-core FLOP/s at bf16/fp16
    tf32_flops: float       # dense tensor-core FLOP/s at tf32 (used for fp32)
    hbm_bandwidth: float    # bytes/s

    def peak(self, dtype: str) -> float:
        """Dense tensor-core FLOP/s for matmuls in `dtype` (a DTYPE_NAMES name): fp32 ones run as tf32."""
        return self.tf32_flops if dtype == "fp32" else self.tensor_flops


# Dense (no sparsity) peaks; the datasheets print the 2:4-sparse figure, twice these.
GPUS = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 80GB: bf16 1,979 TFLOPS sparse (989 dense), TF32 989 sparse
    # (494 dense), HBM3 3.35 TB/s.
    "h100": GPU("H100 SXM5 80GB", 989e12, 494e12, 3.35e12),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM 141GB: same compute as H100 SXM, HBM3e 4.8 TB/s.
    "h200": GPU("H200 SXM 141GB", 989e12, 494e12, 4.8e12),
    # NVIDIA A100 Tensor Core GPU datasheet, SXM4 80GB: bf16 312 TFLOPS dense, TF32 156 dense, HBM2e 2,039 GB/s.
    "a100": GPU("A100 SXM4 80GB", 312e12, 156e12, 2.039e12),
}


@dataclass
class StageCost:
    matmul_flops: int = 0            # vendor's tensor-core work (padded windows included)
    matmul_flops_fused: int = 0      # the fused path's (no padded rows)
    other_flops: int = 0             # softmax, norms, activations, adds: see the module docstring
    hbm_bytes_vendor: int = 0
    hbm_bytes_fused: int = 0
    weight_bytes: int = 0
    activation_bytes: int = 0        # peak, vendor
    activation_bytes_fused: int = 0  # peak, fused
    train_matmul_flops: int = 0        # forward + backward, the vendor's (= the torch path's) computation
    train_matmul_flops_fused: int = 0  # forward + backward of the fused path (attention scores recomputed)
    # training memory (see "Training memory" above): bytes autograd keeps from the forward to the backward;
    # with checkpointing, what stays kept plus the largest block's activations, recomputed one block at a time
    train_saved_bytes: int = 0         # torch path
    train_saved_bytes_fused: int = 0   # packed Triton path
    train_kept_bytes: int = 0          # torch path, checkpointing: block inputs + what runs outside the blocks
    train_kept_bytes_fused: int = 0
    train_block_bytes: int = 0         # torch path: the largest block's saved bytes (a maximum, not a sum)
    train_block_bytes_fused: int = 0

    def train_activation_bytes(self, fused: bool = False, checkpointing: bool = False) -> int:
        """Activation memory of a training step: saved bytes, or with checkpointing kept + one block's."""
        sfx = "_fused" if fused else ""
        if checkpointing:
            return getattr(self, "train_kept_bytes" + sfx) + getattr(self, "train_block_bytes" + sfx)
        return getattr(self, "train_saved_bytes" + sfx)

    def __add__(self, other: "StageCost") -> "StageCost":
        out = StageCost(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))
        # blocks are recomputed one at a time: the largest one counts
        out.train_block_bytes = max(self.train_block_bytes, other.train_block_bytes)
        out.train_block_bytes_fused = max(self.train_block_bytes_fused, other.train_block_bytes_fused)
        return out


@dataclass(frozen=True)
class Floor:
    """Roofline floor of one stage under one traffic model."""
    flops: int
    bytes: int
    seconds: float
    bound: str           # "compute", "memory" or "-" (empty stage)

    @property
    def intensity(self) -> float:  # FLOP per byte
        return self.flops / self.bytes if self.bytes else 0.0


@dataclass
class CostReport:
    width: int
    height: int
    mode: Mode
    layout: ImageLayout
    batch: int
    dtype: str           # "bf16", "fp16" or "fp32" (DTYPE_NAMES)
    stages: dict[str, StageCost]
    total: StageCost
    config: EncoderConfig | Ocr2Config = field(repr=False)

    def floor(self, gpu: str | GPU = "h100") -> dict[str, tuple[Floor, Floor]]:
        """{stage (and "total"): (vendor floor, fused floor)} on `gpu`."""
        gpu = get_gpu(gpu)
        peak = gpu.peak(self.dtype)
        out = {}
        for name, s in self.stages.items():
            out[name] = (_floor(s.matmul_flops, s.hbm_bytes_vendor, peak, gpu.hbm_bandwidth),
                         _floor(s.matmul_flops_fused, s.hbm_bytes_fused, peak, gpu.hbm_bandwidth))
        # stages run one after another, each at its own bound: the total floor is the sum of theirs
        out["total"] = tuple(_sum_floors([f[k] for f in out.values()]) for k in (0, 1))
        return out

    @property
    def views(self) -> list[tuple[str, int, int]]:
        """(kind, side px, views per image) that go through the encoder, as preprocessing makes them."""
        v = [("global", self.mode.base_size, 1)]
        return v + ([("crops", self.mode.image_size, self.layout.n_crops)] if self.layout.n_crops else [])

    def to_dict(self, gpu: str | GPU = "h100") -> dict:
        g = get_gpu(gpu)
        floors = self.floor(g)
        return {
            "width": self.width, "height": self.height, "mode": dataclasses.asdict(self.mode),
            "grid": list(self.layout.grid), "n_crops": self.layout.n_crops, "tokens": self.layout.tokens,
            "global_tokens": self.layout.global_tokens, "local_tokens": self.layout.local_tokens,
            "batch": self.batch, "dtype": self.dtype,
            "stages": {k: dataclasses.asdict(v) for k, v in self.stages.items()},
            "total": dataclasses.asdict(self.total),
            "roofline": {"gpu": dataclasses.asdict(g), "stages": {
                k: {"vendor": _floor_dict(v), "fused": _floor_dict(f)} for k, (v, f) in floors.items()}},
        }


def _floor(flops, nbytes, peak, bw) -> Floor:
    tc, tm = flops / peak, nbytes / bw
    bound = "-" if not (flops or nbytes) else ("compute" if tc >= tm else "memory")
    return Floor(flops, nbytes, max(tc, tm), bound)


def _sum_floors(floors: list[Floor]) -> Floor:
    busy = [f for f in floors if f.bound != "-"]
    t = {b: sum(f.seconds for f in busy if f.bound == b) for b in ("compute", "memory")}
    bound = "-" if not busy else max(t, key=t.get)  # the bound that holds most of the time
    return Floor(sum(f.flops for f in floors), sum(f.bytes for f in floors), sum(t.values()), bound)


def _floor_dict(f: Floor) -> dict:
    return {"flops": f.flops, "bytes": f.bytes, "intensity": f.intensity, "seconds": f.seconds, "bound": f.bound}


def get_gpu(gpu: str | GPU) -> GPU:
    if isinstance(gpu, GPU):
        return gpu
    if gpu not in GPUS:
        raise ValueError(f"gpu {gpu!r}: expected one of {', '.join(GPUS)}")
    return GPUS[gpu]


def _cost_dtype(dtype) -> torch.dtype:
    """bf16, fp16 or fp32 by any name gundam.weights.DTYPES knows, or the torch dtype; "auto" is what a GPU
    runs (bf16)."""
    dt = resolve_dtype(dtype, device="cuda")
    if dt not in DTYPE_NAMES:
        raise ValueError(f"dtype={dtype!r}: the cost model has GPU peaks for {', '.join(DTYPE_NAMES.values())} only")
    return dt


# ----------------------------------------------------------------------------------------------------------
# counting helpers

class _Passes:
    """Bytes of a sequence of passes and the peak of any one pass's (inputs + outputs + held) bytes.
    With `weights=False` the passes' weight reads are left out (the fused path counts them once per call)."""

    def __init__(self, weights=True):
        self.weights = weights
        self.bytes = 0
        self.peak = 0
        self.saved = _Saved()

    def add(self, read, write, weights=0, held=0, inplace=False):
        self.bytes += read + write + (weights if self.weights else 0)
        self.peak = max(self.peak, (max(read, write) if inplace else read + write) + held)


@dataclass
class _Saved:
    """Bytes autograd saves for the backward in a training step: in the blocks (SAM blocks, CLIP layers) and
    outside them; what checkpointing keeps of a block instead (its inputs); the largest block."""
    outside: int = 0
    blocks: int = 0
    inputs: int = 0
    largest: int = 0

    def block(self, saved, inputs):
        self.blocks += saved
        self.inputs += inputs
        self.largest = max(self.largest, saved)

    def fields(self, sfx) -> dict:
        return {f"train_saved_bytes{sfx}": self.outside + self.blocks, f"train_kept_bytes{sfx}": self.outside + self.inputs,
                f"train_block_bytes{sfx}": self.largest}


@dataclass
class _Count:
    mm: int = 0
    mm_fused: int = 0
    other: int = 0
    no_dx: int = 0          # matmuls whose input needs no gradient (the patch embedding of the pixels)
    recompute: int = 0      # what the fused backward recomputes (FlashAttention-style: the q.k scores)

    def matmul(self, flops, fused=None, no_dx=False):
        self.mm += flops
        self.mm_fused += flops if fused is None else fused
        self.no_dx += flops if no_dx else 0

    def train(self) -> dict:
        """Backward = 2x forward (the input's and the weight's gradient) for every matmul, 1x where the input
        needs no gradient."""
        return dict(train_matmul_flops=3 * self.mm - self.no_dx,
                    train_matmul_flops_fused=3 * self.mm_fused - self.no_dx + self.recompute)


def _stage(count: _Count, vendor: _Passes, fused: _Passes, weights: int, passes: int, saved: _Saved) -> StageCost:
    """saved: the torch path's training bytes (all images' views in one pass, as GundamEncoder runs it)."""
    return StageCost(count.mm, count.mm_fused, count.other, vendor.bytes * passes, fused.bytes, weights,
                     vendor.peak, fused.peak, **count.train(), **saved.fields(""), **fused.saved.fields("_fused"))


def _pos_resize_bytes(src: int, dst: int, C: int, e: int) -> int:
    """Vendor position-table resize per pass: cast to fp32, bicubic, cast back ([src^2, C] -> [dst^2, C])."""
    if src == dst:
        return 0
    return src * src * C * (e + 4) + src * src * C * 4 + dst * dst * C * 4 + dst * dst * C * (4 + e)


# ----------------------------------------------------------------------------------------------------------
# SAM ViT-B

def sam_weight_elems(cfg: EncoderConfig) -> int:
    s = cfg.sam
    C, hd, F = s.embed_dim, s.head_dim, s.mlp_dim
    n = 3 * s.patch_size ** 2 * C + C + s.grid ** 2 * C
    for i in range(s.depth):
        rel = s.grid if i in s.global_attn_indexes else s.window_size
        n += 4 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * (2 * rel - 1) * hd + (F * C + F) + (C * F + C)
    o, o2, o3 = s.out_chans, s.net_2_chans, s.net_3_chans
    return n + C * o + 2 * o + o * o * 9 + 2 * o + o * o2 * 9 + o2 * o3 * 9


def _sam(cfg: EncoderConfig, size: int, B: int, e: int, window_tables: bool = True):
    """B views of `size` px through SAM, as one pass: (_Count, vendor _Passes, fused _Passes without weights,
    fused weight bytes). window_tables: count the fused path's window rel tables (one serves every view size,
    so only one stage of a call counts them)."""
    s = cfg.sam
    C, nh, hd, F, ws = s.embed_dim, s.num_heads, s.head_dim, s.mlp_dim, s.window_size
    g, q = size // s.patch_size, cfg.tokens_per_side(size)  # patch grid, output grid
    T = B * g * g
    n = _Count()
    v, f = _Passes(), _Passes(weights=False)
    wb = 0  # weight bytes read by one pass

    # patch embed conv + position add
    w = (3 * s.patch_size ** 2 * C + C) * e
    n.matmul(2 * T * C * 3 * s.patch_size ** 2, no_dx=True)
    n.other += 2 * T * C
    for p in (v, f):
        p.add(B * 3 * size * size * e, T * C * e, w)
        p.saved.outside += B * 3 * size * size * e                  # the pixels, for the conv's weight gradient
    v.bytes += _pos_resize_bytes(s.grid, g, C, e)
    for p in (v, f):
        p.add((T + g * g) * C * e, T * C * e)
    wb += w  # the position table is read above, resized (vendor) or from the cache (fused)

    for i in range(s.depth):
        glob = i in s.global_attn_indexes
        S = g if glob else ws                     # rel-pos / attention side
        Gp = g if glob else math.ceil(g / ws) * ws
        Tp = B * Gp * Gp                          # tokens through qkv/proj in the vendor
        groups = B if glob else B * (Gp // ws) ** 2
        N = S * S                                 # tokens per attention group
        scores = groups * nh * N * N
        w_qkv, w_proj = (3 * C * C + 3 * C) * e, (C * C + C) * e
        w_ln, w_rel = 2 * C * e, 2 * (2 * S - 1) * hd * e
        w_mlp1, w_mlp2 = (F * C + F) * e, (C * F + C) * e
        wb += 2 * w_ln + w_qkv + w_proj + w_rel + w_mlp1 + w_mlp2
        held = T * C * e  # the residual stream

        # FLOPs
        n.matmul(2 * Tp * C * 3 * C, 2 * T * C * 3 * C)                    # qkv
        n.matmul(2 * scores * hd * 2)                                      # q.k and p.v, padded groups
        n.recompute += 2 * scores * hd                                     # q.k again in the fused backward
        # rel_h, rel_w: the vendor's einsum for every (padded) query against S table rows; the fused path
        # projects real queries only, against all 2S-1 rows of the table
        n.matmul(2 * (groups * nh * N) * 2 * S * hd, 2 * (T * nh) * 2 * (2 * S - 1) * hd)
        n.matmul(2 * Tp * C * C, 2 * T * C * C)                            # proj
        n.matmul(2 * T * C * F * 2)                                        # lin1, lin2
        n.other += 7 * T * C + 3 * Tp * C + 8 * scores + Tp * C + T * C   # ln1, qkv bias, scores, proj bias, add
        n.other += 7 * T * C + F * T + 5 * F * T + T * C + T * C           # ln2, lin1 bias, gelu, lin2 bias, add

        # vendor passes
        X, Xp = T * C * e, Tp * C * e
        rel = groups * nh * N * S * e  # rel_h (and rel_w) [groups*nh, N, S]
        v.add(X, X, w_ln, held)                                      # norm1
        if not glob:
            if Gp != g:
                v.add(X, Xp, 0, held)                                # F.pad
            v.add(Xp, Xp, 0, held)                                   # partition permute copy
        v.add(Xp, 3 * Xp, w_qkv, held)                               # qkv
        v.add(3 * Xp, 3 * Xp, 0, held)                               # head-split copy
        v.add(2 * S * S * hd * e, 2 * S * S * hd * e, w_rel)         # gather Rh, Rw tables
        for _ in range(2):                                           # rel_h, rel_w einsums
            v.add(Xp, Xp, 0, held + 3 * Xp)                          #   q permuted to the bmm layout
            v.add(Xp + S * S * hd * e, rel, 0, held + 3 * Xp)        #   bmm
            v.add(rel, rel, 0, held + 3 * Xp)                        #   reshape copy of the permuted result
        v.add(2 * rel, scores * e, 0, held + 3 * Xp)                 # bias = rel_h + rel_w
        v.add(3 * Xp + scores * e, Xp, 0, held)                      # SDPA with the bias
        v.add(Xp, Xp, 0, held)                                       # head-merge copy
        v.add(Xp, Xp, w_proj, held)                                  # proj
        if not glob:
            v.add(Xp, Xp, 0, held)                                   # unpartition permute copy
            if Gp != g:
                v.add(X, X, 0, held)                                 # crop + contiguous
        v.add(2 * X, X)                                              # residual
        v.add(X, X, w_ln, held)                                      # norm2
        v.add(X, F * X // C, w_mlp1, held)                           # lin1
        v.add(F * X // C, F * X // C, 0, held)                       # gelu
        v.add(F * X // C, X, w_mlp2, held)                           # lin2
        v.add(2 * X, X)                                              # residual

        # fused passes (weights counted once, below); a residual add is fused into the LayerNorm after it
        tables = 2 * nh * T * S * 4                                  # fp32 rel_h, rel_w rows of real queries
        if i == 0:
            f.add(X, X, 0, held)                                     # norm1
        else:
            f.add(2 * X, 2 * X)                                      # residual (previous block) + norm1
        f.add(X, 3 * X, 0, held)                                     # qkv
        f.add(X + 2 * (2 * S - 1) * hd * e, tables, 0, held + 3 * X)  # rel-pos projection
        f.add(3 * X + tables, X, 0, held)                            # attention: no N x N bias, no copies
        f.add(X, X, 0, held)                                         # proj
        f.add(2 * X, 2 * X)                                          # residual + norm2
        f.add(X, F * X // C, 0, held)                                # lin1
        f.add(F * X // C, F * X // C, 0, held, inplace=True)         # gelu, in place
        f.add(F * X // C, X, 0, held)                                # lin2
        if i == s.depth - 1:
            f.add(2 * X, X)                                          # last residual

        # training: what autograd keeps. LayerNorm: its input and fp32 mean and rstd (torch) or its input alone
        # (the kernel); a linear: its input; GELU: its input. Torch attention, per chunk of windows / views
        # (CHUNK_TOKENS): the gather index (int64) and the einsum's copy of each rel table, the einsums' copies
        # of q, then q, k, v and the N x N softmax weights in SDPA; the head-merge copy into proj. The kernel:
        # qkv, its output, the fp32 log-sum-exp per (head, token) and the packed rel tables (nothing N x N).
        # SDPA (math backend, as on CPU) keeps scaled copies of q and k and v; v is a view of the whole qkv
        # output in a chunk of one group. (CUDA's memory-efficient backend keeps q, k, v as views, the bias,
        # its output and log-sum-exp instead: within about Xp per block of this.)
        stats = 2 * T * 4
        hidden = 2 * F * X // C                                      # GELU's input, lin2's input
        per = max(1, CHUNK_TOKENS // N)                              # groups per chunk
        chunks = -(-groups // per)
        single = groups if per == 1 else int(groups % per == 1)     # chunks of one group
        tables = chunks * 2 * (8 * S * S + S * S * hd * e)
        sdpa = 3 * Xp + 2 * single * (Xp // groups) + scores * e
        v.saved.block((X + stats) + Xp + tables + 2 * Xp + sdpa + Xp + (X + stats) + X + hidden, inputs=X)
        rel = 2 * (2 * S - 1) * hd * e if glob or window_tables else 0
        f.saved.block(2 * X + 3 * X + X + 4 * nh * T + rel + 2 * X + hidden,
                      inputs=X if i == 0 else 2 * X)                 # the packed blocks take (x, mlp_out)

    # neck: conv1x1, LayerNorm2d, conv3x3, LayerNorm2d; net_2, net_3 (3x3, stride 2, pad 1: each halves the
    # grid exactly, since views are multiples of the encoder's downsampling)
    o, o2, o3 = s.out_chans, s.net_2_chans, s.net_3_chans
    g2 = g // 2
    X, Y = T * C * e, T * o * e
    n.matmul(2 * T * o * C + 2 * T * o * o * 9)
    n.matmul(2 * B * g2 * g2 * o2 * o * 9 + 2 * B * q * q * o3 * o2 * 9)
    n.other += 2 * 7 * T * o
    w1, w2, w3, w4, wn = C * o * e, o * o * 9 * e, o * o2 * 9 * e, o2 * o3 * 9 * e, 2 * o * e
    wb += w1 + w2 + w3 + w4 + 2 * wn
    for p in (v, f):
        p.add(X, Y, w1)
    # LayerNorm2d (x2): vendor reads x-sized tensors 8 times (mean, sub, pow, mean, sub, div, mul, add) and
    # writes 6; fused: one read, one write
    v.bytes += 2 * (8 * Y + 6 * Y + wn)
    f.bytes += 2 * (2 * Y)
    v.peak, f.peak = max(v.peak, 3 * Y), max(f.peak, 2 * Y)
    for p in (v, f):
        p.add(Y, Y, w2)
        p.add(Y, B * g2 * g2 * o2 * e, w3)
        p.add(B * g2 * g2 * o2 * e, B * q * q * o3 * e, w4)
        # training: the convs' inputs; each LayerNorm2d keeps x - u twice (computed twice), the normalised x
        # and the std
        p.saved.outside += X + 2 * (3 * Y + T * e) + Y + Y + B * g2 * g2 * o2 * e
    return n, v, f, wb


# ----------------------------------------------------------------------------------------------------------
# CLIP-L

def clip_weight_elems(cfg: EncoderConfig) -> int:
    c = cfg.clip
    C, F = c.hidden_size, c.ffn_hidden_size
    layer = 4 * C + (3 * C * C + 3 * C) + (C * C + C) + (F * C + F) + (C * F + C)
    return C + (c.grid ** 2 + 1) * C + 2 * C + c.num_layers * layer


def _clip(cfg: EncoderConfig, size: int, B: int, e: int, window_tables: bool = True):
    """B views of `size` px through CLIP-L, as one pass (same signature and return as `_sam`; CLIP has no
    window tables, so `window_tables` changes nothing)."""
    c = cfg.clip
    C, nh, hd, F = c.hidden_size, c.num_attention_heads, c.head_dim, c.ffn_hidden_size
    q = cfg.tokens_per_side(size)
    N = 1 + q * q
    T = B * N
    n = _Count()
    v, f = _Passes(), _Passes(weights=False)
    X = T * C * e
    pos = (c.grid ** 2 + 1) * C * e
    # embeddings: cat(class, SAM tokens) + position (resized when the grid differs), pre-LN
    n.other += T * C + 7 * T * C
    v.bytes += pos + pos + _pos_resize_bytes(c.grid, q, C, e)   # embedding lookup of position_ids + resize
    for p in (v, f):
        p.add(B * q * q * C * e, X)
        p.add(X + N * C * e, X)
        p.add(X, X, 2 * C * e)
    # training, pre_layrnorm: its input, and torch's fp32 mean and rstd
    stats = 2 * T * 4
    v.saved.outside += X + stats
    f.saved.outside += X
    wb = C * e + 2 * C * e  # class embedding, pre-LN (the position table is read above)
    for layer in range(c.num_layers):
        w_qkv, w_out = (3 * C * C + 3 * C) * e, (C * C + C) * e
        w_fc1, w_fc2, w_ln = (F * C + F) * e, (C * F + C) * e, 2 * C * e
        wb += w_qkv + w_out + w_fc1 + w_fc2 + 2 * w_ln
        scores = B * nh * N * N
        n.matmul(2 * T * C * 3 * C + 2 * scores * hd * 2 + 2 * T * C * C + 2 * T * C * F * 2)
        n.recompute += 2 * scores * hd                                  # q.k again in the fused backward
        n.other += 7 * T * C + 3 * T * C + 6 * scores + T * C + T * C   # ln1, qkv bias, scale+softmax, bias, add
        n.other += 7 * T * C + F * T + 5 * F * T + T * C + T * C        # ln2, fc1 bias, quick_gelu, bias, add
        H = F * X // C
        for p in (v, f):
            if p is v or layer == 0:
                p.add(X, X, w_ln, X)                           # layer_norm1
            else:
                p.add(2 * X, 2 * X)                            # fused: residual (previous layer) + layer_norm1
            p.add(X, 3 * X, w_qkv, X)                          # qkv_proj
            p.add(3 * X, X, 0, X)                              # SDPA (flash: no scores in memory)
            if p is v:
                p.add(X, X, 0, X)                              # head-merge copy (the fused kernel writes rows)
            p.add(X, X, w_out, X)                              # out_proj
            if p is v:
                p.add(2 * X, X)                                # residual
                p.add(X, X, w_ln, X)                           # layer_norm2
            else:
                p.add(2 * X, 2 * X)                            # residual + layer_norm2
            p.add(X, H, w_fc1, X)                              # fc1
            p.add(H, H, 0, X)                                  # quick_gelu (one scripted pass)
            p.add(H, X, w_fc2, X)                              # fc2
            if p is v or layer == c.num_layers - 1:
                p.add(2 * X, X)                                # residual
        # training: LayerNorms as in SAM; attention (SDPA's flash kernels or the Triton kernel alike): q, k, v
        # (views of the qkv output), the output (out_proj's input) and the fp32 log-sum-exp; quick_gelu keeps
        # its input and the sigmoid, fc2 its input
        attn = 3 * X + X + 4 * nh * T
        v.saved.block((X + stats) + X + attn + (X + stats) + X + 3 * H, inputs=X)
        f.saved.block(2 * X + attn + 2 * X + 3 * H, inputs=X if layer == 0 else 2 * X)
    return n, v, f, wb


# ----------------------------------------------------------------------------------------------------------
# Qwen2 as an encoder (DeepSeek-OCR 2)

def qwen2_weight_elems(cfg: Ocr2Config) -> int:
    """The `qwen2_model` parameters: the layers, the final norm and both query tables."""
    c = cfg.qwen2
    C, kv, I = c.hidden_size, c.num_key_value_heads * c.head_dim, c.intermediate_size   # query heads span C
    layer = (C * C + C) + 2 * (C * kv + kv) + C * C + 3 * C * I + 2 * C   # q, k, v (bias), o, gate/up/down, norms
    tables = cfg.tokens_per_side(cfg.base_size) ** 2 + cfg.tokens_per_side(cfg.image_size) ** 2
    return c.num_hidden_layers * layer + C + tables * C


def _rms_norm_vendor(p: _Passes, T: int, C: int, e: int, held: int):
    """transformers' Qwen2RMSNorm as its separate passes: to fp32, pow, mean, + eps, rsqrt, multiply, back to the
    dtype, weight multiply (the casts are no-ops in fp32)."""
    X, X32, r = T * C * e, T * C * 4, T * 4
    if e != 4:
        p.add(X, X32, 0, held)              # to fp32
    p.add(X32, X32, 0, held + X32)          # pow, the fp32 input held
    p.add(X32, r, 0, held + X32)            # mean
    p.add(r, r, 0, held + X32)              # + eps
    p.add(r, r, 0, held + X32)              # rsqrt
    p.add(X32 + r, X32, 0, held + X32)      # multiply
    if e != 4:
        p.add(X32, X, 0, held)              # back to the dtype
    p.add(X, X, C * e, held)                # weight


def _rope_vendor(p: _Passes, Y: int, table: int, held: int):
    """transformers' apply_rotary_pos_emb on a Y-byte tensor: -x2, cat(-x2, x1), * sin, x * cos, add."""
    p.add(Y // 2, Y // 2, 0, held)          # -x2
    p.add(Y, Y, 0, held)                    # cat
    p.add(Y + table, Y, 0, held + Y)        # * sin
    p.add(Y + table, Y, 0, held + Y)        # x * cos
    p.add(2 * Y, Y, 0, held)                # add


def _qwen2(cfg: Ocr2Config, size: int, B: int, e: int, window_tables: bool = True):
    """B views of `size` px through the Qwen2 encoder, as one pass (same signature and return as `_sam`; it has
    no window tables, so `window_tables` changes nothing)."""
    c = cfg.qwen2
    C, nh, nkv, d, I = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size
    m = cfg.tokens_per_side(size) ** 2        # visual tokens of a view, and as many queries
    n, T = 2 * m, 2 * m * B
    # (row, key) pairs the prefix mask keeps per view and head: m visual rows x m keys, query i: m + i + 1 keys
    allowed = 2 * m * m + m * (m + 1) // 2
    cnt = _Count()
    v, f = _Passes(), _Passes(weights=False)
    X, KV, H = T * C * e, T * nkv * d * e, T * I * e    # q and the attention output are X too (heads * d = C)
    QKV = X + 2 * KV
    table = n * d * e                                   # cos or sin, [n, d]
    table_f = n * d // 2 * 4                            # the fused path's: the fp32 first half of cos or sin
    mask = B * n * n * e                                # the vendor's [B, 1, n, n] additive mask
    w_q, w_kv, w_o = (C * C + C) * e, (C * nkv * d + nkv * d) * e, C * C * e
    w_mlp, w_norm = C * I * e, C * e
    wb = c.num_hidden_layers * (w_q + 2 * w_kv + w_o + 3 * w_mlp + 2 * w_norm) + w_norm

    # the sequence: cat(SAM tokens, the query table); the table is read once (the views share it)
    for p in (v, f):
        p.add(B * m * C * e + m * C * e, X)
    # vendor, once per forward: the mask (a fill with finfo.min, the kept entries zeroed, torch.stack of the
    # views' masks) and the fp32 RoPE tables (inv_freq @ positions, cat, cos and sin, attention_scaling, cast)
    v.add(0, mask, 0, X)                                # fill
    v.add(0, B * allowed * e, 0, X + mask)              # zeros where the mask keeps a pair
    v.add(mask, mask, 0, X + mask)                      # stack
    f32 = n * d * 4
    v.add(0, f32 // 2)                                  # inv_freq @ positions
    v.add(f32, f32)                                     # cat(freqs, freqs)
    for _ in range(2):                                  # cos, sin
        v.add(f32, f32)
        v.add(f32, f32)                                 # * attention_scaling
        if e != 4:
            v.add(f32, table)                           # cast

    for i in range(c.num_hidden_layers):
        cnt.matmul(2 * T * C * (C + 2 * nkv * d))                       # q, k, v
        cnt.matmul(4 * B * nh * n * n * d, 4 * B * nh * allowed * d)    # q.k and p.v: all pairs | kept pairs
        cnt.recompute += 2 * B * nh * allowed * d                       # q.k again in the fused backward
        rows = T // 2 if i == c.num_hidden_layers - 1 else T          # fused: the last layer's query rows only
        cnt.matmul(2 * T * C * C + 3 * 2 * T * C * I, 2 * rows * C * C + 3 * 2 * rows * C * I)  # o_proj; MLP
        cnt.other += 2 * (4 * T * C + 3 * T) + T * (C + 2 * nkv * d)    # two RMSNorms, q/k/v bias
        cnt.other += 7 * T * (nh + nkv) * d // 2 + 7 * B * nh * n * n   # RoPE on q and k; scale, mask, softmax
        cnt.other += 5 * T * I + 2 * T * C                              # SiLU and gate * up; residual adds

        # vendor: the residual stream, the mask, cos and sin, and the DynamicCache (use_cache is on: the K and V
        # of every earlier layer stay until the forward ends) are held throughout
        held = X + mask + 2 * table + i * 2 * KV
        _rms_norm_vendor(v, T, C, e, held)                           # input_layernorm
        v.add(X, X, w_q, held)                                       # q_proj
        v.add(X, KV, w_kv, held + X)                                 # k_proj
        v.add(X, KV, w_kv, held + X + KV)                            # v_proj
        _rope_vendor(v, X, table, held + 2 * KV)                     # q
        _rope_vendor(v, KV, table, held + X + 2 * KV)                # k
        v.add(KV, X, 0, held + X + 2 * KV)                           # repeat_kv(k)
        v.add(KV, X, 0, held + 2 * X + 2 * KV)                       # repeat_kv(v)
        v.add(X, X, 0, held + 2 * X + 2 * KV)                        # q.contiguous() (CUDA, with a mask)
        v.add(3 * X + mask, X, 0, held + 2 * KV)                     # SDPA with the mask
        v.add(X, X, 0, held + 2 * KV)                                # head-merge copy
        v.add(X, X, w_o, held + 2 * KV)                              # o_proj
        v.add(2 * X, X, 0, held + 2 * KV)                            # residual
        held += 2 * KV                                               # this layer's K, V now in the cache
        _rms_norm_vendor(v, T, C, e, held)                           # post_attention_layernorm
        v.add(X, H, w_mlp, held + X)                                 # gate_proj
        v.add(H, H, 0, held + X)                                     # silu
        v.add(X, H, w_mlp, held + X + H)                             # up_proj
        v.add(2 * H, H, 0, held)                                     # silu(gate) * up
        v.add(H, X, w_mlp, held)                                     # down_proj
        v.add(2 * X, X, 0, held)                                     # residual

        # fused (weights counted once, above): a residual add is fused into the RMSNorm after it
        if i == 0:
            f.add(X, X, 0, X)                                        # input_layernorm
        else:
            f.add(2 * X, 2 * X)                                      # residual (previous layer) + input_layernorm
        f.add(X, X, 0, X)                                            # q_proj, k_proj, v_proj: three GEMMs
        f.add(X, KV, 0, 2 * X)
        f.add(X, KV, 0, 2 * X + KV)
        f.add(QKV + 2 * table_f, X, 0, X)                            # attention: RoPE inside, no mask, no copies
        Xr, Hr = X * rows // T, H * rows // T                        # what runs on after attention
        if rows < T:
            f.add(2 * Xr, 2 * Xr, 0, X)                              # the query rows of attention's output and x
        f.add(Xr, Xr, 0, Xr)                                         # o_proj
        f.add(2 * Xr, 2 * Xr)                                        # residual + post_attention_layernorm
        f.add(Xr, Hr, 0, Xr)                                         # gate_proj, up_proj: two GEMMs
        f.add(Xr, Hr, 0, Xr + Hr)
        f.add(2 * Hr, Hr, 0, Xr)                                     # silu(gate) * up, one pass
        f.add(Hr, Xr, 0, Xr)                                         # down_proj
    cnt.other += 4 * T * C + 3 * T                                   # the final norm
    _rms_norm_vendor(v, T, C, e, X + mask + 2 * table + c.num_hidden_layers * 2 * KV)
    f.add(X, X)                                                      # last residual + the final norm, query rows

    # training (the module docstring says what each op keeps): the torch path per chunk of views, as
    # gundam.model.Qwen2Encoder runs them, each chunk with its own cos, sin and mask; the packed path all at once
    per = max(1, CHUNK_TOKENS // n)
    for views in [per] * (B // per) + [B % per] * (B % per > 0):
        t = views * n
        x = t * C * e
        norm = t * C * 4 + t * 4 + 2 * x              # fp32 input, rstd, normalised x, output
        attn = 4 * x + views * nh * n * 4 + n * n * e  # q, k, v, output; log-sum-exp; the float mask
        mlp = 4 * t * I * e                           # gate, up, silu(gate), their product
        for i in range(c.num_hidden_layers):
            first = i == 0                            # cos, sin (and the bool mask) once per chunk
            v.saved.block(2 * norm + attn + mlp + 2 * table * first, inputs=x + (2 * table + n * n) * first)
        v.saved.outside += t * C * 4 + t * 4 + x                    # the final norm (its output is not kept)
    # the packed path: one pair of fp32 RoPE tables for the pass, as long as its longest view (kept by the first
    # layer's attention, a checkpoint's input): charged to the global stage (window_tables), the crop stage adding
    # the rows its views need beyond the global view's
    rope_rows = n if window_tables else max(0, n - 2 * cfg.tokens_per_side(cfg.base_size) ** 2)
    tables_f = 2 * rope_rows * d * 4
    for i in range(c.num_hidden_layers):
        first, last = i == 0, i == c.num_hidden_layers - 1
        before = 2 * X + QKV + X + 4 * nh * T                        # the norm, q/k/v, attention's output and LSE
        # after attention: o_proj's input (attention's output; the last layer: its query rows, gathered, and
        # their int64 indices), the norm, SwiGLU
        after = (X // 2 + 8 * (T // 2) + X + 3 * H // 2) if last else 2 * X + 3 * H
        f.saved.block(before + after + tables_f * first, inputs=(X if first else 2 * X) + tables_f * first)
    f.saved.outside += X // 2                                        # the final norm's input: the query rows
    return cnt, v, f, wb


# ----------------------------------------------------------------------------------------------------------
# the whole encoder

def estimate(width: int, height: int, mode: str | Mode = "gundam", max_crops: int | None = None, batch: int = 1,
             dtype="bf16", config: EncoderConfig | Ocr2Config | None = None) -> CostReport:
    """Cost of encoding `batch` images of `width` x `height` px in `mode` (a name or a Mode) by the encoder of the
    mode's family: `config` an EncoderConfig for DeepSeek-OCR's modes, an Ocr2Config for DeepSeek-OCR 2's
    (default: the family's real encoder)."""
    width, height = check_image_size(width, height)  # sizes an image can have: counts stay finite floats
    batch = check_int(batch, "batch", 1, 1 << 20)
    dt = _cost_dtype(dtype)
    e = dt.itemsize
    layout = image_layout(width, height, mode, max_crops)
    m = layout.mode
    config = default_config(m.family) if config is None else config
    if family_of(config) != m.family:
        want = "an Ocr2Config" if m.family == "deepseek-ocr2" else "an EncoderConfig"
        raise ValueError(f"config {type(config).__name__} is a {family_of(config)} encoder, the mode's views are "
                         f"for {m.family}: expected {want} (or None: the real one)")
    config.tokens_per_side(m.base_size, "mode base_size")  # raises for a view size this encoder cannot take
    config.tokens_per_side(m.image_size, "mode image_size")
    if m.family == "deepseek-ocr2":
        names, second = OCR2_COST_STAGES, ("qwen2", _qwen2, qwen2_weight_elems(config))
    else:
        names, second = COST_STAGES, ("clip", _clip, clip_weight_elems(config))
    k = layout.n_crops
    stages = {name: StageCost() for name in names}
    for kind, size, views in (("global", m.base_size, 1), ("crops", m.image_size, k)):
        if not views:
            continue  # no crops made: nothing modelled
        for name, fn, total_weights in (("sam", _sam, sam_weight_elems(config)), second):
            # vendor: one pass per image over its `views`; fused: one pass over every image's views
            _, vend, _, _ = fn(config, size, views, e)
            cnt_all, vend_all, fus, wb = fn(config, size, views * batch, e, window_tables=kind == "global")
            if kind == "global":
                fus.bytes += wb  # weights read once per call, charged to the global stage
            stages[f"{name}_{kind}"] = _stage(cnt_all, vend, fus, total_weights * e, batch, vend_all.saved)
    stages["projector_layout"] = _projector_layout(config, layout, batch, e)

    total = StageCost()
    for s in stages.values():
        total = total + s
    # weights: the encoder's parameters once; peaks: the vendor runs stages one after another, the fused path
    # runs global and crop views of SAM (and of CLIP or Qwen2) together
    total.weight_bytes = (sam_weight_elems(config) + second[2] + _projector_weight_elems(config)
                          + _layout_rows(m) * config.projector.n_embed) * e
    st = stages
    total.activation_bytes = max(s.activation_bytes for s in st.values())
    both = [(st[f"{name}_global"], st[f"{name}_crops"]) for name in ("sam", second[0])]
    total.train_block_bytes_fused = max(g.train_block_bytes_fused + c.train_block_bytes_fused for g, c in both)
    total.activation_bytes_fused = max([g.activation_bytes_fused + c.activation_bytes_fused for g, c in both]
                                       + [st["projector_layout"].activation_bytes_fused])
    return CostReport(int(width), int(height), m, layout, batch, DTYPE_NAMES[dt], stages, total, config)


def _projector_weight_elems(cfg: EncoderConfig | Ocr2Config) -> int:
    p = cfg.projector
    return p.input_dim * p.n_embed + p.n_embed


def _layout_rows(mode: Mode) -> int:
    """Learned layout rows: image_newline and view_seperator (DeepSeek-OCR), view_seperator (DeepSeek-OCR 2)."""
    return 2 if has_newlines(mode) else 1


def _projector_layout(cfg: EncoderConfig | Ocr2Config, layout: ImageLayout, batch: int, e: int) -> StageCost:
    """Projector on every view's tokens, then the layout rows. DeepSeek-OCR: cat(CLIP tokens, SAM tokens) in,
    rows with newlines (the crops' tokens permuted into the tile grid) and the separator out; DeepSeek-OCR 2: the
    queries' outputs in, crops, global view and separator out (no copies but the last cat)."""
    m, Din, D = layout.mode, cfg.projector.input_dim, cfg.projector.n_embed
    newlines = has_newlines(m)
    qb, qi = cfg.tokens_per_side(m.base_size), cfg.tokens_per_side(m.image_size)
    wgt = (_projector_weight_elems(cfg) + _layout_rows(m) * D) * e
    w_proj = _projector_weight_elems(cfg) * e
    # (tokens, newline rows, crops?) of one image's global view and its crops
    views = [(qb * qb, qb, False)]
    if layout.n_crops:
        views.append((layout.n_crops * qi * qi, layout.grid[1] * qi, True))
    rows = layout.tokens  # output rows of one image, newlines and separator included
    n = _Count()
    v = _Passes()
    for t, nrows, crops in views:  # vendor, per image: global view, crops
        n.matmul(2 * t * Din * D)
        n.other += t * D
        if not newlines:
            v.add(t * Din * e, t * D * e, w_proj)            # the projector on the queries' outputs
            continue
        v.add(t * Din * e, t * Din * e)                  # cat(clip[:, 1:], sam.flatten(2).T)
        v.add(t * Din * e, t * D * e, w_proj, t * Din * e)
        if crops:
            v.add(t * D * e, t * D * e)                  # tile permute copy
        v.add(t * D * e + D * e, (t + nrows) * D * e)    # cat with newlines
    v.add(rows * D * e, rows * D * e)                    # final cat with the separator
    tokens = sum(t for t, _, _ in views) * batch
    v.saved.outside = tokens * Din * e                   # training: the projector's input
    f = _Passes()
    f.add(tokens * Din * e, rows * batch * D * e, wgt)   # one kernel: the tokens in, final rows out
    f.saved.outside = tokens * Din * e                   # training: the kernel keeps its input
    if newlines:  # both halves, CLIP's with the class tokens (the packed CLIP output)
        views_all = (1 + layout.n_crops) * batch
        f.saved.outside = tokens * cfg.sam.net_3_chans * e + (tokens + views_all) * cfg.clip.hidden_size * e
    n.mm, n.mm_fused, n.other = n.mm * batch, n.mm * batch, n.other * batch
    return StageCost(n.mm, n.mm_fused, n.other, v.bytes * batch, f.bytes, wgt, v.peak, f.peak, **n.train(),
                     **v.saved.fields(""), **f.saved.fields("_fused"))
