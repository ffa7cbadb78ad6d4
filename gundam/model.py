"""The encoders in pure torch, exactly the vendor's computation: DeepSeek-OCR's DeepEncoder (SAM ViT-B -> CLIP-L
-> linear projector) and DeepSeek-OCR 2's (the same SAM -> Qwen2 as an encoder -> linear projector).

Module and parameter names are the vendor's (`sam_model.blocks.0.attn.qkv.weight`, ...), so a vendor state dict
loads as is. Differences from the vendor code are in memory and bookkeeping only, never in the math:
- global-attention blocks build the rel-pos bias per chunk of queries (never heads x N x N at once);
- interpolated position and rel-pos tables are computed once per view size and cached (not while training);
- the Qwen2 prefix mask is built at once per view size, not row by row, and views run in bounded chunks.
This path is the oracle for every Triton kernel and the CPU path.

Each block also has its packed fast path beside it (`forward_packed`): the same block on one token-major [T, C]
buffer holding every view of a batch, with attention, LayerNorm (the residual add fused in) and the projector +
layout through the Triton kernels (gundam.kernels) and the linears through torch. `encode` (here) and
`gundam.packed.encode_packed` are the two top-level paths; GundamEncoder picks one (`backend`).

And its CPU fast path (`forward_cpu`, backend "cpu", inference only): the same math in torch ops chosen for CPUs:
fp32 linears through oneDNN's inner product (`fast_linear`), no qkv or proj on window padding (its qkv is the
bias: filled, not computed), no partition copies of the residual stream, residual adds and activations in place.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from gundam.config import ClipConfig, EncoderConfig, Ocr2Config, Qwen2Config, SamConfig, tokens_per_side
from gundam.layout import layout_batch

# Elements of attention bias built at once (fp32: 64 MB). Bounds the memory of global blocks on 1024+ views.
BIAS_CHUNK_ELEMENTS = 1 << 24
# Tokens per chunk of SAM's attention (whole windows or views) and MLP: both are independent across views and
# tokens, so chunks bound the memory of crop batches without changing the math.
CHUNK_TOKENS = 4096


def kernels():
    """gundam.kernels with its kernel modules loaded, imported on first use: TRITON_INTERPRET must be set before
    triton is first imported, and `import gundam` does not import triton."""
    import gundam.kernels.activation, gundam.kernels.attention, gundam.kernels.layernorm, gundam.kernels.layout  # noqa: E401,F401
    import gundam.kernels.prefix_attention, gundam.kernels.rmsnorm, gundam.kernels.segments, gundam.kernels.swiglu  # noqa: E401,F401
    from gundam.kernels import interpreter
    interpreter.install()   # a no-op unless TRITON_INTERPRET=1
    return gundam.kernels


# oneDNN's inner product runs the encoder's linears 15-25% faster than the GEMM behind F.linear on the x86 CPUs
# measured (bench/cpu.py), fp32 and (where the CPU has native bf16: AVX512-BF16 or AMX) bf16; results equal within
# rounding. It has no autograd formula, hence inference only.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if ONEDNN_LINEAR and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                                    else ())


def fast_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) on the CPU fast path: through oneDNN on a CPU (ONEDNN_DTYPES), anything else (and anything
    torch.compile traces, which picks its own GEMM) through F.linear."""
    if (ONEDNN_LINEAR and x.dtype in ONEDNN_DTYPES and x.device.type == "cpu" and not torch.is_grad_enabled()
            and not torch.compiler.is_compiling()):
        return torch.ops.mkldnn._linear_pointwise(x, layer.weight, layer.bias, "none", [], "")
    return F.linear(x, layer.weight, layer.bias)


def add_norm(norm: nn.LayerNorm, x: torch.Tensor, y: torch.Tensor | None):
    """Packed path: LayerNorm of the residual stream x + y with the add fused into the kernel -> (normalised,
    x + y); y None (before a stack's first block, whose stream is x alone) -> (normalised x, x)."""
    K = kernels()
    if y is None:
        return K.layernorm.layer_norm(x, norm.weight, norm.bias, norm.eps), x
    return K.layernorm.layer_norm(y, norm.weight, norm.bias, norm.eps, residual=x)


def add_rms_norm(norm: "RMSNorm", x: torch.Tensor, y: torch.Tensor | None):
    """Packed path: RMSNorm of the residual stream x + y, the add fused into the kernel -> (normalised, x + y);
    y None -> (normalised x, x). As add_norm, for Qwen2's layers."""
    K = kernels()
    if y is None:
        return K.rmsnorm.rms_norm(x, norm.weight, norm.eps), x
    return K.rmsnorm.rms_norm(y, norm.weight, norm.eps, residual=x)


class TableCache:
    """Derived tables (resized position embeddings, gathered rel-pos) per parameter and view size.

    An entry is valid while it belongs to the same parameter object (a weak reference, so a replaced
    parameter never matches) with the same version counter, storage, dtype and device: in-place updates
    (optimizer steps, `load_state_dict`, `.to()`) invalidate it. Writes through `param.data` bypass the version
    counter: call `GundamEncoder.clear_cache()` after those. Bypassed while autograd is recording, so
    fine-tuning gets gradients through the interpolation. Tables are never inference tensors, so one made under
    `torch.inference_mode()` serves a later forward with autograd (frozen weights, gradients for the input).
    """

    def __init__(self):
        self.tables = {}

    def get(self, param: torch.Tensor, key, fn):
        if torch.is_grad_enabled() and param.requires_grad:
            return fn()
        state = (param._version, param.data_ptr(), param.dtype, param.device)
        entry = self.tables.get((id(param), key))
        if entry is None or entry[0]() is not param or entry[1] != state:
            # made as a normal tensor even under inference_mode: an inference tensor cached here would crash a
            # later forward that records autograd ("Inference tensors cannot be saved for backward")
            with torch.inference_mode(False), torch.no_grad():
                entry = (weakref.ref(param), state, fn())
            self.tables[(id(param), key)] = entry
        return entry[2]

    def clear(self):
        self.tables.clear()


# ----------------------------------------------------------------------------------------------------------
# SAM ViT-B

def resize_pos_embed(pos_embed: torch.Tensor, size: int) -> torch.Tensor:
    """[1, G, G, C] -> [1, size, size, C], bicubic with antialias in float32 (vendor `get_abs_pos`)."""
    if pos_embed.shape[1] == size:
        return pos_embed
    x = pos_embed.permute(0, 3, 1, 2).float()  # [1, C, G, G]
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x.to(pos_embed.dtype).permute(0, 2, 3, 1)


def resize_rel_pos(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(2G-1, C) learned table -> (2*size-1, C), linearly resized in float32 when the lengths differ."""
    length = 2 * size - 1
    if rel_pos.shape[0] == length:
        return rel_pos
    r = rel_pos.float().reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1)  # [1, C, 2G-1]
    r = F.interpolate(r, size=length, mode="linear")
    return r.to(rel_pos.dtype).reshape(-1, length).permute(1, 0)           # [2S-1, C]


def rel_pos_table(rel_pos: torch.Tensor, size: int) -> torch.Tensor:
    """(2*size-1, C) table -> [size, size, C] with table[q, k] = R[q - k + size - 1] (vendor `get_rel_pos`
    with equal query and key sizes)."""
    coords = torch.arange(size, device=rel_pos.device)
    return rel_pos[(coords[:, None] - coords[None, :]) + (size - 1)]


def attention_with_rel_pos(q, k, v, Rh, Rw, H, W):
    """softmax(q k^T / sqrt(d) + rel_h + rel_w) v for q, k, v [B, heads, H*W, d], Rh [H, H, d], Rw [W, W, d].

    The vendor materialises the [B, heads, N, N] bias; here it is built per chunk of query rows, so memory
    stays at BIAS_CHUNK_ELEMENTS whatever the view size. Rows are independent: the result is the same.
    """
    B, nh, N, d = q.shape
    r_q = q.reshape(B * nh, H, W, d)
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, Rh).reshape(B, nh, N, H, 1)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, Rw).reshape(B, nh, N, 1, W)
    rows = max(1, BIAS_CHUNK_ELEMENTS // (B * nh * N))
    if rows >= N:
        bias = (rel_h + rel_w).reshape(B, nh, N, N)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    out = torch.empty_like(q)
    for r0 in range(0, N, rows):
        r1 = min(N, r0 + rows)
        bias = (rel_h[:, :, r0:r1] + rel_w[:, :, r0:r1]).reshape(B, nh, r1 - r0, N)
        out[:, :, r0:r1] = F.scaled_dot_product_attention(q[:, :, r0:r1], k, v, attn_mask=bias)
    return out


# Elements of attention scores per step of the CPU fast path's attention: small enough to stay in cache.
CPU_SCORE_ELEMENTS = 1 << 20
# SAM tokens of the views the CPU fast path encodes at a time (10 crops of 640 px, 4 global views of 1024).
CPU_VIEW_TOKENS = 16384


def attention_with_rel_pos_cpu(q, k, v, Rh, Rw, H, W):
    """`attention_with_rel_pos` on the CPU fast path, in steps of CPU_SCORE_ELEMENTS scores (a few heads or a
    few hundred query rows of one head): bias, then q k^T added to it in the same GEMM (baddbmm), softmax, p v.
    Faster on CPUs than SDPA with the [B, heads, N, N] bias as its mask (bench/cpu.py)."""
    B, nh, N, d = q.shape
    q, k, v = (t.reshape(B * nh, N, d) for t in (q, k, v))                # [B*nh, N, d]
    rel_h = torch.einsum("bhwc,hkc->bhwk", q.view(-1, H, W, d), Rh).reshape(-1, N, H)
    rel_w = torch.einsum("bhwc,wkc->bhwk", q.view(-1, H, W, d), Rw).reshape(-1, N, W)
    rows = min(N, max(1, CPU_SCORE_ELEMENTS // N))
    heads = max(1, CPU_SCORE_ELEMENTS // (rows * N))
    out = torch.empty_like(q)
    scale = d ** -0.5
    for h0 in range(0, B * nh, heads):
        h1 = min(B * nh, h0 + heads)
        kt = k[h0:h1].transpose(1, 2)
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            s = q.new_empty(h1 - h0, r1 - r0, H, W)
            torch.add(rel_h[h0:h1, r0:r1, :, None], rel_w[h0:h1, r0:r1, None, :], out=s)
            s = s.view(h1 - h0, r1 - r0, N).baddbmm_(q[h0:h1, r0:r1], kt, alpha=scale)
            torch.bmm(torch.softmax(s, dim=-1), v[h0:h1], out=out[h0:h1, r0:r1])
    return out.view(B, nh, N, d)


class SamAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, rel_size: int, tables: TableCache):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // num_heads
        # zero init like the vendor (use_rel_pos, rel_pos_zero_init)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_size - 1, head_dim))
        self.tables = tables

    def rel_pos_h_for(self, size: int) -> torch.Tensor:
        """rel_pos_h resized for a group of `size` rows: [2*size-1, head_dim] (cached per size)."""
        return self.tables.get(self.rel_pos_h, ("resized", size), lambda: resize_rel_pos(self.rel_pos_h, size))

    def rel_pos_w_for(self, size: int) -> torch.Tensor:
        """rel_pos_w resized for a group of `size` columns: [2*size-1, head_dim] (cached per size)."""
        return self.tables.get(self.rel_pos_w, ("resized", size), lambda: resize_rel_pos(self.rel_pos_w, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh = self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4)  # [3, B, nh, N, d]
        q, k, v = qkv.reshape(3, B, nh, H * W, -1).unbind(0)  # one contiguous copy, as the vendor
        Rh = self.tables.get(self.rel_pos_h, H, lambda: rel_pos_table(self.rel_pos_h_for(H), H))
        Rw = self.tables.get(self.rel_pos_w, W, lambda: rel_pos_table(self.rel_pos_w_for(W), W))
        x = attention_with_rel_pos(q, k, v, Rh, Rw, H, W)                   # [B, nh, N, d]
        x = x.view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, C)
        return self.proj(x)

    def forward_packed(self, x: torch.Tensor, seg) -> torch.Tensor:
        """x [T, C] (normed tokens of every view) -> [T, C]: one attention launch over the segment table `seg`
        (every window or every whole view), the rel-pos bias added inside the kernel; padded window keys are
        the qkv bias, as in `forward`."""
        K = kernels()
        T, C = x.shape
        qkv = self.qkv(x).view(T, 3, self.num_heads, C // self.num_heads)
        rh = K.segments.pack_rel_pos([self.rel_pos_h_for(s) for s in seg.rel_sizes_h], seg.rel_sizes_h)
        rw = K.segments.pack_rel_pos([self.rel_pos_w_for(s) for s in seg.rel_sizes_w], seg.rel_sizes_w)
        return self.proj(K.attention.attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=self.qkv.bias))

    def forward_cpu(self, x: torch.Tensor, window: int) -> torch.Tensor:
        """x [B, H, W, C] (normed) -> [B, H, W, C], attention in windows of `window` (0: the whole view). qkv and
        proj run on the real tokens only: a padding token's qkv is the qkv bias (the vendor pads before qkv),
        written into the windows, and its output is dropped before proj."""
        B, H, W, C = x.shape
        nh, d = self.num_heads, C // self.num_heads
        qkv = fast_linear(self.qkv, x)                                       # [B, H, W, 3C]
        Sh, Sw = (window, window) if window else (H, W)
        nH, nW = -(-H // Sh), -(-W // Sw)
        if nH * Sh != H or nW * Sw != W:
            padded = self.qkv.bias.expand(B, nH * Sh, nW * Sw, 3 * C).contiguous()
            padded[:, :H, :W] = qkv
            qkv = padded
        # [B, nH, Sh, nW, Sw, 3, nh, d] -> [3, B*nH*nW, nh, Sh*Sw, d]: one copy, windows (or views) as the batch
        q, k, v = qkv.view(B, nH, Sh, nW, Sw, 3, nh, d).permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(
            3, B * nH * nW, nh, Sh * Sw, d)
        Rh = self.tables.get(self.rel_pos_h, Sh, lambda: rel_pos_table(self.rel_pos_h_for(Sh), Sh))
        Rw = self.tables.get(self.rel_pos_w, Sw, lambda: rel_pos_table(self.rel_pos_w_for(Sw), Sw))
        if q.dtype == torch.bfloat16:
            # the cache-sized steps in fp32 (fp32 scores and softmax): 15-20% faster than SDPA's bf16 flash
            # kernel with the bias as its mask on AVX512-BF16 CPUs, whose bf16 batched GEMMs are slower than fp32
            o = attention_with_rel_pos_cpu(q.float(), k.float(), v.float(), Rh.float(), Rw.float(), Sh, Sw).to(q.dtype)
        elif q.dtype == torch.float32:                                       # the cache-sized steps
            o = attention_with_rel_pos_cpu(q, k, v, Rh, Rw, Sh, Sw)          # [B*nH*nW, nh, Sh*Sw, d]
        else:   # fp16: SDPA, whose softmax statistics are fp32
            o = attention_with_rel_pos(q, k, v, Rh, Rw, Sh, Sw)
        # back to tokens, the padding dropped: [B*nH*nW, nh, Sh*Sw, d] -> [B, nH*Sh, nW*Sw, C] -> [B, H, W, C]
        o = o.view(B, nH, nW, nh, Sh, Sw, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nH * Sh, nW * Sw, C)
        return fast_linear(self.proj, o[:, :H, :W])


class MLPBlock(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(dim, hidden)
        self.lin2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.lin2(F.gelu(self.lin1(x)))  # exact erf GELU (nn.GELU default)

    def forward_packed(self, x):
        # GELU in place for inference: the [T, 4C] hidden state is the largest activation of the packed pass;
        # out of place while autograd records it (its backward needs the input)
        hidden = self.lin1(x)
        hidden = F.gelu(hidden) if hidden.requires_grad else torch.ops.aten.gelu_(hidden)
        return self.lin2(hidden)


def window_partition(x: torch.Tensor, S: int):
    """[B, H, W, C] -> [B * nH * nW, S, S, C], zero-padded at the bottom/right to multiples of S."""
    B, H, W, C = x.shape
    pad_h, pad_w = (S - H % S) % S, (S - W % S) % S
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // S, S, Wp // S, S, C).permute(0, 1, 3, 2, 4, 5)  # [B, nH, nW, S, S, C]
    return x.reshape(-1, S, S, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, S: int, padded: tuple[int, int], hw: tuple[int, int]):
    """Inverse of window_partition, dropping the padded rows and columns."""
    (Hp, Wp), (H, W) = padded, hw
    B = windows.shape[0] // (Hp * Wp // S // S)
    x = windows.view(B, Hp // S, Wp // S, S, S, -1).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, -1)
    return x[:, :H, :W, :].contiguous()


class SamBlock(nn.Module):
    def __init__(self, cfg: SamConfig, window_size: int, tables: TableCache):
        super().__init__()
        dim = cfg.embed_dim
        self.window_size = window_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = SamAttention(dim, cfg.num_heads, window_size or cfg.grid, tables)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = MLPBlock(dim, cfg.mlp_dim)

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        H, W = x.shape[1:3]
        if self.window_size:
            # padding happens before qkv: padded tokens become keys equal to the qkv bias (not masked)
            x, padded = window_partition(x, self.window_size)          # [B*nH*nW, S, S, C]
        # windows and views are independent: attend a bounded number of tokens' worth of them at a time
        per = max(1, CHUNK_TOKENS // (x.shape[1] * x.shape[2]))
        x = torch.cat([self.attn(part) for part in x.split(per)])
        if self.window_size:
            x = window_unpartition(x, self.window_size, padded, (H, W))
        x = shortcut + x
        # the MLP runs on chunks of tokens: its [tokens, 4*C] hidden state dominates peak memory on crop batches
        flat = x.reshape(-1, x.shape[-1])                               # [B*H*W, C]
        out = torch.empty_like(flat)
        for t0 in range(0, flat.shape[0], CHUNK_TOKENS):
            t1 = t0 + CHUNK_TOKENS
            out[t0:t1] = flat[t0:t1] + self.mlp(self.norm2(flat[t0:t1]))
        return out.view(x.shape)

    def forward_cpu(self, x):
        """`forward` on the CPU fast path, [B, H, W, C] -> [B, H, W, C], updating x in place (inference)."""
        x += self.attn.forward_cpu(self.norm1(x), self.window_size)
        flat = x.view(-1, x.shape[-1])                                   # [B*H*W, C]
        for part in flat.split(CHUNK_TOKENS):                           # bounded [tokens, 4C] hidden state
            hidden = torch.ops.aten.gelu_(fast_linear(self.mlp.lin1, self.norm2(part)))
            part += fast_linear(self.mlp.lin2, hidden)
        return x

    def forward_packed(self, x, mlp_out, plan):
        """The block on the packed stream of every view: (x, mlp_out) -> (x, mlp_out), the residual stream
        being x + mlp_out (the add is fused into the next LayerNorm); mlp_out is None before the first block.
        Windows are segments of the plan, not partition copies."""
        h, x = add_norm(self.norm1, x, mlp_out)
        h, x = add_norm(self.norm2, x, self.attn.forward_packed(h, plan.seg_window if self.window_size
                                                                 else plan.seg_global))
        return x, self.mlp.forward_packed(h)


def run_block(block, *args, checkpointing: bool):
    """block(*args), or with activation checkpointing while autograd records: the block's activations are
    dropped after the forward and recomputed in the backward (GundamEncoder.gradient_checkpointing_enable).
    Both backends run their SAM blocks and CLIP layers through here."""
    if checkpointing and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
    return block(*args)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).permute(0, 2, 3, 1)  # [B, C, g, g] -> [B, g, g, C]


class LayerNorm2d(nn.Module):
    """LayerNorm over channels of [B, C, H, W], the vendor's explicit formula."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class Sam(nn.Module):
    """SAM ViT-B image encoder: [B, 3, S, S] -> [B, net_3_chans, S/64, S/64]."""

    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        self.tables = TableCache()
        self.gradient_checkpointing = False
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.embed_dim))
        self.blocks = nn.ModuleList(
            SamBlock(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size, self.tables)
            for i in range(cfg.depth))
        c, eps = cfg.out_chans, cfg.layer_norm_eps
        self.neck = nn.Sequential(
            nn.Conv2d(cfg.embed_dim, c, kernel_size=1, bias=False), LayerNorm2d(c, eps),
            nn.Conv2d(c, c, kernel_size=3, padding=1, bias=False), LayerNorm2d(c, eps))
        # net_2 and net_3 halve the grid each (NECK_DOWNSAMPLE in gundam.config)
        self.net_2 = nn.Conv2d(c, cfg.net_2_chans, kernel_size=3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(cfg.net_2_chans, cfg.net_3_chans, kernel_size=3, stride=2, padding=1, bias=False)

    def pos_embed_for(self, grid: int) -> torch.Tensor:
        return self.tables.get(self.pos_embed, grid, lambda: resize_pos_embed(self.pos_embed, grid))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(pixels)                  # [B, g, g, C]
        return x + self.pos_embed_for(x.shape[1])

    def downsample(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, g, g] after the blocks -> [B, net_3_chans, g/4, g/4]."""
        return self.net_3(self.net_2(self.neck(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)                             # [B, g, g, C]
        for blk in self.blocks:
            x = run_block(blk, x, checkpointing=self.gradient_checkpointing)
        return self.downsample(x.permute(0, 3, 1, 2))

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x).contiguous()                # [B, g, g, C], updated in place by the blocks
        for blk in self.blocks:
            x = blk.forward_cpu(x)
        return self.downsample(x.permute(0, 3, 1, 2))

    def forward_packed(self, groups: list[torch.Tensor], plan) -> list[torch.Tensor]:
        """groups: [B, 3, S, S] pixels per view size (plan order) -> [B, net_3_chans, q, q] per group; the
        blocks run once over one token-major buffer of every view."""
        C = self.cfg.embed_dim
        embedded = [self.embed(pixels) for pixels in groups]               # [B, g, g, C] each
        x = torch.cat([e.reshape(-1, C) for e in embedded])                # [T, C]
        mlp_out = None
        for blk in self.blocks:
            x, mlp_out = run_block(blk.forward_packed, x, mlp_out, plan, checkpointing=self.gradient_checkpointing)
        x = x + mlp_out
        outs, off = [], 0
        for e in embedded:
            B, g = e.shape[:2]
            outs.append(self.downsample(x[off:off + B * g * g].view(B, g, g, C).permute(0, 3, 1, 2)))
            off += B * g * g
        return outs


# ----------------------------------------------------------------------------------------------------------
# CLIP-L

def resize_clip_pos(pos: torch.Tensor, src: int, tgt: int) -> torch.Tensor:
    """[1 + src*src, C] -> [1 + tgt*tgt, C]: the class row kept, the grid bicubic-resized (vendor `get_abs_pos`)."""
    if src == tgt:
        return pos
    C = pos.shape[-1]
    grid = pos[1:].view(1, src, src, C).permute(0, 3, 1, 2).float()  # [1, C, G, G]
    grid = F.interpolate(grid, size=(tgt, tgt), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.to(pos.dtype).permute(0, 2, 3, 1).reshape(tgt * tgt, C)
    return torch.cat([pos[:1], grid], dim=0)


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig, tables: TableCache):
        super().__init__()
        self.grid = cfg.grid
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.grid ** 2 + 1, cfg.hidden_size)
        self.tables = tables
        # The vendor's unused `patch_embedding` conv and `position_ids` buffer are not kept: SAM's output
        # replaces the patch embedding. Loading ignores those keys.

    def position_embedding_for(self, grid: int) -> torch.Tensor:
        """Position table for a class token and a grid x grid view: [1 + grid*grid, C] (cached per size)."""
        w = self.position_embedding.weight
        return self.tables.get(w, grid, lambda: resize_clip_pos(w, self.grid, grid))

    def forward(self, patch_embeds: torch.Tensor) -> torch.Tensor:
        B, C, h, w = patch_embeds.shape                             # square views: h == w
        x = patch_embeds.flatten(2).transpose(1, 2)                 # [B, C, h, w] -> [B, h*w, C]
        cls = self.class_embedding.to(x.dtype).expand(B, 1, -1)
        x = torch.cat([cls, x], dim=1)                               # [B, 1 + h*w, C]
        return x + self.position_embedding_for(h)


class ClipAttention(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.qkv_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size * 3)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)  # [B, nh, N, d]
        x = F.scaled_dot_product_attention(q, k, v)
        return self.out_proj(x.permute(0, 2, 1, 3).reshape(B, N, C))

    def forward_packed(self, x: torch.Tensor, seg) -> torch.Tensor:
        """x [T, C] (every view's class token and grid) -> [T, C]: one attention launch, a view per segment."""
        T, C = x.shape
        qkv = self.qkv_proj(x).view(T, 3, self.num_heads, C // self.num_heads)
        return self.out_proj(kernels().attention.attention(qkv, seg))

    def forward_cpu(self, x):
        B, N, C = x.shape
        q, k, v = fast_linear(self.qkv_proj, x).view(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)                  # [B, nh, N, d]
        return fast_linear(self.out_proj, x.transpose(1, 2).reshape(B, N, C))


def quick_gelu(x):
    return x * torch.sigmoid(1.702 * x)


class ClipMLP(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size)
        self.fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size)

    def forward(self, x):
        return self.fc2(quick_gelu(self.fc1(x)))

    def forward_packed(self, x):
        # inference: one in-place pass, not three; while autograd records: the torch path's quick_gelu
        hidden = self.fc1(x)
        hidden = quick_gelu(hidden) if hidden.requires_grad else kernels().activation.quick_gelu_(hidden)
        return self.fc2(hidden)


class ClipLayer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.self_attn = ClipAttention(cfg)
        self.mlp = ClipMLP(cfg)
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_epsilon)

    def forward(self, x):
        h = x + self.self_attn(self.layer_norm1(x))
        return h + self.mlp(self.layer_norm2(h))

    def forward_cpu(self, x):
        """`forward` on the CPU fast path, x [B, N, C] updated in place (inference)."""
        x += self.self_attn.forward_cpu(self.layer_norm1(x))
        hidden = fast_linear(self.mlp.fc1, self.layer_norm2(x))
        hidden *= torch.sigmoid(1.702 * hidden)                        # quick_gelu, in place
        x += fast_linear(self.mlp.fc2, hidden)
        return x

    def forward_packed(self, x, mlp_out, plan):
        """The layer on the packed stream, (x, mlp_out) -> (x, mlp_out) as `SamBlock.forward_packed`."""
        h, x = add_norm(self.layer_norm1, x, mlp_out)
        h, x = add_norm(self.layer_norm2, x, self.self_attn.forward_packed(h, plan.seg_clip))
        return x, self.mlp.forward_packed(h)


class ClipTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.gradient_checkpointing = False
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x):
        for layer in self.layers:
            x = run_block(layer, x, checkpointing=self.gradient_checkpointing)
        return x

    def forward_packed(self, x, plan):
        mlp_out = None
        for layer in self.layers:
            x, mlp_out = run_block(layer.forward_packed, x, mlp_out, plan, checkpointing=self.gradient_checkpointing)
        return x + mlp_out


class Clip(nn.Module):
    """CLIP-L on SAM's features: [B, C, h, w] -> [B, 1 + h*w, C] (class token first, no post-norm)."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = ClipEmbeddings(cfg, TableCache())
        self.transformer = ClipTransformer(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.pre_layernorm_epsilon)

    def forward(self, pixels: torch.Tensor | None, patch_embeds: torch.Tensor) -> torch.Tensor:
        # `pixels` is unused (the vendor's signature: SAM's output stands in for the patch embedding)
        return self.transformer(self.pre_layrnorm(self.embeddings(patch_embeds)))

    def forward_cpu(self, pixels: torch.Tensor | None, patch_embeds: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(patch_embeds))
        for layer in self.transformer.layers:
            x = layer.forward_cpu(x)
        return x

    def forward_packed(self, sam_outs: list[torch.Tensor], plan) -> torch.Tensor:
        """SAM outputs [B, C, q, q] per view size -> packed tokens [T, C] (per view: class token + q*q)."""
        x = torch.cat([self.embeddings(s).flatten(0, 1) for s in sam_outs])   # [B, 1 + q*q, C] each -> [T, C]
        n = self.pre_layrnorm
        x = kernels().layernorm.layer_norm(x, n.weight, n.bias, n.eps)
        return self.transformer.forward_packed(x, plan)


class Projector(nn.Module):
    def __init__(self, input_dim: int, n_embed: int):
        super().__init__()
        self.layers = nn.Linear(input_dim, n_embed)

    def forward(self, x):
        return self.layers(x)

    def forward_cpu(self, x):
        return fast_linear(self.layers, x)

    def forward_packed(self, sam_tok, clip_tok, newline, separator, row_map):
        """Packed SAM [T, C] and CLIP tokens -> every output row, each written once at its final index: a
        projected token, an image_newline or a view_seperator (one kernel, no concatenated copy).
        DeepSeek-OCR 2: sam_tok and newline None, clip_tok the Qwen2 query rows (the projector's one input)."""
        p = self.layers
        if sam_tok is None:
            sam_tok = clip_tok[:, :0]        # [T, 0]: the kernel's SAM half is empty, its K loop runs no step
        newline = separator if newline is None else newline     # no newline rows in the map: never read
        return kernels().layout.project_and_layout(sam_tok, clip_tok, p.weight, p.bias, newline, separator, row_map)


# ----------------------------------------------------------------------------------------------------------
# Qwen2 as an encoder (DeepSeek-OCR 2)

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # statistics in fp32, cast back before the weight multiply (transformers' Qwen2RMSNorm); fp64 stays
        # fp64 (an oracle for the kernels, whose fp64 runs keep fp64 statistics)
        h = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope_tables(n: int, head_dim: int, theta: float, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [n, head_dim] of positions 0..n-1, computed in fp32 then cast (transformers' default RoPE)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv_freq[None, :]   # [n, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)                                                     # [n, d]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., n, d] rotated by position: x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def prefix_mask(m: int, device) -> torch.Tensor:
    """bool [2m, 2m], True where row r attends to key c: `m` visual tokens attend to all visual tokens (never to
    the queries), query i to every visual token and to queries 0..i, i.e. c <= max(r, m - 1). Built at once,
    not per row (the vendor fills it with a Python loop per query)."""
    r = torch.arange(2 * m, device=device)
    return (r[None, :] < m) | (r[None, :] <= r[:, None])


class Qwen2Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        C, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, d
        self.q_proj = nn.Linear(C, cfg.num_attention_heads * d)
        self.k_proj = nn.Linear(C, cfg.num_key_value_heads * d)
        self.v_proj = nn.Linear(C, cfg.num_key_value_heads * d)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, C, bias=False)

    def forward(self, x, cos, sin, mask):
        B, n, _ = x.shape
        q = self.q_proj(x).view(B, n, self.num_heads, self.head_dim).transpose(1, 2)      # [B, heads, n, d]
        k = self.k_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)   # [B, kv heads, n, d]
        v = self.v_proj(x).view(B, n, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        group = self.num_heads // self.num_kv_heads          # query head h reads kv head h // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)                       # [B, heads, n, d]
        return self.o_proj(o.transpose(1, 2).reshape(B, n, -1))

    def forward_packed(self, x: torch.Tensor, seg, cos, sin) -> torch.Tensor:
        """x [T, C] (normed rows of every view: m visual tokens then m queries each) -> [T, heads * d], before
        o_proj: one attention launch over the prefix-segment table `seg`, RoPE (positions from 0 per view), the
        prefix mask and GQA inside the kernel. The three projections stay three GEMMs: the host's weights are
        three parameters, and one GEMM would need their concatenated copy."""
        T = x.shape[0]
        q = self.q_proj(x).view(T, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(T, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(T, self.num_kv_heads, self.head_dim)
        return kernels().prefix_attention.prefix_attention(q, k, v, seg, cos, sin)

    def forward_cpu(self, x, cos, sin, m: int, queries_only: bool):
        """`forward` on the CPU fast path for x [B, 2m, C] under the prefix mask, which is not built: the m visual
        rows attend to the visual keys alone (no mask), the query rows to every key under their rows of the mask.
        GQA reads the kv heads in place (no repeated copy). queries_only: only the query rows' output [B, m, C]
        (the last layer, whose visual rows nothing reads)."""
        B, n, _ = x.shape
        h, kvh, d = self.num_heads, self.num_kv_heads, self.head_dim
        rows = x[:, m:] if queries_only else x
        q = fast_linear(self.q_proj, rows).view(B, -1, h, d).transpose(1, 2)               # [B, heads, rows, d]
        k = fast_linear(self.k_proj, x).view(B, n, kvh, d).transpose(1, 2)                 # [B, kv heads, n, d]
        v = fast_linear(self.v_proj, x).view(B, n, kvh, d).transpose(1, 2)
        q = apply_rope(q, cos[n - q.shape[2]:], sin[n - q.shape[2]:])
        k = apply_rope(k, cos, sin)
        mask = prefix_mask(m, x.device)[m:]                                                 # [m, 2m]
        o = F.scaled_dot_product_attention(q[:, :, -m:], k, v, attn_mask=mask, enable_gqa=True)
        if not queries_only:
            visual = F.scaled_dot_product_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], enable_gqa=True)
            o = torch.cat([visual, o], dim=2)                                              # [B, heads, n, d]
        return fast_linear(self.o_proj, o.transpose(1, 2).reshape(B, o.shape[2], -1))


class Qwen2MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def forward_packed(self, x):
        # silu(gate) * up in one pass (gate_proj and up_proj stay two GEMMs: two host parameters, as q/k/v)
        return self.down_proj(kernels().swiglu.silu_mul(self.gate_proj(x), self.up_proj(x)))

    def forward_cpu(self, x):
        hidden = F.silu(fast_linear(self.gate_proj, x), inplace=True)
        hidden *= fast_linear(self.up_proj, x)
        return fast_linear(self.down_proj, hidden)


class Qwen2Layer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = Qwen2Attention(cfg)
        self.mlp = Qwen2MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward_packed(self, x, mlp_out, plan, cos, sin, last: bool):
        """The layer on the packed stream of every view: (x, mlp_out) -> (x, mlp_out), the residual stream being
        x + mlp_out (the add fused into the next RMSNorm); mlp_out is None before the first layer. last: only
        the query rows reach the output, so after attention (which every row's keys feed) the layer goes on
        with the query rows alone (plan.query_rows): no o_proj, MLP or norm on the visual rows."""
        h, x = add_rms_norm(self.input_layernorm, x, mlp_out)
        attn = self.self_attn.forward_packed(h, plan.seg_prefix, cos, sin)               # [T, heads * d]
        if last:
            attn, x = attn[plan.query_rows], x[plan.query_rows]                            # [sum of m, ...]
        h, x = add_rms_norm(self.post_attention_layernorm, x, self.self_attn.o_proj(attn))
        return x, self.mlp.forward_packed(h)

    def forward_cpu(self, x, cos, sin, m: int, queries_only: bool):
        """`forward` on the CPU fast path: [B, 2m, C] -> [B, 2m, C] (queries_only: the query rows [B, m, C]),
        in place (inference)."""
        attn = self.self_attn.forward_cpu(self.input_layernorm(x), cos, sin, m, queries_only)
        x = x[:, m:].contiguous() if queries_only else x
        x += attn
        x += self.mlp.forward_cpu(self.post_attention_layernorm(x))
        return x


class Qwen2Stack(nn.Module):
    """The decoder layers and the final norm (transformers' Qwen2Model without token embeddings)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.layers = nn.ModuleList(Qwen2Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """x [B, 2m, C] (visual tokens, then queries) -> [B, 2m, C] after the final norm."""
        c = self.cfg
        cos, sin = rope_tables(x.shape[1], c.head_dim, c.rope_theta, x.dtype, x.device)   # positions 0..2m-1
        mask = prefix_mask(m, x.device)
        for layer in self.layers:
            x = run_block(layer, x, cos, sin, mask, checkpointing=self.gradient_checkpointing)
        return self.norm(x)

    def forward_cpu(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """The CPU fast path: x [B, 2m, C] -> the query rows [B, m, C] after the final norm (what the encoder
        keeps; the last layer and the norm run on those rows only)."""
        c = self.cfg
        cos, sin = rope_tables(x.shape[1], c.head_dim, c.rope_theta, x.dtype, x.device)
        for i, layer in enumerate(self.layers):
            x = layer.forward_cpu(x, cos, sin, m, queries_only=i == len(self.layers) - 1)
        return self.norm(x)


    def forward_packed(self, x: torch.Tensor, plan) -> torch.Tensor:
        """The packed path: x [T, C] (every view's visual tokens and queries, plan.seg_prefix) -> the query rows
        [sum of m, C] after the final norm, view after view."""
        c = self.cfg
        # fp32 tables, rotated in fp32 inside the kernel (the torch path's are in x's dtype: equal for fp32)
        cos, sin = rope_tables(plan.seg_prefix.max_len, c.head_dim, c.rope_theta, torch.float32, x.device)
        mlp_out = None
        for i, layer in enumerate(self.layers):
            x, mlp_out = run_block(layer.forward_packed, x, mlp_out, plan, cos, sin, i == len(self.layers) - 1,
                                   checkpointing=self.gradient_checkpointing)
        return add_rms_norm(self.norm, x, mlp_out)[0]


class Qwen2Decoder(nn.Module):
    """Holds the stack as `.model`, so parameter names are the vendor's (`qwen2_model.model.model.layers.N.*`)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.model = Qwen2Stack(cfg)


class Qwen2Encoder(nn.Module):
    """DeepSeek-OCR 2's `qwen2_model`: SAM features [B, C, h, w] -> [B, m, C], m = h*w. The sequence is the m
    visual tokens (raster order) followed by m learned queries (`query_768` for crops, `query_1024` for global
    views: the table with m rows), under `prefix_mask`; the queries' outputs are kept."""

    def __init__(self, cfg: Ocr2Config):
        super().__init__()
        C = cfg.qwen2.hidden_size
        self.model = Qwen2Decoder(cfg.qwen2)
        self.query_768 = nn.Embedding(tokens_per_side(cfg.image_size) ** 2, C)    # crop views
        self.query_1024 = nn.Embedding(tokens_per_side(cfg.base_size) ** 2, C)    # global views

    def queries(self, m: int) -> torch.Tensor:
        for table in (self.query_768, self.query_1024):
            if table.num_embeddings == m:
                return table.weight
        raise ValueError(f"qwen2_model: a view of {m} tokens, expected {self.query_768.num_embeddings} (crops) or "
                         f"{self.query_1024.num_embeddings} (global views): the sizes of the query tables")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        m = x.shape[2] * x.shape[3]
        queries = self.queries(m)
        x = torch.cat([x.flatten(2).transpose(1, 2), queries.expand(B, m, C)], dim=1)      # [B, 2m, C]
        # views are independent: a bounded number of tokens' worth of them at a time
        per = max(1, CHUNK_TOKENS // (2 * m))
        return torch.cat([self.model.model(part, m)[:, m:] for part in x.split(per)])    # [B, m, C]

    def forward_packed(self, sam_outs: list[torch.Tensor], plan) -> torch.Tensor:
        """SAM outputs [B, C, q, q] per view size (plan order) -> the query rows [sum of m, C] after the final
        norm: every view of the batch through the layers in one packed buffer."""
        views = []
        for s in sam_outs:
            B, C = s.shape[:2]
            m = s.shape[2] * s.shape[3]
            views.append(torch.cat([s.flatten(2).transpose(1, 2), self.queries(m).expand(B, m, C)], dim=1))
        x = torch.cat([v.reshape(-1, v.shape[-1]) for v in views])          # [B, 2m, C] each -> [T, C]
        return self.model.model.forward_packed(x, plan)

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        m = x.shape[2] * x.shape[3]
        x = torch.cat([x.flatten(2).transpose(1, 2), self.queries(m).expand(B, m, C)], dim=1)   # [B, 2m, C]
        per = max(1, CHUNK_TOKENS // (2 * m))
        return torch.cat([self.model.model.forward_cpu(part.contiguous(), m) for part in x.split(per)])


# ----------------------------------------------------------------------------------------------------------
# top level

def encode_views(enc, pixels: torch.Tensor, mark=None, fast: bool = False) -> torch.Tensor:
    """Views of one size [B, 3, S, S] -> projected tokens [B, (S/64)^2, n_embed], row-major per view, through
    the encoder's family: SAM -> CLIP -> projector of both (DeepSeek-OCR) or SAM -> Qwen2 -> projector
    (DeepSeek-OCR 2). `mark(stage)` is called after each stage when given (timing). fast: each module's
    `forward_cpu` (the CPU fast path, inference) instead of its `forward`."""
    mark = mark or (lambda stage: None)
    run = (lambda m, *args: m.forward_cpu(*args)) if fast else (lambda m, *args: m(*args))
    sam_out = run(enc.sam_model, pixels)                             # [B, C, q, q]
    mark("sam")
    if enc.family == "deepseek-ocr2":
        feats = run(enc.qwen2_model, sam_out)                        # [B, q*q, C]
        mark("qwen2")
    else:
        clip_out = run(enc.vision_model, pixels, sam_out)            # [B, 1 + q*q, C]
        mark("clip")
        feats = torch.cat([clip_out[:, 1:], sam_out.flatten(2).permute(0, 2, 1)], dim=-1)  # [B, q*q, 2C]
    out = run(enc.projector, feats)
    mark("layout")
    return out


def encode(enc, batch, timer, fast: bool = False) -> torch.Tensor:
    """The torch path (fast: the CPU fast path): Batch -> embeddings [total_tokens, n_embed], each view size
    through the encoder (`encode_views`), then every image's rows laid out (`layout_batch`). enc: a
    GundamEncoder."""
    groups = enc.pixel_groups(batch)                         # global views [n, 3, B, B], then crops if any
    patch = enc.config.sam.patch_size
    # the fast path takes a view size's views CPU_VIEW_TOKENS at a time: a batch of many pages keeps one page's
    # activations, its GEMMs still large
    per = [max(1, CPU_VIEW_TOKENS // (p.shape[-1] // patch) ** 2) if fast else len(p) for p in groups]
    tokens = [torch.cat([encode_views(enc, part, timer.mark, fast) for part in pixels.split(n)])
              for pixels, n in zip(groups, per)]
    newline = enc.image_newline.to(enc.dtype) if enc.family == "deepseek-ocr" else None
    out = layout_batch(batch.layouts, tokens[0], tokens[1] if len(tokens) > 1 else None, newline,
                       enc.view_seperator.to(enc.dtype))
    timer.mark("layout")
    return out


def build_modules(cfg: EncoderConfig | Ocr2Config) -> dict[str, nn.Module]:
    """The encoder's modules by their vendor names."""
    if isinstance(cfg, Ocr2Config):
        return {"sam_model": Sam(cfg.sam), "qwen2_model": Qwen2Encoder(cfg),
                "projector": Projector(cfg.projector.input_dim, cfg.projector.n_embed)}
    return {"sam_model": Sam(cfg.sam), "vision_model": Clip(cfg.clip),
            "projector": Projector(cfg.projector.input_dim, cfg.projector.n_embed)}
