"""The segmented attention's backward (AttentionFunction): kernel gradients against autograd through the torch
reference (fp64 in the interpreter: the kernels accumulate in fp64 for fp64 inputs), against the vendor's own
computation, gradcheck, determinism, what is saved for backward, and the errors."""
import pytest
import torch

import gundam.kernels.attention as attn_mod
from gundam.kernels.attention import attention, attention_reference
from gundam.kernels.compile_check import PRODUCTION_CASES, registered_configs
from gundam.kernels.segments import build_segments, pack_rel_pos
from gundam.kernels.tiling import choose_backward_config

from testutils import assert_close, attention_inputs, log_launches, vendor_block_attention

F64 = torch.float64


def _inputs(views, heads, head_dim, seed, **kw):
    """fp64 packed qkv, packed rel-pos tables, qkv bias and an output gradient for `views`."""
    return attention_inputs(views, heads, head_dim, seed, dtype=F64, rel_scale=0.3, **kw)


def _grads(fn, seg, tensors, dout, dtype=F64, **kw):
    """(out, [grad of qkv, rel_pos_h, rel_pos_w, qkv_bias]) of fn's output against dout, inputs cast to dtype."""
    leaves = [None if t is None else t.to(dtype).requires_grad_() for t in tensors]
    out = fn(leaves[0], seg, rel_pos_h=leaves[1], rel_pos_w=leaves[2], qkv_bias=leaves[3], **kw)
    out.backward(dout.to(out.dtype))
    return out, [None if t is None else t.grad for t in leaves]


def _check(views, heads, head_dim, seed, what, *, config=None, dtype=F64, tol=1e-10, **kw):
    """Kernel gradients (inputs in dtype) against autograd through the reference in fp64 on the same inputs."""
    seg, tensors, dout = _inputs(views, heads, head_dim, seed, **kw)
    tensors = [None if t is None else t.to(dtype).to(F64) for t in tensors]     # both see the rounded inputs
    dout = dout.to(dtype).to(F64)
    out, got = _grads(attention, seg, tensors, dout, dtype, config=config)
    ref_out, want = _grads(attention_reference, seg, tensors, dout)
    assert out.dtype == dtype
    assert_close(out, ref_out, tol * ref_out.abs().max().item(), tol, f"{what}: out")
    for name, g, w in zip(("dqkv", "d rel_pos_h", "d rel_pos_w", "d qkv_bias"), got, want):
        if w is None:
            assert g is None, f"{what}: {name}"
            continue
        assert g.dtype == dtype and g.shape == w.shape, f"{what}: {name} {g.dtype} {tuple(g.shape)}"
        assert_close(g, w, tol * max(w.abs().max().item(), 1e-30), tol, f"{what}: {name}")
    return seg, got, want


# ------------------------------------------------------------------------------------------ fp64 vs reference

def test_windows_with_padding():
    # window 3 on a 5x7 and a 4x4 view: padded keys at the bottom/right edges (the qkv bias: d qkv_bias non-zero)
    _, got, _ = _check([(0, 5, 7), (35, 4, 4)], 2, 16, seed=1, what="window 3 on 5x7 + 4x4", window=3)
    assert got[3].abs().sum() > 0 and torch.equal(got[3][:2 * 16], torch.zeros(2 * 16, dtype=F64))   # q part: 0


def test_windows_without_qkv_bias():
    # a bias-free qkv linear: padded keys are k = v = 0, still keys (they take softmax mass)
    _check([(0, 5, 6)], 2, 16, seed=2, what="window 4, no bias", window=4, bias=False)


def test_global_views_of_mixed_sizes():
    # 6x6 and 4x4 views in one table (1024- and 640-like), plus a non-square one: distinct Rh and Rw sizes
    _check([(0, 6, 6), (36, 4, 4), (52, 6, 6)], 2, 16, seed=3, what="global 6x6 + 4x4 + 6x6")
    _check([(0, 5, 7), (35, 3, 4)], 2, 16, seed=4, what="global non-square 5x7 + 3x4")


def test_clip_groups_with_class_token():
    # 1 + 25 and 1 + 9 tokens, no rel-pos, no padding: d qkv_bias is zero
    _, got, _ = _check([(0, 5, 5), (26, 3, 3)], 2, 16, seed=5, what="CLIP groups", class_token=True, rel=False)
    assert torch.equal(got[3], torch.zeros_like(got[3]))


@pytest.mark.parametrize("config", [
    # 16-row tail blocks in the dQ kernel, 2 x 8 key tiles everywhere, 16-query dK/dV steps
    dict(BLOCK_M=32, BWD_BLOCK_M=32, BWD_TAIL_M=16, BWD_BLOCK_KH=2, BWD_BLOCK_KW=8, KV_BLOCK_M=16, KV_BLOCK_KH=2,
         KV_BLOCK_KW=8),
    # one key tile per group in the dQ kernel (4 x 8 rows), tall 8 x 2 key tiles in the dK/dV kernel
    dict(BWD_BLOCK_M=16, BWD_BLOCK_KH=4, BWD_BLOCK_KW=8, KV_BLOCK_M=32, KV_BLOCK_KH=8, KV_BLOCK_KW=2),
])
def test_other_block_sizes(config):
    _check([(0, 5, 7), (35, 4, 4)], 2, 16, seed=6, what=f"windows {config}", window=3, config=config)
    _check([(0, 6, 6), (36, 5, 3)], 2, 16, seed=7, what=f"global {config}", config=config)


def test_tokens_outside_groups_get_zero_gradient_and_strided_qkv():
    # tokens 0..3 and 39..41 in no group; qkv a view of a wider linear output
    seg, tensors, dout = _inputs([(4, 5, 7)], 2, 16, seed=8, window=4, tokens=42)
    buf = torch.randn(42, 3 * 2 * 16 + 16, dtype=F64)
    buf[:, :96] = tensors[0].reshape(42, 96)
    qkv = buf[:, :96].view(42, 3, 2, 16).requires_grad_()
    out = attention(qkv, seg, rel_pos_h=tensors[1], rel_pos_w=tensors[2], qkv_bias=tensors[3])
    out.backward(dout)
    _, want = _grads(attention_reference, seg, tensors, dout)
    assert_close(qkv.grad, want[0], 1e-10, 1e-10, "strided qkv: dqkv")
    assert torch.equal(qkv.grad[:4], torch.zeros(4, 3, 2, 16, dtype=F64))
    assert torch.equal(qkv.grad[39:], torch.zeros(3, 3, 2, 16, dtype=F64))


def test_only_some_inputs_require_grad():
    seg, (qkv, rh, rw, b), dout = _inputs([(0, 5, 5)], 2, 16, seed=9, window=3)
    rh = rh.clone().requires_grad_()
    attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b).backward(dout)
    ref = rh.detach().clone().requires_grad_()
    attention_reference(qkv, seg, rel_pos_h=ref, rel_pos_w=rw, qkv_bias=b).backward(dout)
    assert_close(rh.grad, ref.grad, 1e-10, 1e-10, "d rel_pos_h alone")


# --------------------------------------------------------------------------------- the vendor's computation

def test_gradients_match_the_vendor_computation():
    # x -> qkv linear (the vendor pads x with zeros before it) -> windowed rel-pos attention, in fp64: gradients
    # of x, the qkv weight and bias and the rel-pos tables through the kernel equal those through the vendor's code
    g = torch.Generator().manual_seed(10)
    heads, hd, window = 2, 16, 4
    C = heads * hd
    sizes = [(6, 7), (5, 5)]
    xs = [torch.randn(h, w, C, generator=g, dtype=F64) for h, w in sizes]
    w_qkv = torch.randn(3 * C, C, generator=g, dtype=F64) * C ** -0.5
    b_qkv = torch.randn(3 * C, generator=g, dtype=F64) * 0.5
    rel_h = torch.randn(2 * window - 1, hd, generator=g, dtype=F64) * 0.3
    rel_w = torch.randn(2 * window - 1, hd, generator=g, dtype=F64) * 0.3
    douts = [torch.randn(h, w, C, generator=g, dtype=F64) for h, w in sizes]

    def leaves():
        return [t.clone().requires_grad_() for t in (*xs, w_qkv, b_qkv, rel_h, rel_w)]

    vend = leaves()
    loss = sum((vendor_block_attention(x[None], vend[2], vend[3], vend[4], vend[5], heads, window)[0] * d).sum()
               for x, d in zip(vend[:2], douts))
    loss.backward()

    ours = leaves()
    views, off = [], 0
    for h, w in sizes:
        views.append((off, h, w))
        off += h * w
    seg = build_segments(views, window)
    x = torch.cat([t.reshape(-1, C) for t in ours[:2]])
    qkv = (x @ ours[2].T + ours[3]).view(off, 3, heads, hd)
    out = attention(qkv, seg, rel_pos_h=pack_rel_pos([ours[4]], seg.rel_sizes_h),
                    rel_pos_w=pack_rel_pos([ours[5]], seg.rel_sizes_w), qkv_bias=ours[3])
    (out * torch.cat([d.reshape(-1, C) for d in douts])).sum().backward()
    for name, a, b in zip(("x0", "x1", "w_qkv", "b_qkv", "rel_pos_h", "rel_pos_w"), ours, vend):
        assert_close(a.grad, b.grad, 1e-10, 1e-10, f"vs vendor: d {name}")


# ------------------------------------------------------------------------------ lower precision vs fp64 ref

@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_low_precision_against_fp64(dtype, tol):
    # fresh random inputs, non-power-of-two shapes; errors relative to each gradient's largest entry
    _check([(0, 7, 5), (35, 4, 6)], 3, 16, seed=11, what=f"{dtype} windows", dtype=dtype, tol=tol, window=3)
    _check([(0, 7, 7), (49, 5, 5)], 3, 32, seed=12, what=f"{dtype} global", dtype=dtype, tol=tol)
    _check([(0, 5, 5), (26, 3, 3)], 2, 16, seed=13, what=f"{dtype} CLIP", dtype=dtype, tol=tol, class_token=True,
           rel=False)


# ------------------------------------------------------------------------------------- gradcheck, determinism

def test_gradcheck():
    seg, tensors, _ = _inputs([(0, 3, 4)], 1, 16, seed=14, window=2)
    leaves = [t.clone().requires_grad_() for t in tensors]

    def f(qkv, rh, rw, b):
        return attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)

    assert torch.autograd.gradcheck(f, leaves, fast_mode=True)


def test_backward_is_deterministic():
    seg, tensors, dout = _inputs([(0, 5, 7)], 2, 16, seed=15, window=3)
    tensors = [t.float() for t in tensors]
    _, first = _grads(attention, seg, tensors, dout, torch.float32)
    _, second = _grads(attention, seg, tensors, dout, torch.float32)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------- what backward keeps, launches

def test_saved_for_backward_is_small():
    # qkv, out, the log-sum-exp [heads, T] and the small tables: no N x N tensor, no per-token rel-pos tables
    seg, (qkv, rh, rw, b), _ = _inputs([(0, 8, 8), (64, 6, 6)], 2, 16, seed=16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attention(qkv.requires_grad_(), seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b)
    T = qkv.shape[0]
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([tuple(qkv.shape), tuple(out.shape), (2, T), tuple(rh.shape), tuple(rw.shape),
                             tuple(b.shape)]), shapes
    lse = next(t for t in saved if tuple(t.shape) == (2, T))
    assert lse.dtype == F64
    # the log-sum-exp of each query's scores, from the reference's materialised logits
    q, k = qkv[:64, 0, 0].detach(), qkv[:64, 1, 0].detach()
    ys, xs = torch.arange(64) // 8, torch.arange(64) % 8
    logits = q @ k.T * 16 ** -0.5
    logits = logits + (q[:, None, :] * rh[11:26][ys[:, None] - ys[None, :] + 7]).sum(-1)   # 8's table after 6's 11 rows
    logits = logits + (q[:, None, :] * rw[11:26][xs[:, None] - xs[None, :] + 7]).sum(-1)
    assert_close(lse[0, :64], torch.logsumexp(logits, -1), 1e-10, 1e-10, "log-sum-exp")


def test_backward_launches(monkeypatch):
    # rel-pos projections recomputed, dQ (+ dRel), dK/dV, rel-pos backward per axis; grids (programs, heads)
    calls = []
    log_launches(monkeypatch, calls, [attn_mod])
    seg, tensors, dout = _inputs([(0, 9, 9), (81, 5, 5)], 2, 16, seed=17, window=6)
    _grads(attention, seg, [t.float() for t in tensors], dout, torch.float32)
    assert [c[0] for c in calls] == ["_relpos_kernel", "_attention_kernel", "_relpos_kernel",
                                     "_attention_bwd_dq_kernel", "_attention_bwd_dkdv_kernel", "_relpos_bwd_kernel",
                                     "_relpos_bwd_kernel"], calls
    # 5 windows of 6 x 6 = 36 queries: one query block (dQ, rel-pos backward) and its key tiles (dK/dV) each
    cfg = choose_backward_config(seg, 16, torch.float32)
    tiles = -(-6 // cfg["KV_BLOCK_KH"]) * -(-6 // cfg["KV_BLOCK_KW"])
    assert calls[3][1] == (5, 2) and calls[4][1] == (5 * tiles, 2) and calls[5][1] == (5, 2), calls


# -------------------------------------------------------------------------------------------------- errors

def test_errors():
    seg, (qkv, rh, rw, b), _ = _inputs([(0, 6, 6)], 2, 16, seed=18, window=4)
    qkv = qkv.float().requires_grad_()
    rh, rw, b = rh.float(), rw.float(), b.float()
    with pytest.raises(ValueError, match=r"attention: out= given while autograd records, expected out=None"):
        attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b, out=torch.empty(36, 32))
    with torch.no_grad():      # inference: out= is fine
        attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, qkv_bias=b, out=torch.empty(36, 32))
    with pytest.raises(ValueError, match=r"config BWD_BLOCK_KW=2, expected >= 4 \(the widest group"):
        attention(qkv, seg, rel_pos_h=rh, rel_pos_w=rw, config=dict(BWD_BLOCK_KH=8, BWD_BLOCK_KW=2))
    with pytest.raises(ValueError, match=r"BWD_BLOCK_M=16, BWD_TAIL_M=32, .* expected 16 <= BWD_TAIL_M"):
        attention(qkv, seg, config=dict(BWD_BLOCK_M=16, BWD_TAIL_M=32))
    with pytest.raises(ValueError, match=r"config KV_BLOCK_M=8, .* expected both >= 16"):
        attention(qkv, seg, config=dict(KV_BLOCK_M=8))
    with pytest.raises(ValueError, match=r"config kv_num_warps=3, expected a power of two"):
        attention(qkv, seg, config=dict(kv_num_warps=3))
    with pytest.raises(TypeError, match=r"rel_pos_h has dtype torch.float64, expected torch.float32"):
        attention(qkv, seg, rel_pos_h=rh.double(), rel_pos_w=rw)


def test_backward_kernels_are_registered_for_the_compile_check():
    # tests/test_compile.py builds every registered entry for sm_80 and sm_90 (spills, ptxas warnings, MMA)
    names = {e["name"] for e in registered_configs()}
    for case, *_ in PRODUCTION_CASES:
        for kind in ("attention-lse", "attention-bwd-dq", "attention-bwd-dkdv"):
            assert f"{kind}/{case}/bf16" in names, (kind, case)
    for case in ("global-1024", "window-14"):
        for axis in "hw":
            assert f"attention-bwd-relpos-{case}-{axis}/bf16" in names, (case, axis)
    # fp16 builds the same code with other MMA types: one entry per backward kernel
    for name in ("attention-bwd-dq/sam-global-1024", "attention-bwd-dkdv/sam-global-1024",
                 "attention-bwd-relpos-global-1024-h"):
        assert f"{name}/fp16" in names, name
