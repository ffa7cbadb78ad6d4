"""prefix_attention (DeepSeek-OCR 2's Qwen2 encoder attention: packed views, GQA, prefix mask, fused RoPE) in
Triton's interpreter against its fp64 torch reference: forward, LSE, the mask's property, backward, errors;
and (tests/test_compile.py) the production configs compile for sm_80 / sm_90 without spills or ptxas
warnings."""
import pytest
import torch

from gundam.kernels.prefix_attention import (build_prefix_segments, prefix_attention, prefix_attention_lse,
                                             prefix_attention_reference)
from gundam.kernels.prefix_segments import row_blocks
from gundam.model import apply_rope, prefix_mask, rope_tables

from testutils import DTYPES, assert_close

VIEWS = [9, 16, 5]          # m per view: non-powers of two, a view shorter than a block
SMALL = dict(BLOCK_M=16, BLOCK_N=16, BWD_BLOCK_M=16, BWD_BLOCK_N=16, KV_BLOCK_M=16, KV_BLOCK_N=16)
CONFIGS = [
    pytest.param(SMALL, id="16x16"),
    pytest.param(dict(BLOCK_M=32, BLOCK_N=16, BWD_BLOCK_M=32, BWD_BLOCK_N=16, KV_BLOCK_M=16, KV_BLOCK_N=32),
                 id="M32-N16"),      # a query block's masked stage spans several key blocks; BLOCK_N > BLOCK_M
    pytest.param(None, id="default"),
]


def _inputs(views, H, KV, D, dtype, seed=0, *, extra_tokens=0, fused=False):
    """Random q [T, H, D], k, v [T, KV, D] (fused: views of one [T, (H + 2 KV) D] linear output), segments
    and fp32 RoPE tables (rope_theta 1e6, as the model)."""
    g = torch.Generator().manual_seed(seed)
    seg = build_prefix_segments(views)
    T = seg.end_token + extra_tokens
    if fused:
        x = torch.randn(T, (H + 2 * KV) * D, generator=g).to(dtype)
        q = x[:, :H * D].view(T, H, D)
        k = x[:, H * D:(H + KV) * D].view(T, KV, D)
        v = x[:, (H + KV) * D:].view(T, KV, D)
    else:
        q = torch.randn(T, H, D, generator=g).to(dtype)
        k = torch.randn(T, KV, D, generator=g).to(dtype)
        v = torch.randn(T, KV, D, generator=g).to(dtype)
    cos, sin = rope_tables(seg.max_len + 3, D, 1e6, torch.float32, "cpu")
    return q, k, v, seg, cos, sin


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize("config", CONFIGS)
def test_forward(dtype, atol, rtol, D, config):
    q, k, v, seg, cos, sin = _inputs(VIEWS, 4, 2, D, dtype, extra_tokens=3)
    got = prefix_attention(q, k, v, seg, cos, sin, config=config)
    want = prefix_attention_reference(q, k, v, seg, cos, sin)
    assert got.dtype == dtype and got.shape == (q.shape[0], 4 * D)
    assert_close(got, want, atol, rtol, f"out {dtype} D={D}")
    assert torch.all(got[seg.end_token:] == 0)          # tokens outside every view


def test_forward_longer_views_fused_strides():
    """Views longer than the default blocks (several key blocks in both stages), q/k/v as row-strided views of
    one fused linear output, 7 query heads per kv head, a custom scale."""
    q, k, v, seg, cos, sin = _inputs([37, 70], 14, 2, 32, torch.float32, fused=True)
    got = prefix_attention(q, k, v, seg, cos, sin, scale=0.3)
    want = prefix_attention_reference(q, k, v, seg, cos, sin, scale=0.3)
    assert_close(got, want, 1e-5, 1e-5, "out fused")


def test_reference_matches_model_attention():
    """The reference is Qwen2Attention's computation (apply_rope, repeat_interleave of kv heads, SDPA with
    prefix_mask) on one view."""
    m, H, KV, D = 6, 4, 2, 16
    q, k, v, seg, cos, sin = _inputs([m], H, KV, D, torch.float64)
    qs, ks, vs = (t.transpose(0, 1)[None] for t in (q, k, v))           # [1, heads, 2m, D]
    c, s = cos[:2 * m].double(), sin[:2 * m].double()
    qs, ks = apply_rope(qs, c, s), apply_rope(ks, c, s)
    ks, vs = ks.repeat_interleave(H // KV, dim=1), vs.repeat_interleave(H // KV, dim=1)
    o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=prefix_mask(m, "cpu"))
    want = o[0].transpose(0, 1).reshape(2 * m, H * D)
    assert_close(prefix_attention_reference(q, k, v, seg, cos, sin), want, 1e-12, 1e-12, "reference vs model")


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x16", "default"])
def test_lse(config):
    H, KV, D = 4, 2, 16
    q, k, v, seg, cos, sin = _inputs(VIEWS, H, KV, D, torch.float32)
    out, lse = prefix_attention_lse(q, k, v, seg, cos, sin, config=config)
    assert lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
    for off, m in zip(seg.offsets, seg.view_lengths):
        n = 2 * m
        c, s = cos[:n].double(), sin[:n].double()
        qs = apply_rope(q[off:off + n].double().transpose(0, 1), c, s)
        ks = apply_rope(k[off:off + n].double().transpose(0, 1), c, s).repeat_interleave(H // KV, dim=0)
        logits = (qs @ ks.transpose(1, 2)) * D ** -0.5
        want = logits.masked_fill(~prefix_mask(m, "cpu"), float("-inf")).logsumexp(-1)     # [H, n]
        assert_close(lse[:, off:off + n], want, 1e-5, 1e-5, f"lse view m={m}")
    assert_close(out, prefix_attention_reference(q, k, v, seg, cos, sin), 1e-5, 1e-5, "out with lse")


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x16", "default"])
def test_mask_property(config):
    """Row r's output does not change when the tokens after r change (queries r+1.. of its view, and other
    views); visual rows do not change when any query token changes."""
    views = [9, 16]
    q, k, v, seg, cos, sin = _inputs(views, 4, 2, 16, torch.float32)
    base = prefix_attention(q, k, v, seg, cos, sin, config=config)
    off, m = seg.offsets[1], seg.view_lengths[1]
    g = torch.Generator().manual_seed(7)
    for r in (m - 1, m, m + 5, 2 * m - 2):          # last visual row, first query, a middle and the next-to-last
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for t in (q2, k2, v2):
            t[off + r + 1:off + 2 * m] = torch.randn(t[off + r + 1:off + 2 * m].shape, generator=g) * 3
        got = prefix_attention(q2, k2, v2, seg, cos, sin, config=config)
        visible = max(r, m - 1)                      # rows up to here see none of the changed tokens
        assert torch.equal(got[off:off + visible + 1], base[off:off + visible + 1]), f"row {r}"
        assert torch.equal(got[:off], base[:off]), "another view changed"
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):                           # every query token of both views
        for o, mm in zip(seg.offsets, seg.view_lengths):
            t[o + mm:o + 2 * mm] = torch.randn(t[o + mm:o + 2 * mm].shape, generator=g) * 3
    got = prefix_attention(q2, k2, v2, seg, cos, sin, config=config)
    for o, mm in zip(seg.offsets, seg.view_lengths):
        assert torch.equal(got[o:o + mm], base[o:o + mm]), f"visual rows of view m={mm}"


def _grads(fn, q, k, v, seg, cos, sin, dout, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, seg, cos, sin, **kw)
    return torch.autograd.grad(out, (q, k, v), dout)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 1e-2)])
@pytest.mark.parametrize("D", [16, 32])
@pytest.mark.parametrize("config", CONFIGS)
def test_backward(dtype, tol, D, config):
    H, KV = 4, 2
    q, k, v, seg, cos, sin = _inputs(VIEWS, H, KV, D, dtype, seed=1, extra_tokens=2)
    dout = torch.randn(q.shape[0], H * D, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = _grads(prefix_attention, q, k, v, seg, cos, sin, dout, config=config)
    want = _grads(prefix_attention_reference, q, k, v, seg, cos, sin, dout)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, tol, tol, f"{name} {dtype} D={D}")


def test_backward_fused_strides_deterministic():
    """Gradients through row-strided views of one fused output (7 query heads per kv head) in fp64, and two
    backwards are bit-identical (no atomics)."""
    q, k, v, seg, cos, sin = _inputs([11, 6], 14, 2, 16, torch.float64, seed=3, fused=True)
    dout = torch.randn(q.shape[0], 14 * 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BWD_BLOCK_M=16, BWD_BLOCK_N=16, KV_BLOCK_M=16, KV_BLOCK_N=16)
    got = _grads(prefix_attention, q, k, v, seg, cos, sin, dout, config=cfg)
    again = _grads(prefix_attention, q, k, v, seg, cos, sin, dout, config=cfg)
    want = _grads(prefix_attention_reference, q, k, v, seg, cos, sin, dout)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, again):
        assert_close(a, b, 1e-10, 1e-10, name)
        assert torch.equal(a, c), f"{name} not deterministic"


def test_segments():
    seg = build_prefix_segments([3, 2])
    assert seg.offsets == (0, 6) and seg.end_token == 10 and seg.max_len == 6
    assert row_blocks(3, 2) == [(0, 3), (2, 3), (3, 6), (5, 6)]      # blocks never straddle the visual / query edge
    assert seg.program_table(2).tolist() == [[0, 3, 0, 3], [0, 3, 2, 3], [0, 3, 3, 6], [0, 3, 5, 6],
                                             [6, 2, 0, 2], [6, 2, 2, 4]]
    for bad in ([0], [2.0], [True], [-1]):
        with pytest.raises(ValueError, match="build_prefix_segments: view length"):
            build_prefix_segments(bad)


def test_errors():
    q, k, v, seg, cos, sin = _inputs([4, 3], 4, 2, 16, torch.float32)
    T = q.shape[0]
    fn = prefix_attention
    cases = [
        (TypeError, "q has dtype torch.int32", dict(q=q.int())),
        (ValueError, r"q has shape \(14, 4, 16, 1\), expected 3 dims", dict(q=q[..., None])),
        (ValueError, "q has head_dim 24", dict(q=torch.zeros(T, 4, 24), k=torch.zeros(T, 2, 24),
                                               v=torch.zeros(T, 2, 24))),
        (TypeError, "k has dtype torch.float16", dict(k=k.half())),
        (ValueError, r"k has shape \(13, 2, 16\), expected \(14, \*, 16\)", dict(k=k[:-1])),
        (ValueError, r"v has shape \(14, 1, 16\), expected \(14, 2, 16\)", dict(v=v[:, :1])),
        (ValueError, "q has 4 heads and k 3 kv heads, expected a multiple", dict(k=torch.zeros(T, 3, 16),
                                                                              v=torch.zeros(T, 3, 16))),
        (ValueError, "q has strides .* expected a contiguous last dim", dict(q=q.transpose(1, 2).contiguous()
                                                                              .transpose(1, 2)[:, :, :16])),
        (TypeError, "segments is a list, expected PrefixSegments", dict(segments=[4, 3])),
        (ValueError, "segments reach token 16, expected at most q's 14", dict(segments=build_prefix_segments([4, 4]))),
        (TypeError, "cos has dtype torch.float64", dict(cos=cos.double())),
        (ValueError, r"sin has shape \(7, 16\), expected \(>= 8, 16\)", dict(sin=sin[:7])),
        (ValueError, r"scale=-1.0, expected a positive float", dict(scale=-1.0)),
        (ValueError, r"config keys \['BLOCK_Q'\] unknown", dict(config=dict(BLOCK_Q=16))),
        (ValueError, "config BLOCK_N=8, expected >= 16", dict(config=dict(BLOCK_N=8))),
        (ValueError, "config BLOCK_M=24, expected a power of two", dict(config=dict(BLOCK_M=24))),
    ]
    for exc, msg, override in cases:
        args = dict(q=q, k=k, v=v, segments=seg, cos=cos, sin=sin)
        args.update(override)
        kw = {n: args.pop(n) for n in ("scale", "config") if n in args}
        with pytest.raises(exc, match="^prefix_attention: " + msg) as e:
            fn(*args.values(), **kw)
        assert "\n" not in str(e.value)
