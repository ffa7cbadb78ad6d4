"""Microbenchmark: the segmented attention kernel vs the vendor's SDPA with a materialised rel-pos bias, vs
SDPA's flash backend on the same groups without any bias (a bound: no bias, no padding keys to look up), and
flex_attention with the bias as a score_mod where available.

    python bench/attention.py [--dtype bf16] [--seconds 1] [--json attention.json]
    python bench/attention.py --sweep            # also time a few block-size configs per case
    python bench/attention.py --smoke            # CPU, Triton interpreter, tiny shapes: the same code paths

Cases (SAM ViT-B attention, 12 heads, head_dim 64):
  global-1024          one 1024 view's global block: 64 x 64 = 4096 tokens
  global-640           one 640 view's global block: 40 x 40 = 1600 tokens
  windows-gundam-3x2   the 14 x 14 windows of a Gundam 3x2 page (6 crops 40 x 40 + the 64 x 64 global view):
                       79 windows, all in one launch for the kernel
  global-gundam-3x2    the global blocks of the same page (7 views of two sizes) in one launch
  ... and the same two for 8 pages (batch 8).
Each point is timed over at least --seconds of repetitions (triton.testing.do_bench, L2 flushed between runs):
min and median ms. TFLOP/s counts the useful work, q.k and p.v of every group at its size
(4 * N^2 * head_dim per head), the same for every method; "padding" is the kernel's issued / useful
tensor-core work (gundam.kernels.tiling.mma_work). Also printed: GPU, torch / triton / CUDA versions, the
SDPA implementation the baseline ran, the kernel's max error against it, and peak memory.

`run(args)` (args from `parse_args`) does the measuring and returns what --json writes: bench/gpu.py calls it.
"""
import argparse
import json
import os
import sys
import time

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchutil import bench_ms, environment, peak_cuda_mb, sdpa_backends  # noqa: E402
from gundam.kernels.attention import attention  # noqa: E402
from gundam.kernels.segments import SEG_GH, SEG_GW, build_segments, pack_rel_pos  # noqa: E402
from gundam.kernels.tiling import choose_config, mma_work  # noqa: E402

PAGE = [40] * 6 + [64]          # a Gundam 3x2 page: six 640 crops and the 1024 global view, SAM token grids
CASES = {   # name: (view sides, window)
    "global-1024": ([64], None),
    "global-640": ([40], None),
    "windows-gundam-3x2": (PAGE, 14),
    "global-gundam-3x2": (PAGE, None),
    "windows-gundam-3x2-x8": (PAGE * 8, 14),
    "global-gundam-3x2-x8": (PAGE * 8, None),
}
SMOKE_CASES = {
    "global-1024": ([8], None),
    "global-640": ([5], None),
    "windows-gundam-3x2": ([6, 8], 4),
    "global-gundam-3x2": ([6] * 2 + [8], None),
}
# --sweep candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages); the key tile shape follows choose_config
SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 4),
         (128, 128, 8, 2), (128, 32, 4, 3), (64, 32, 4, 3)]
SMOKE_SWEEP = [(32, 32, 4, 1)]


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
    """flex_attention with the decomposed bias as a score_mod (rel terms computed inside the timing)."""
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
    run()       # compile outside the timing
    return run


def useful_flops(seg, head_dim, heads):
    """q.k and p.v of every group at its size: 4 * N^2 * head_dim per head."""
    n = (seg.rows[:, SEG_GH] * seg.rows[:, SEG_GW]).double()      # queries (and keys) per group
    return float((4 * n * n).sum()) * head_dim * heads


def padding(seg, cfg):
    issued, useful = mma_work(seg.group_shapes, cfg["BLOCK_M"], cfg["TAIL_M"], cfg["BLOCK_KH"], cfg["BLOCK_KW"])
    return issued / useful


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU in the Triton interpreter")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--case", default="", help="only cases whose name contains this")
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP block-size configs")
    ap.add_argument("--seconds", type=float, default=1.0, help="repetitions per point, seconds (default 1)")
    ap.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak to compare with")
    ap.add_argument("--no-flex", action="store_true", help="leave out flex_attention (it compiles per shape)")
    ap.add_argument("--budget", type=float, default=0.0, help="start no new case after this many seconds "
                                                              "(0: no limit); skipped cases are listed")
    ap.add_argument("--json", help="write results here")
    return ap.parse_args(argv)


def run(args) -> dict:
    if args.smoke:
        device, dtype, heads, head_dim, cases, seconds = torch.device("cpu"), torch.float32, 2, 16, SMOKE_CASES, 0.0
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/attention.py needs a CUDA GPU (use --smoke to run its code paths on CPU)")
        device, heads, head_dim, cases, seconds = torch.device("cuda"), 12, 64, CASES, args.seconds
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    env = environment(device)
    print("  ".join(f"{k} {v}" for k, v in env.items()) + f"  dtype {str(dtype).removeprefix('torch.')}")

    print(f"{'case':22s} {'method':26s} {'min ms':>9s} {'med ms':>9s} {'TFLOP/s':>8s} {'of peak':>7s} "
          f"{'vs flash':>8s} {'peak MB':>8s}  padding / config")
    rows, bad, skipped = [], False, []
    t_end = time.monotonic() + args.budget if args.budget > 0 else float("inf")
    for name, (sides, window) in cases.items():
        if args.case not in name:
            continue
        if time.monotonic() > t_end:
            skipped.append(f"{name}: time budget ({args.budget:g} s) spent")
            continue
        inp = make_inputs(sides, window, heads, head_dim, dtype, device)
        seg, groups = inp["seg"], partition(inp)

        def ours(cfg=None):
            return attention(inp["qkv"], seg, rel_pos_h=inp["rel_h"], rel_pos_w=inp["rel_w"],
                             qkv_bias=inp["qkv_bias"], config=cfg)
        default = choose_config(seg, head_dim, dtype)
        methods = [("triton segmented", ours, default), ("sdpa + materialised bias", lambda: vendor_sdpa(inp), None),
                   ("sdpa flash, no bias", lambda: flash_no_bias(groups), None)]
        if args.sweep:
            for bm, bn, nw, ns in (SMOKE_SWEEP if args.smoke else SWEEP):
                cfg = choose_config(seg, head_dim, dtype, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns)
                label = f"  M{bm}+{cfg['TAIL_M']} N{cfg['BLOCK_KH']}x{cfg['BLOCK_KW']} w{nw} s{ns}"
                methods.append((label, lambda cfg=cfg: ours(cfg), cfg))
        if not args.smoke and not args.no_flex:
            try:
                methods.append(("flex_attention", make_flex(inp), None))
            except Exception as e:          # older torch, no compiler toolchain, ...
                print(f"{name:22s} {'flex_attention':26s} n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})")

        err = (ours().double() - vendor_sdpa(inp).double()).abs().max().item()
        bad |= not err <= tol
        backends = sdpa_backends(lambda: vendor_sdpa(inp))
        fl = useful_flops(seg, head_dim, heads)
        results = []
        for mname, fn, cfg in methods:
            try:
                t = bench_ms(fn, device, seconds)
            except Exception as e:
                print(f"{name:22s} {mname:26s} n/a ({type(e).__name__}: {str(e).splitlines()[0][:60]})")
                continue
            results.append(dict(case=name, method=mname, ms_min=t["min"], ms_median=t["median"], runs=t["runs"],
                                tflops=fl / t["median"] / 1e9,
                                peak_mb=peak_cuda_mb(fn) if device.type == "cuda" else None,
                                padding=padding(seg, cfg) if cfg else None,
                                config={k: v for k, v in cfg.items()} if cfg else None))
        flash = next((r["ms_median"] for r in results if r["method"].startswith("sdpa flash")), float("nan"))
        for r in results:
            r["vs_flash"] = flash / r["ms_median"]
            r["of_peak"] = r["tflops"] / args.peak_tflops
            extra = ""
            if r["config"]:
                c = r["config"]
                extra = (f"{r['padding']:.2f}x  M{c['BLOCK_M']}+{c['TAIL_M']} N{c['BLOCK_KH']}x{c['BLOCK_KW']} "
                         f"w{c['num_warps']} s{c['num_stages']}")
            print(f"{name:22s} {r['method']:26s} {r['ms_min']:9.3f} {r['ms_median']:9.3f} {r['tflops']:8.3g} "
                  f"{r['of_peak']:7.1%} {r['vs_flash']:8.2f} {r['peak_mb'] or float('nan'):8.1f}  {extra}")
        print(f"{name:22s} max |triton - vendor sdpa| = {err:.2e}" + ("  <-- MISMATCH" if not err <= tol else "")
              + f"; vendor SDPA ran: {', '.join(backends) or 'none'}")
        rows.append(dict(case=name, views=sides, window=window, groups=seg.num_groups, useful_flops=fl,
                         max_error_vs_vendor=err, vendor_sdpa=backends, results=results))
    for s in skipped:
        print(f"skipped: {s}")
    return {"environment": env, "dtype": str(dtype), "heads": heads, "head_dim": head_dim, "seconds": seconds,
            "peak_tflops": args.peak_tflops, "tolerance": tol, "mismatch": bad, "cases": rows, "skipped": skipped}


def main():
    args = parse_args()
    res = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 1 if res["mismatch"] else 0


if __name__ == "__main__":
    sys.exit(main())
