"""Microbenchmark: the segmented attention kernel vs the vendor's SDPA with a materialised rel-pos bias, vs
SDPA's flash backend on the same groups without any bias, and flex_attention where available.

    python bench/attention.py [--dtype bf16]     # GPU: triton.testing.do_bench medians
    python bench/attention.py --sweep            # also time a few block-size configs per case
    python bench/attention.py --smoke            # CPU, Triton interpreter, tiny shapes: same code paths

Cases (SAM ViT-B attention, 12 heads, head_dim 64):
  global-1024          one 1024 view's global block: 64 x 64 = 4096 tokens
  global-640           one 640 view's global block: 40 x 40 = 1600 tokens
  windows-gundam-3x2   the 14 x 14 windows of a Gundam 3x2 batch (6 crops 40 x 40 + the 64 x 64 global view):
                       79 windows, all in one launch for the kernel
  global-gundam-3x2    the global blocks of the same batch (7 views of two sizes) in one launch
TFLOP/s counts q.k and p.v of every group at its padded size (4 * N^2 * head_dim per head), the work all
methods do. Targets (H100, bf16): global-1024 >= 60% of flash, >= 3x the materialised-bias SDPA;
windows >= 50% of flash.
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from benchutil import peak_cuda_mb  # noqa: E402
from gundam.kernels.attention import attention, build_segments, choose_config, pack_rel_pos

CASES = {   # name: (view sides, window)
    "global-1024": ([64], None),
    "global-640": ([40], None),
    "windows-gundam-3x2": ([40] * 6 + [64], 14),
    "global-gundam-3x2": ([40] * 6 + [64], None),
}
# --sweep candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages); the key tile shape follows choose_config
SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4),
         (128, 128, 8, 2), (128, 32, 4, 3)]
SMOKE_SWEEP = [(16, 16, 4, 1), (32, 32, 4, 1)]
SMOKE_CASES = {
    "global-1024": ([8], None),
    "global-640": ([5], None),
    "windows-gundam-3x2": ([6] * 2 + [8], 4),
    "global-gundam-3x2": ([6] * 2 + [8], None),
}


def make_inputs(sides, window, heads, head_dim, dtype, device, seed=0):
    """Packed qkv of square views, their segment table, packed rel-pos tables, per-size tables, qkv bias."""
    g = torch.Generator().manual_seed(seed)
    views, off = [], 0
    for s in sides:
        views.append((off, s, s))
        off += s * s
    seg = build_segments(views, window, device=device)
    qkv = torch.randn(off, 3, heads, head_dim, generator=g).to(device=device, dtype=dtype)
    sizes = seg.rel_sizes_h
    tables = {s: ((torch.randn(2 * s - 1, head_dim, generator=g) * 0.1).to(device=device, dtype=dtype),
                  (torch.randn(2 * s - 1, head_dim, generator=g) * 0.1).to(device=device, dtype=dtype))
              for s in sizes}
    rel_h = pack_rel_pos([tables[s][0] for s in sizes], sizes)
    rel_w = pack_rel_pos([tables[s][1] for s in sizes], sizes)
    qkv_bias = (torch.randn(3 * heads * head_dim, generator=g) * 0.1).to(device=device, dtype=dtype)
    return dict(qkv=qkv, seg=seg, views=views, window=window, rel_h=rel_h, rel_w=rel_w, tables=tables,
                qkv_bias=qkv_bias)


def partition(inp):
    """The vendor's layout per view size: [B', heads, N, hd] q, k, v (windows padded with the qkv bias)."""
    qkv, window, bias = inp["qkv"], inp["window"], inp["qkv_bias"]
    T, _, heads, hd = qkv.shape
    groups = []
    for side in sorted({h for _, h, _ in inp["views"]}):
        offs = [o for o, h, _ in inp["views"] if h == side]
        x = torch.stack([qkv[o:o + side * side] for o in offs]).view(len(offs), side, side, 3 * heads * hd)
        S = window or side
        if window:
            Hp = -(-side // window) * window
            xp = bias.expand(len(offs), Hp, Hp, 3 * heads * hd).clone()    # padded positions: linear(0) = bias
            xp[:, :side, :side] = x
            x = xp.view(len(offs), Hp // S, S, Hp // S, S, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, S, S, 3 * heads * hd)
        q, k, v = x.reshape(x.shape[0], S * S, 3, heads, hd).permute(2, 0, 3, 1, 4).unbind(0)   # [B', heads, N, hd]
        groups.append(dict(side=side, offs=offs, S=S, q=q, k=k, v=v))
    return groups


def rel_terms(q, Rh, Rw, S):
    """rel_h, rel_w [B', heads, N, S] as the vendor's einsums compute them."""
    idx = torch.arange(S, device=q.device)
    rel = idx[:, None] - idx[None, :] + S - 1
    r_q = q.reshape(q.shape[0], q.shape[1], S, S, q.shape[-1])
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, Rh[rel]).reshape(q.shape[0], q.shape[1], S * S, S)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, Rw[rel]).reshape(q.shape[0], q.shape[1], S * S, S)
    return rel_h, rel_w


def unpartition(o, grp, window, out):
    """[B', heads, N, hd] -> rows of the packed output."""
    side, S, offs = grp["side"], grp["S"], grp["offs"]
    B, C = len(offs), o.shape[1] * o.shape[3]
    o = o.transpose(1, 2).reshape(-1, S, S, C)
    if window:
        Hp = -(-side // window) * window
        o = o.view(B, Hp // S, Hp // S, S, S, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Hp, C)[:, :side, :side]
    for i, off in enumerate(offs):
        out[off:off + side * side] = o[i].reshape(side * side, C)


def vendor_sdpa(inp):
    """The vendor's path: partition copies, materialised [B', heads, N, N] bias, SDPA, unpartition."""
    qkv = inp["qkv"]
    out = torch.empty(qkv.shape[0], qkv.shape[2] * qkv.shape[3], device=qkv.device, dtype=qkv.dtype)
    for grp in partition(inp):
        Rh, Rw = inp["tables"][grp["S"]]
        rel_h, rel_w = rel_terms(grp["q"], Rh, Rw, grp["S"])
        B, nh, N, S = rel_h.shape
        bias = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(B, nh, N, N)   # heads x N x N per group
        o = F.scaled_dot_product_attention(grp["q"], grp["k"], grp["v"], attn_mask=bias)
        unpartition(o, grp, inp["window"], out)
    return out


def flash_no_bias(groups):
    """SDPA (flash backend on a GPU) on the already partitioned groups, without bias: the speed yardstick."""
    if torch.cuda.is_available():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return [F.scaled_dot_product_attention(g["q"], g["k"], g["v"]) for g in groups]
    return [F.scaled_dot_product_attention(g["q"], g["k"], g["v"]) for g in groups]


def make_flex(inp):
    """flex_attention with the decomposed bias as a score_mod (rel terms precomputed inside the timing)."""
    from torch.nn.attention.flex_attention import flex_attention
    flex = torch.compile(flex_attention, dynamic=False)
    groups = partition(inp)

    def run():
        outs = []
        for grp in groups:
            Rh, Rw = inp["tables"][grp["S"]]
            rel_h, rel_w = rel_terms(grp["q"], Rh, Rw, grp["S"])
            S = grp["S"]

            def score_mod(score, b, h, q_idx, kv_idx):
                return score + (rel_h[b, h, q_idx, kv_idx // S] + rel_w[b, h, q_idx, kv_idx % S]).to(score.dtype)
            outs.append(flex(grp["q"], grp["k"], grp["v"], score_mod=score_mod))
        return outs
    return run


def timeit(fn, smoke):
    if smoke:                        # interpreter on CPU: a couple of wall-clock runs
        fn()
        times = []
        for _ in range(2):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)
    import triton.testing
    return triton.testing.do_bench(fn, return_mode="median")


def flops(inp, head_dim, heads):
    rows = inp["seg"].rows.cpu()
    n = (rows[:, 5] * rows[:, 6]).double()
    return float((4 * n * n).sum()) * head_dim * heads


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--case", default="", help="only cases whose name contains this")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP block-size configs")
    args = ap.parse_args()

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--smoke runs the kernel in Triton's interpreter: set TRITON_INTERPRET=1")
        device, dtype, heads, head_dim, cases = "cpu", torch.float32, 2, 16, SMOKE_CASES
    else:
        if not torch.cuda.is_available():
            sys.exit("no GPU: run with --smoke (and TRITON_INTERPRET=1) to exercise the code paths on CPU")
        device, heads, head_dim, cases = "cuda", 12, 64, CASES
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tol = 1e-4 if dtype == torch.float32 else 5e-2

    print(f"{'case':20s} {'method':25s} {'ms':>9s} {'TFLOP/s':>8s} {'vs flash':>8s} {'peak MB':>8s}")
    bad = False
    for name, (sides, window) in cases.items():
        if args.case not in name:
            continue
        inp = make_inputs(sides, window, heads, head_dim, dtype, device)
        groups = partition(inp)
        ours = lambda: attention(inp["qkv"], inp["seg"], rel_pos_h=inp["rel_h"], rel_pos_w=inp["rel_w"],
                                 qkv_bias=inp["qkv_bias"])
        methods = [("triton segmented", ours), ("sdpa + materialised bias", lambda: vendor_sdpa(inp)),
                   ("sdpa flash, no bias", lambda: flash_no_bias(groups))]
        if args.sweep:
            for bm, bn, nw, ns in (SMOKE_SWEEP if args.smoke else SWEEP):
                cfg = choose_config(inp["seg"], head_dim, dtype, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
                label = f"  M{bm} N{cfg['BLOCK_KH']}x{cfg['BLOCK_KW']} w{nw} s{ns}"
                methods.append((label, lambda cfg=cfg: attention(inp["qkv"], inp["seg"], rel_pos_h=inp["rel_h"],
                                                                 rel_pos_w=inp["rel_w"], qkv_bias=inp["qkv_bias"],
                                                                 config=cfg)))
        if not args.smoke:
            try:
                methods.append(("flex_attention", make_flex(inp)))
            except Exception as e:          # older torch, no compiler toolchain, ...
                print(f"{name:20s} {'flex_attention':25s} n/a ({type(e).__name__})")

        err = (ours().double() - vendor_sdpa(inp).double()).abs().max().item()
        if not err <= tol:
            bad = True
        fl = flops(inp, head_dim, heads)
        results = []
        for mname, fn in methods:
            try:
                ms = timeit(fn, args.smoke)
            except Exception as e:
                print(f"{name:20s} {mname:25s} n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
                continue
            results.append((mname, ms, peak_cuda_mb(fn)))
        flash_ms = next((ms for m, ms, _ in results if m.startswith("sdpa flash")), float("nan"))
        for mname, ms, mb in results:
            print(f"{name:20s} {mname:25s} {ms:9.3f} {fl / ms / 1e9:8.3f} {flash_ms / ms:8.2f} {mb:8.1f}")
        print(f"{name:20s} max |triton - vendor sdpa| = {err:.2e}" + ("  <-- MISMATCH" if err > tol else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
