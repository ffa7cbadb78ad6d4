"""Every GPU number the project takes, in one command, time-boxed for an H100/H200 (each section has a time
budget, and no section starts after --max-seconds, 420 by default): one JSON file and markdown tables.

    python bench/gpu.py [--json gpu.json] [--markdown gpu.md] [--seconds 0.5] [--only encoder,train] [--flex]
    python bench/gpu.py --smoke      # the same code on CPU: tiny configs, Triton's interpreter, fp32

Sections, each run on its own (one that raises records its error in one line, and the others still run); the
measuring is the other benchmarks' own code (their `run(args)`), so the numbers are theirs:
  error      Triton vs torch path output: the real DeepSeek-OCR encoder (random weights), bf16, one Gundam 3x2
             page (1900x1250): max and mean |difference|, and the output's magnitude
  encoder    bench/encoder.py: batch 1 and 8 of 3x2 pages, Triton vs torch path vs per-image loop: min/median
             ms, images/s, TFLOP/s and share of peak per stage, peak activation memory, Triton-vs-torch error
  attention  bench/attention.py: the segmented attention kernel vs SDPA (materialised bias; flash, no bias);
             flex_attention only with --flex (torch.compile per shape can take minutes)
  graphs     bench/encoder.py's CUDA-graph path: capture time and peak memory, replay vs eager Triton, the
             replay's output against the eager one
  train      bench/train.py: a training step, Triton vs torch path, with and without checkpointing, batch 1
             and 4 of 3x2 pages: ms, peak memory beside the cost model's activation memory
  ocr2       bench/encoder.py --ocr2: DeepSeek-OCR 2's encoder at mode ocr2, batch 1 and 8 of 3x2 pages: Triton,
             torch path and per-image loop
Progress (the other benchmarks' own tables) goes to stderr; the JSON is rewritten after every section, so an
interrupted run keeps what it had.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import sys
import time
import traceback

if "--smoke" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by the benchmarks below)

import torch  # noqa: E402

import attention  # noqa: E402  (sibling benchmarks: run this as `python bench/gpu.py`)
import encoder  # noqa: E402
import train  # noqa: E402
from benchutil import environment  # noqa: E402

# section -> time budget in seconds (no new point starts after it; the point under way finishes). Estimates for
# an H100/H200, with room: Triton's kernel compilation falls in the first section that runs the Triton path.
BUDGETS = {"error": 60, "encoder": 75, "attention": 75, "graphs": 45, "train": 100, "ocr2": 45}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="gpu.json", help="write results here (default gpu.json)")
    p.add_argument("--markdown", help="write the markdown tables here (default: print them to stdout)")
    p.add_argument("--only", help=f"comma-separated sections, of {','.join(BUDGETS)} (default: all)")
    p.add_argument("--seconds", type=float, default=0.5, help="repetitions per point, seconds (default 0.5)")
    p.add_argument("--max-seconds", type=float, default=420.0,
                   help="whole run: no section starts after this, and each one's budget is cut to fit (default 420)")
    p.add_argument("--grid", help="Gundam grid of the pages (default 3x2; --smoke: 2x1)")
    p.add_argument("--batches", help="encoder, graph and ocr2 batches (default 1,8; --smoke: 1)")
    p.add_argument("--train-batches", help="training batches (default 1,4; --smoke: 1)")
    p.add_argument("--flex", action="store_true", help="add flex_attention to the attention section")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="dense bf16 peak to compare with (H100 SXM, "
                                                                    "measured)")
    p.add_argument("--smoke", action="store_true", help="tiny configs on CPU in Triton's interpreter")
    a = p.parse_args(argv)
    a.grid = a.grid or ("2x1" if a.smoke else "3x2")
    a.batches = a.batches or ("1" if a.smoke else "1,8")
    a.train_batches = a.train_batches or ("1" if a.smoke else "1,4")
    return a


# ------------------------------------------------------------------------------------------------ sections
# each takes gpu.py's args and its time budget and returns a JSON-able dict with "rows"

def common(a, budget):
    """What every benchmark's CLI takes: --smoke, seconds per point, the section's budget."""
    return (["--smoke"] if a.smoke else []) + ["--seconds", str(a.seconds), "--budget", str(budget)]


def section_error(a, budget):
    args = encoder.parse_args(["--smoke"] if a.smoke else [])
    enc, cfg, mode, dtype, device = encoder.build(args)
    size = (encoder.SMOKE_GRIDS if a.smoke else encoder.GRIDS)[a.grid]
    batch, _ = encoder.page_batches(size, 1, mode, device)
    err = encoder.error_vs_torch(enc, batch)
    print(f"triton vs torch, {a.grid} page {size[0]}x{size[1]}: max |diff| {err['max_abs']:.3g}, mean "
          f"{err['mean_abs']:.3g} (outputs up to {err['ref_max_abs']:.3g})")
    row = {"config": "benchutil.SMALL" if a.smoke else "EncoderConfig.deepseek_ocr()",
           "dtype": str(dtype).removeprefix("torch."), "grid": a.grid, "size": list(size),
           "tiles": list(batch.layouts[0].grid), "tokens": int(batch.offsets[-1]), **err}
    return {"dtype": row["dtype"], "rows": [row]}


def section_encoder(a, budget):
    return encoder.run(encoder.parse_args(common(a, budget) + [
        "--grids", a.grid, "--batches", a.batches, "--paths", "triton,torch,per-image",
        "--peak-tflops", str(a.peak_tflops)]))


def section_attention(a, budget):
    return attention.run(attention.parse_args(common(a, budget) + ["--dtype", "bf16", "--peak-tflops",
                                                                   str(a.peak_tflops)]
                                              + ([] if a.flex else ["--no-flex"])))


def section_graphs(a, budget):
    # eager Triton beside the replay; no stage times (a replay has no events between stages)
    return encoder.run(encoder.parse_args(common(a, budget) + [
        "--grids", a.grid, "--batches", a.batches, "--paths", "triton,triton-graph", "--stage-runs", "0",
        "--peak-tflops", str(a.peak_tflops)]))


def section_train(a, budget):
    return train.run(train.parse_args(common(a, budget) + ["--batches", a.train_batches]))


def section_ocr2(a, budget):
    return encoder.run(encoder.parse_args(common(a, budget) + [
        "--ocr2", "--grids", a.grid, "--batches", a.batches, "--paths", "triton,torch,per-image",
        "--peak-tflops", str(a.peak_tflops)]))


SECTIONS = {"error": section_error, "encoder": section_encoder, "attention": section_attention,
            "graphs": section_graphs, "train": section_train, "ocr2": section_ocr2}


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def run_section(name, fn, a, budget) -> dict:
    """fn(a, budget) with its printing sent to stderr; an exception becomes {"ok": False, "error": one line}
    (its traceback goes to stderr) so that the next section still runs."""
    print(f"== {name} (budget {budget:.0f} s)", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            out = {"ok": True, "result": fn(a, budget)}
    except (Exception, SystemExit) as e:    # SystemExit: a benchmark's "needs a CUDA GPU"
        traceback.print_exc(file=sys.stderr)
        out = {"ok": False, "error": one_line(e)}
    out.update(seconds=time.monotonic() - t0, budget_s=budget)
    print(f"== {name}: {'done' if out['ok'] else 'FAILED: ' + out['error']} in {out['seconds']:.1f} s",
          file=sys.stderr, flush=True)
    gc.collect()    # free this section's encoder and buffers before the next one
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------------------------ markdown

def num(x, spec=".2f"):
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(header, rows) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
                     + ["| " + " | ".join(r) + " |" for r in rows])


def grid_label(r) -> str:
    """The grid's name, and the crop tiles the page got when they differ from it (no crops: 1x1)."""
    tiles = "x".join(map(str, r["tiles"]))
    return r["grid"] if tiles == r["grid"] else f"{r['grid']} ({tiles})"


def encoder_table(res, peak) -> str:
    rows = res["rows"]
    stages = list(dict.fromkeys(k for r in rows for k in r.get("stages", {})))
    torch_ms = {(r["grid"], r["batch"]): r["ms_median"] for r in rows if r["path"] == "torch"}
    header = ["grid", "batch", "path", "min ms", "median ms", "img/s", "TFLOP/s", "of peak", "x torch",
              *[f"{s} ms (TFLOP/s, of peak)" for s in stages], "peak MB", "max err vs torch"]
    body = []
    for r in rows:
        st = r.get("stages", {})
        tm = torch_ms.get((r["grid"], r["batch"]))
        body.append([grid_label(r), str(r["batch"]), r["path"],
                     num(r["ms_min"]), num(r["ms_median"]), num(r["images_per_s"], ".1f"), num(r["tflops"], ".1f"),
                     num(r["of_peak"], ".1%"), num(tm / r["ms_median"] if tm else None),
                     *[f"{st[s]['ms']:.2f} ({st[s]['tflops']:.1f}, {st[s]['tflops'] / peak:.1%})" if s in st
                       else "" for s in stages],
                     num(r["peak_activation_mb"], ".0f"),
                     num(r["error_vs_torch"]["max_abs"], ".3g") if "error_vs_torch" in r else ""])
    return table(header, body)


def graphs_table(res) -> str:
    eager = {(r["grid"], r["batch"]): r["ms_median"] for r in res["rows"] if r["path"] == "triton"}
    body = []
    for r in res["rows"]:
        e = eager.get((r["grid"], r["batch"]))
        body.append([grid_label(r), str(r["batch"]), r["path"], num(r["ms_min"]), num(r["ms_median"]),
                     num(e / r["ms_median"] if e else None), num(r.get("capture_ms"), ".0f"),
                     num(r.get("capture_peak_mb"), ".0f"), num(r["peak_activation_mb"], ".0f"),
                     num(r["vs_eager"]["max_abs"], ".3g") if "vs_eager" in r else ""])
    return table(["grid", "batch", "path", "min ms", "median ms", "x eager", "capture ms", "capture peak MB",
                  "peak MB", "max diff vs eager"], body)


def attention_table(res) -> str:
    body = []
    for c in res["cases"]:
        for r in c["results"]:
            ours = r["method"] == "triton segmented"
            body.append([c["case"], r["method"].strip(), num(r["ms_min"], ".3f"), num(r["ms_median"], ".3f"),
                         num(r["tflops"], ".1f"), num(r["of_peak"], ".1%"), num(r["vs_flash"]),
                         num(r["peak_mb"], ".0f"), num(r["padding"]) if r["padding"] else "",
                         num(c["max_error_vs_vendor"], ".2e") if ours else ""])
    return table(["case", "method", "min ms", "median ms", "TFLOP/s", "of peak", "x flash", "peak MB",
                  "padding", "max err vs vendor"], body)


def train_table(res) -> str:
    body = [[str(r["batch"]), r["path"], "yes" if r["checkpointing"] else "no", num(r["ms_min"]),
             num(r["ms_median"]), num(r["peak_mb"], ".0f"), num(r["model_activation_mb"], ".0f")]
            for r in res["rows"]]
    return table(["batch", "path", "checkpointing", "min ms", "median ms", "peak MB",
                  "model activations MB"], body)


def error_table(res) -> str:
    body = [[r["config"], r["dtype"], f"{r['grid']} ({r['size'][0]}x{r['size'][1]})", str(r["tokens"]),
             num(r["max_abs"], ".3g"), num(r["mean_abs"], ".3g"), num(r["ref_max_abs"], ".3g")]
            for r in res["rows"]]
    return table(["encoder", "dtype", "page", "tokens", "max abs err", "mean abs err", "max abs output"], body)


TITLES = {"error": "Triton vs torch path error", "encoder": "Encoder (DeepSeek-OCR)",
          "attention": "Attention microbenchmarks", "graphs": "CUDA-graph replay", "train": "Training step",
          "ocr2": "Encoder (DeepSeek-OCR 2)"}


def markdown(res) -> str:
    env, a = res["environment"], res["args"]
    timing = ("one call per point (smoke: CPU, Triton's interpreter, tiny configs)" if a["smoke"] else
              f">= {a['seconds']:g} s of runs per point (min and median of `triton.testing.do_bench`)")
    out = [f"### bench/gpu.py{' --smoke' if a['smoke'] else ''}: {env.get('gpu', env['device'])}",
           "", f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {timing}; share of a "
           f"{a['peak_tflops']:g} TFLOP/s peak; peak MB: CUDA memory of one call above what was allocated before "
           f"it; random weights; {res['wall_s']:.0f} s in all."]
    tables = {"error": error_table, "encoder": lambda r: encoder_table(r, a["peak_tflops"]),
              "attention": attention_table, "graphs": graphs_table, "train": train_table,
              "ocr2": lambda r: encoder_table(r, a["peak_tflops"])}
    for name, sec in res["sections"].items():
        dtype = str(sec.get("result", {}).get("dtype", "")).removeprefix("torch.")
        out += ["", f"**{TITLES[name]}** ({dtype + ', ' if dtype else ''}{sec['seconds']:.0f} s)", ""]
        if not sec["ok"]:
            out.append(f"failed: `{sec['error']}`")
            continue
        try:
            out.append(tables[name](sec["result"]))
        except Exception as e:      # a table bug must not lose the JSON's numbers
            out.append(f"table failed: `{one_line(e)}`")
        for s in sec["result"].get("skipped", []):
            out.append(f"\nskipped: {s}")
    return "\n".join(out) + "\n"


def main():
    a = parse_args()
    names = a.only.split(",") if a.only else list(SECTIONS)
    if unknown := [n for n in names if n not in SECTIONS]:
        sys.exit(f"--only {a.only}: unknown sections {', '.join(unknown)} (expected some of {', '.join(SECTIONS)})")
    if not a.smoke and not torch.cuda.is_available():
        sys.exit("bench/gpu.py needs a CUDA GPU (use --smoke to run its code paths on CPU)")
    device = torch.device("cpu" if a.smoke else "cuda")
    t0 = time.monotonic()
    res = {"environment": environment(device), "args": vars(a), "wall_s": 0.0, "sections": {}}
    for name in names:
        left = a.max_seconds - (time.monotonic() - t0)
        budget = 0.0 if a.smoke else min(BUDGETS[name], left)   # smoke: no budget (0: no limit)
        if not a.smoke and budget <= 0:
            res["sections"][name] = {"ok": False, "error": f"not run: --max-seconds {a.max_seconds:g} spent",
                                     "seconds": 0.0, "budget_s": 0.0}
        else:
            res["sections"][name] = run_section(name, SECTIONS[name], a, budget)
        res["wall_s"] = time.monotonic() - t0
        with open(a.json, "w") as f:       # after every section: an interrupted run keeps what it had
            json.dump(res, f, indent=2)
    md = markdown(res)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(md)
    else:
        print(md)
    failed = [n for n, s in res["sections"].items() if not s["ok"]]
    print(f"bench/gpu.py: {len(names) - len(failed)} of {len(names)} sections in {res['wall_s']:.0f} s"
          + (f"; failed: {', '.join(failed)}" if failed else "") + f"; wrote {a.json}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
