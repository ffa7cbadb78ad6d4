"""Reading the cost model (`gundam.cost.model`): a text report of one estimate, a sweep over image sizes and aspect
ratios with crops on and off, written as CSV and plotted.

    print(format_report(estimate(2000, 3000), gpu="h100"))
    rows = sweep("gundam"); write_csv(rows, "cost_sweep.csv"); plot(rows, "cost_sweep.png")
"""
from __future__ import annotations

import csv
import dataclasses
import os

from gundam.config import MODES, Mode, resolve_mode
from gundam.cost.model import CostReport, estimate, get_gpu

# ----------------------------------------------------------------------------------------------------------
# text report

# (vendor, fused) table titles per encoder family
TRAFFIC_TITLES = {
    "deepseek-ocr": ("vendor traffic: SDPA + materialised bias, separate passes, partition copies",
                     "fused traffic: Triton path, one pass, no N x N bias, no copies"),
    "deepseek-ocr2": ("vendor traffic: SDPA + materialised bias and mask, separate passes, copies",
                      "fused traffic: Triton path, one pass, no N x N bias or mask, no copies"),
}

def format_report(r: CostReport, gpu="h100", train: bool = False) -> str:
    """Per-stage tables of both traffic models on `gpu`, as `gundam cost` prints them; with `train`, also the
    matmul FLOPs of a training step (forward + backward), their compute floor and its activation memory."""
    g = get_gpu(gpu)
    lay, m = r.layout, r.mode
    floors = r.floor(g)
    peak = g.peak(r.dtype)
    grid = f"grid {lay.grid[0]}x{lay.grid[1]}, {lay.n_crops} crops of {m.image_size}" if lay.n_crops else "no crops"
    lines = [
        f"{r.width}x{r.height}, mode {_mode_name(m)} (global {m.base_size}, crop_mode {'on' if m.crop_mode else 'off'}),"
        f" {grid}; tokens {lay.tokens} = {lay.global_tokens} global + {lay.local_tokens} local + 1;"
        f" batch {r.batch}, {r.dtype}",
        f"{g.name}: {peak / 1e12:.0f} TFLOP/s dense {'tf32' if r.dtype == 'fp32' else 'bf16'},"
        f" {g.hbm_bandwidth / 1e12:.2f} TB/s HBM",
    ]
    head = f"{'stage':<17}{'GFLOP':>9}{'MB':>10}{'FLOP/B':>8}{'floor us':>10}  {'bound':<8}{'peak MB':>9}"
    stages = list(r.stages.items()) + [("total", r.total)]
    for k, title in enumerate(TRAFFIC_TITLES[m.family]):
        lines += ["", title, head]
        for name, s in stages:
            fl = floors[name][k]
            act = s.activation_bytes if k == 0 else s.activation_bytes_fused
            lines.append(f"{name:<17}{fl.flops / 1e9:>9.1f}{fl.bytes / 1e6:>10.1f}{fl.intensity:>8.0f}"
                         f"{fl.seconds * 1e6:>10.1f}  {fl.bound:<8}{act / 1e6:>9.1f}")
    t, (fv, ff) = r.total, floors["total"]
    lines += ["", f"other FLOPs {_si(t.other_flops, 'FLOP')}; weights {t.weight_bytes / 1e6:.1f} MB;"
                  f" fused/vendor: HBM bytes x{_ratio(t.hbm_bytes_fused, t.hbm_bytes_vendor)},"
                  f" floor time x{_ratio(ff.seconds, fv.seconds)}"]
    if train:
        lines += ["", "training step (forward + backward): matmul GFLOP, the fused path's compute floor, and activation "
                      "MB kept for the backward (torch path / Triton path, without and with checkpointing)",
                  f"{'stage':<17}{'vendor':>9}{'fused':>9}{'floor us':>10}{'torch':>10}{'triton':>10}"
                  f"{'torch ck':>10}{'triton ck':>10}"]
        for name, s in stages:
            mem = [s.train_activation_bytes(fused, ck) / 1e6 for ck in (False, True) for fused in (False, True)]
            lines.append(f"{name:<17}{s.train_matmul_flops / 1e9:>9.1f}{s.train_matmul_flops_fused / 1e9:>9.1f}"
                         f"{s.train_matmul_flops_fused / peak * 1e6:>10.1f}" + "".join(f"{m:>10.1f}" for m in mem))
        lines.append("checkpointing (ck): block inputs kept, one block's activations recomputed at a time")
    return "\n".join(lines)


def _si(x: float, unit: str) -> str:
    for scale, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {p}{unit}"
    return f"{x:.0f} {unit}"


def _ratio(a, b) -> str:
    return f"{a / b:.2f}" if b else "-"


def _mode_name(m: Mode) -> str:
    for name, mm in MODES.items():
        if dataclasses.replace(mm, max_crops=m.max_crops) == m:
            return name if mm.max_crops == m.max_crops else f"{name} (max {m.max_crops} crops)"
    return "custom"


# ----------------------------------------------------------------------------------------------------------
# sweep

SWEEP_SIDES = tuple(range(256, 4097, 128))                   # long side, px
SWEEP_ASPECTS = (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 1 / 2, 3.0, 1 / 3)  # width / height


def sweep(mode: str | Mode = "gundam", max_crops: int | None = None, sides=SWEEP_SIDES, aspects=SWEEP_ASPECTS,
          gpu="h100", dtype="bf16") -> list[dict]:
    """One row per (size, crops on/off): the `mode` as given ("crops") and with crop_mode off ("nocrop")."""
    base = resolve_mode(mode, max_crops)
    variants = (("crops", base), ("nocrop", dataclasses.replace(base, crop_mode=False)))
    rows = []
    for side in sides:
        for a in aspects:
            w, h = (side, max(1, round(side / a))) if a >= 1 else (max(1, round(side * a)), side)  # a = w/h
            for variant, m in variants:
                r = estimate(w, h, m, dtype=dtype)
                fl = r.floor(gpu)["total"]
                t = r.total
                rows.append({
                    "width": w, "height": h, "long_side": side, "aspect_ratio": round(a, 4),
                    "megapixels": round(w * h / 1e6, 4),
                    "variant": variant, "base_size": m.base_size, "image_size": m.image_size,
                    "crop_mode": m.crop_mode, "grid_w": r.layout.grid[0], "grid_h": r.layout.grid[1],
                    "n_crops": r.layout.n_crops, "tokens": r.layout.tokens,
                    "matmul_gflops": round(t.matmul_flops / 1e9, 3),
                    "matmul_gflops_fused": round(t.matmul_flops_fused / 1e9, 3),
                    "other_gflops": round(t.other_flops / 1e9, 3),
                    "hbm_mb_vendor": round(t.hbm_bytes_vendor / 1e6, 3), "hbm_mb_fused": round(t.hbm_bytes_fused / 1e6, 3),
                    "floor_ms_vendor": round(fl[0].seconds * 1e3, 4), "floor_ms_fused": round(fl[1].seconds * 1e3, 4),
                    "bound_vendor": fl[0].bound, "bound_fused": fl[1].bound,
                })
    return rows


def write_csv(rows: list[dict], path) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict], path, gpu="h100") -> bool:
    """FLOPs vs input size, crops (one line per aspect ratio) and no-crop; the roofline floor of both traffic
    models for the page-like aspect. False without matplotlib (the `plot` extra)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5))
    aspects = sorted({r["aspect_ratio"] for r in rows})
    page = min(aspects, key=lambda x: abs(x - 3 / 4))
    pick = lambda variant, aspect: sorted((r for r in rows if r["variant"] == variant and r["aspect_ratio"] == aspect),
                                          key=lambda r: r["long_side"])
    cmap = plt.get_cmap("viridis")
    for i, asp in enumerate(aspects):
        sel = pick("crops", asp)
        a.plot([r["long_side"] for r in sel], [r["matmul_gflops"] for r in sel], ".-", lw=1, ms=3,
               color=cmap(i / max(1, len(aspects) - 1)), label=f"crops, w/h {asp:.2f}")
    sel = pick("nocrop", page)
    a.plot([r["long_side"] for r in sel], [r["matmul_gflops"] for r in sel], "k--", lw=1.5, label="no crops")
    a.set(xlabel="long side, px", ylabel="matmul GFLOP per image", title="encoder FLOPs vs input size")
    for variant, color in (("crops", "tab:blue"), ("nocrop", "tab:orange")):
        sel = pick(variant, page)
        x = [r["long_side"] for r in sel]
        b.plot(x, [r["floor_ms_vendor"] for r in sel], "-", color=color, label=f"{variant}, vendor traffic")
        b.plot(x, [r["floor_ms_fused"] for r in sel], "--", color=color, label=f"{variant}, fused traffic")
    b.set(xlabel="long side, px", ylabel="floor time per image, ms", ylim=(0, None),
          title=f"roofline floor on {get_gpu(gpu).name}, w/h {page:.2f}")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
