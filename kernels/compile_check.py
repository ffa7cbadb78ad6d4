"""Compile Triton kernels for real NVIDIA GPUs on a machine without one, and read what ptxas made of them.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin through the ptxas shipped in the triton wheel) with no driver. From the result
we read registers and spills (ptxas -v on the same PTX), shared memory (Triton's own allocation plus static),
ptxas's performance warnings, the occupancy they allow, and whether tensor-core instructions were emitted
(HMMA on sm_80, HGMMA/wgmma on sm_90, from the SASS).

The PTX is assembled twice with `ptxas -v`: as Triton does (its ptxas for the arch and its flags: the cubin a
launch runs, registers, spills) and with the wheel's ptxas-blackwell and no flags besides the target (what
anyone re-assembling the PTX sees). A warning from either (e.g. "(C7515) Potential Performance Loss:
wgmma.mma_async instructions are serialized") or a spill in either is a problem (`problems`).

The registry is one builder, `production_entries()`: every kernel at the block sizes the heuristics pick for
the real model's launches (bf16; fp16 builds the same code with other MMA types, so one fp16 entry per kernel
shows that it builds). An entry is a dict with
  name, kernel, signature (arg -> "*bf16" / "i32" / "fp32" / "constexpr", from the kernel's own argument
  list: `kernel_signature`), constexprs
  divisible: the args that are multiples of 16 in real launches (16-byte aligned pointers, strides), which
      Triton's launcher would specialise (`pointers_and_strides` gives the usual list)
  num_warps, num_stages, expect_mma, min_ctas_per_sm ({arch: CTAs}: the occupancy it must reach), note
`registered_configs()` returns them; `compile_registered(archs)` compiles them all (in a subprocess when the
Triton interpreter is on), `compile_kernel` / `compile_entry` compile one.
"""
import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from gundam.kernels import activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu
from gundam.kernels.segments import RELPOS_BLOCK_M, RELPOS_BWD_SUB_BLOCKS, build_segments
from gundam.kernels.tiling import (choose_backward_config, choose_config, layer_norm_config, next_power_of_2,
                                   prefix_attention_config, project_layout_config, quick_gelu_config, relpos_block,
                                   relpos_warps, rms_norm_config, silu_mul_config)

ARCHS = (80, 90)


@dataclass(frozen=True)
class SmLimits:
    """Per-SM resources of an architecture (CUDA occupancy calculator values)."""
    regs: int = 64 * 1024           # 32-bit registers, split evenly over 4 sub-partitions
    smem: int = 0                   # shared memory per SM, bytes
    smem_per_block: int = 0         # max dynamic shared memory per block (opt-in), bytes
    max_ctas: int = 32
    max_threads: int = 2048
    reg_unit: int = 256             # registers are allocated per warp in units of 256
    cta_reserved_smem: int = 1024   # shared memory the system reserves per CTA


SM_LIMITS = {80: SmLimits(smem=164 * 1024, smem_per_block=163 * 1024),
             90: SmLimits(smem=228 * 1024, smem_per_block=227 * 1024)}


def occupancy(regs, num_warps, shared_bytes, arch):
    """(CTAs per SM allowed by registers, by shared memory, by threads / CTA slots) on sm_<arch>."""
    lim = SM_LIMITS[arch]
    reg_per_warp = -(-max(regs, 1) * 32 // lim.reg_unit) * lim.reg_unit
    warps_by_regs = 4 * (lim.regs // 4 // reg_per_warp)   # each sub-partition holds its own warps' registers
    by_regs = warps_by_regs // num_warps
    by_smem = lim.smem // (shared_bytes + lim.cta_reserved_smem)
    by_threads = min(lim.max_ctas, lim.max_threads // (32 * num_warps))
    return by_regs, by_smem, by_threads


@dataclass
class CompileStats:
    name: str
    arch: int
    regs: int               # registers per thread
    spill_stores: int       # bytes
    spill_loads: int        # bytes
    shared_bytes: int       # Triton's dynamic allocation + static
    smem_limit: int
    has_mma: bool           # tensor-core MMA in the SASS
    mma_kind: str           # e.g. "HGMMA", "HMMA", "HGMMA+HMMA", "" if none
    num_warps: int
    num_stages: int
    warnings: list = field(default_factory=list)   # ptxas warnings / performance notes (either assembly)
    ctas_by_regs: int = 0   # occupancy limits, CTAs per SM
    ctas_by_smem: int = 0
    ctas_by_threads: int = 0
    note: str = ""
    error: str = ""         # the compile failure, if any (compile_registered)

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads

    @property
    def fits_smem(self):
        return self.shared_bytes <= self.smem_limit

    @property
    def ctas_per_sm(self):
        return min(self.ctas_by_regs, self.ctas_by_smem, self.ctas_by_threads)


def problems(stats, entry):
    """What is wrong with one build of a registered entry: failure, spills, shared memory over the limit, a
    ptxas warning, no tensor-core MMA (or no wgmma on sm_90 for 64+ row tiles), occupancy below its minimum."""
    s = stats
    if s.error:
        return [f"failed to build: {s.error.splitlines()[0][:200]}"]
    out = []
    if s.spills:
        out.append(f"{s.spill_stores} B spill stores, {s.spill_loads} B spill loads")
    if not s.fits_smem:
        out.append(f"{s.shared_bytes} B shared memory > {s.smem_limit} B")
    out += [f"ptxas: {w}" for w in s.warnings]
    if entry.get("expect_mma"):
        kinds = s.mma_kind.split("+") if s.mma_kind else []
        if not kinds:
            out.append("no tensor-core MMA in the SASS")
        elif s.arch >= 90 and entry["constexprs"].get("BLOCK_M", 0) >= 64 and "HGMMA" not in kinds:
            out.append(f"expected wgmma (HGMMA), got {s.mma_kind}")
    need = entry.get("min_ctas_per_sm", {}).get(s.arch, 0)
    if s.ctas_per_sm < need:
        out.append(f"{s.ctas_per_sm} CTAs per SM (regs {s.ctas_by_regs}, smem {s.ctas_by_smem}), expected >= {need}")
    return out


def _bin(tool):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas(ptx, arch, flags, ptxas):
    """Run `ptxas` on the PTX for sm_<arch> with `flags` + -v; returns its log."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, *flags, "-v", f"--gpu-name={sm_arch_from_capability(arch)}", src,
               "-o", os.path.join(d, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}):\n{res.stderr}")
    return res.stdout + res.stderr


def _parse_ptxas(log):
    """(registers, spill store bytes, spill load bytes, static smem bytes, warnings) from a `ptxas -v` log."""
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    # performance notes come as "info : (C7515) Potential Performance Loss: ..."; the rest as "warning : ..."
    warnings = [re.sub(r"^.*?(warning|info)\s*:\s*", "", line).strip() for line in log.splitlines()
                if re.search(r"warning|Potential Performance Loss", line, re.IGNORECASE)]
    return (int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(smem.group(1)) if smem else 0,
            warnings)


def _ptxas_usage(ptx, arch):
    """ptxas -v as Triton runs it (its ptxas for the arch and its flags: registers, spills, smem of the real
    cubin) and the wheel's newest ptxas (ptxas-blackwell) with no flags (warnings and spills of a plain
    re-assembly): (regs, spill stores, spill loads, static smem, warnings)."""
    triton_flags = ["-lineinfo", "--regAllocOptLevel=2"]
    regs, st, ld, smem, warnings = _parse_ptxas(_ptxas(ptx, arch, triton_flags, get_ptxas(arch).path))
    newest = _bin("ptxas-blackwell") if os.path.exists(_bin("ptxas-blackwell")) else get_ptxas(arch).path
    _, pst, pld, _, plain = _parse_ptxas(_ptxas(ptx, arch, [], newest))
    if pst or pld:
        plain.append(f"plain re-assembly spills: {pst} B stores, {pld} B loads")
    return regs, st, ld, smem, list(dict.fromkeys(warnings + plain))


def _sass(cubin):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout


def _interpreting():
    return bool(triton.knobs.runtime.interpret)


def _compile_here(kernel, signature, constexprs, arch, num_warps, num_stages, divisible, name, note):
    if not isinstance(kernel, JITFunction):
        kernel = JITFunction(kernel.fn)
    names = list(signature)
    for a in divisible:
        if a not in signature:
            raise ValueError(f"divisible arg {a!r} is not in the signature of {kernel.__name__}")
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=True))
    regs, st, ld, static_smem, warnings = _ptxas_usage(compiled.asm["ptx"], arch)
    mma = sorted(set(re.findall(r"\b(HGMMA|HMMA|UTCHMMA|UTCQMMA)\.", _sass(compiled.asm["cubin"]))))
    shared = compiled.metadata.shared + static_smem
    by_regs, by_smem, by_threads = occupancy(regs, num_warps, shared, arch) if arch in SM_LIMITS else (0, 0, 0)
    return CompileStats(name=name or kernel.__name__, arch=arch, regs=regs, spill_stores=st, spill_loads=ld,
                        shared_bytes=shared, smem_limit=SM_LIMITS[arch].smem_per_block if arch in SM_LIMITS else 0,
                        has_mma=bool(mma), mma_kind="+".join(mma), num_warps=num_warps, num_stages=num_stages,
                        warnings=warnings, ctas_by_regs=by_regs, ctas_by_smem=by_smem,
                        ctas_by_threads=by_threads, note=note)


def _run_workers(jobs):
    """Run each job in a fresh interpreter without TRITON_INTERPRET (the interpreter's @jit wrappers, including
    triton.language's own helpers like tl.cdiv, cannot be compiled), all at once; returns their stats lists."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = [subprocess.Popen([sys.executable, "-c", "from gundam.kernels.compile_check import _worker; _worker()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in jobs]
    results = []
    for proc, job in zip(procs, jobs):
        out, err = proc.communicate(json.dumps(job))
        if proc.returncode != 0:
            raise RuntimeError(f"compile worker failed ({proc.returncode}):\n{err[-4000:]}")
        results.append([CompileStats(**d) for d in json.loads(out.strip().splitlines()[-1])])
    return results


def _worker():
    job = json.load(sys.stdin)
    if job["kind"] == "registered":
        stats = compile_registered(job["archs"], job["names"], jobs=1)
    else:
        kernel = getattr(importlib.import_module(job["module"]), job["qualname"])
        stats = [_compile_here(kernel, job["signature"], job["constexprs"], job["arch"], job["num_warps"],
                               job["num_stages"], job["divisible"], job["name"], job["note"])]
    print(json.dumps([asdict(s) for s in stats]))


def compile_kernel(kernel, signature, constexprs, arch, *, num_warps=4, num_stages=3, divisible=(), name=None,
                   note=""):
    """Compile `kernel` for sm_<arch> and return its CompileStats. Raises if Triton or ptxas fails.

    divisible: arg names to specialise as multiples of 16 (what Triton's launcher does for 16-byte aligned
    pointers and for integers that are multiples of 16).
    Under TRITON_INTERPRET=1 the compile runs in a subprocess (the kernel must be a module-level name)."""
    if _interpreting():
        fn = kernel.fn
        job = dict(kind="kernel", module=fn.__module__, qualname=fn.__qualname__, signature=signature,
                   constexprs=constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages,
                   divisible=list(divisible), name=name, note=note)
        return _run_workers([job])[0][0]
    return _compile_here(kernel, signature, constexprs, arch, num_warps, num_stages, divisible, name, note)


def registered_configs():
    """Every kernel's production entries (production_entries)."""
    return production_entries()


def compile_entry(entry, arch):
    """Compile one registered entry for sm_<arch>."""
    return compile_kernel(entry["kernel"], entry["signature"], entry["constexprs"], arch,
                          num_warps=entry["num_warps"], num_stages=entry["num_stages"],
                          divisible=entry["divisible"], name=entry["name"], note=entry["note"])


def compile_registered(archs=ARCHS, names=None, jobs=None):
    """CompileStats for every registered entry (or those named) x arch; a failed build has `error` set.

    jobs: worker processes (default: one per usable CPU, at most 8); under TRITON_INTERPRET=1 at least one."""
    wanted = [e["name"] for e in registered_configs() if names is None or e["name"] in names]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = max(1, min(jobs or min(cpus, 8), len(wanted)))
    if _interpreting() or jobs > 1:     # round-robin shares, merged back in registration order
        shares = _run_workers([dict(kind="registered", archs=list(archs), names=wanted[i::jobs])
                               for i in range(jobs)])
        return sorted((s for share in shares for s in share),
                      key=lambda s: (wanted.index(s.name), list(archs).index(s.arch)))
    stats = []
    for entry in registered_configs():
        if names is not None and entry["name"] not in names:
            continue
        for arch in archs:
            try:
                stats.append(compile_entry(entry, arch))
            except Exception as e:          # report the failure, keep compiling the rest
                msg = f"{type(e).__name__}: {e}"
                stats.append(CompileStats(name=entry["name"], arch=arch, regs=0, spill_stores=0, spill_loads=0,
                                          shared_bytes=0, smem_limit=0, has_mma=False, mma_kind="",
                                          num_warps=entry["num_warps"], num_stages=entry["num_stages"],
                                          error=msg[-2000:]))
    return stats


def format_table(stats):
    """One line per build: resources, occupancy (CTAs per SM and what limits it), MMA kind, warnings."""
    head = (f"{'kernel':36s} {'arch':>5s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spills':>6s} "
            f"{'smem KB':>7s} {'CTAs/SM':>7s} {'(regs smem)':>11s} {'MMA':>10s}  {'config':16s} warnings")
    lines = [head, "-" * len(head)]
    for s in stats:
        if s.error:
            lines.append(f"{s.name:36s} {'sm_' + str(s.arch):>5s}  FAILED: {s.error.splitlines()[0][:80]}")
            continue
        lines.append(f"{s.name:36s} {'sm_' + str(s.arch):>5s} {s.num_warps:5d} {s.num_stages:6d} {s.regs:5d} "
                     f"{s.spills:6d} {s.shared_bytes / 1024:7.1f} {s.ctas_per_sm:7d} "
                     f"{f'({s.ctas_by_regs} {s.ctas_by_smem})':>11s} {s.mma_kind or 'none':>10s}  {s.note:16s} "
                     + ("; ".join(w[:90] for w in s.warnings) or "-"))
    lines.append("CTAs/SM: min of the register, shared-memory and thread limits "
                 "(64K registers, 164 KB (sm_80) / 228 KB (sm_90) shared memory, 2048 threads, 32 CTAs per SM).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- registry

PRODUCTION_CASES = [   # name, views, window, class_token: the attention launches of the real model (head_dim 64)
    ("sam-global-1024", [(0, 64, 64)], None, False),
    ("sam-global-640", [(0, 40, 40)], None, False),
    ("sam-global-mixed", [(0, 64, 64), (4096, 40, 40)], None, False),
    ("sam-window-14", [(0, 64, 64), (4096, 40, 40)], 14, False),
    ("clip-1024", [(0, 16, 16)], None, True),
    ("clip-640", [(0, 10, 10)], None, True),
]
_INT_TABLES = ("prog_ptr", "map_ptr")        # int32 tables built on the host
_FLOAT_SCALARS = ("qk_scale", "scale", "eps")


def kernel_signature(kernel, dtype, fp32=()):
    """Compile signature from the kernel's argument list: constexpr for its constexprs; pointers *dtype, *fp32
    for the fp32 scratch named in `fp32`, *i32 for the int32 tables; fp32 for the float scalars, i32 for the
    other scalars (sizes, strides)."""
    sig = {}
    for n, prm in inspect.signature(kernel.fn).parameters.items():
        if prm.annotation is tl.constexpr:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = "*i32" if n in _INT_TABLES else "*fp32" if n in fp32 else f"*{dtype}"
        else:
            sig[n] = "fp32" if n in _FLOAT_SCALARS else "i32"
    return sig


def pointers_and_strides(kernel, *but):
    """The kernel's pointer and stride_* args, except those named: what is 16-divisible when every tensor is
    16-byte aligned with rows of a multiple of 16 elements."""
    return [n for n in inspect.signature(kernel.fn).parameters
            if (n.endswith("_ptr") or n.startswith("stride_")) and n not in but]


def _entry(name, kernel, dtype, constexprs, divisible, *, fp32=(), num_warps=4, num_stages=3, expect_mma=False,
           min_ctas_per_sm=None, note=""):
    return dict(name=name, kernel=kernel, signature=kernel_signature(kernel, dtype, fp32), constexprs=constexprs,
                divisible=divisible, num_warps=num_warps, num_stages=num_stages, expect_mma=expect_mma,
                min_ctas_per_sm=min_ctas_per_sm or {}, note=note)


def _row_norm_entries(name, fwd, bwd, dt, C, extra, num_warps, partials):
    """A row norm's forward (extra: the fused residual) and backward (extra: the gradient arriving on it) at C
    channels; partials: the backward's fp32 per-program weight-gradient buffers."""
    block = dict(BLOCK_N=next_power_of_2(C), ACC=tl.float32)
    return [_entry(f"{name}_{dt}_C{C}{'_residual' if extra else ''}", fwd, dt, dict(block, HAS_RESIDUAL=extra),
                   pointers_and_strides(fwd) + ["C"], num_warps=num_warps),
            _entry(f"{name}_bwd_{dt}_C{C}{'_dh' if extra else ''}", bwd, dt, dict(block, HAS_DH=extra),
                   pointers_and_strides(bwd) + ["C"], fp32=partials, num_warps=num_warps)]


def production_entries():
    """Every kernel at what the heuristics pick for the real model's launches (_entries), in bf16; fp16 builds
    the same code with other MMA types (the same registers and shared memory), so one fp16 entry per kernel,
    its first variant, shows that it builds."""
    fp16, kernels = [], set()
    for e in _entries("fp16"):
        if e["kernel"] not in kernels:
            kernels.add(e["kernel"])
            fp16.append(e)
    return _entries("bf16") + fp16


def _entries(dt):
    """The production entries in dtype dt: the attention forward (inference and training: HAS_LSE), its dQ and
    dK/dV kernels and both rel-pos kernels for the PRODUCTION_CASES; SAM's (C=768) and CLIP's (C=1024)
    LayerNorm with and without the fused residual, forward and backward; the real projector (2048 -> 1280)
    at both row tiles of its heuristic; quick_gelu; DeepSeek-OCR 2's projector (896 -> 1280, the query rows alone), its Qwen2 attention, RMSNorm (C=896, with and
    without the fused residual, forward and backward) and SiLU-and-multiply (I=4864, forward and backward).
    Each kernel's heaviest variant comes first."""
    entries = []
    # fp32 scratch of the attention kernels (the rel-pos tables, the LSE and the backward's partials)
    acc = ("relh_ptr", "relw_ptr", "lse_ptr", "delta_ptr", "drelh_ptr", "drelw_ptr", "dpad_ptr", "drel_ptr",
           "part_ptr")
    for case, views, window, cls in PRODUCTION_CASES:
        seg = build_segments(views, window, class_token=cls)
        c = {**choose_config(seg, 64, torch.bfloat16), **choose_backward_config(seg, 64, torch.bfloat16)}
        has_rel = not cls
        # the LSE's head stride is T (any); without rel-pos the rel strides are 0 and dQ goes straight to dqkv
        but = ("stride_prog", "stride_lse_head") + (() if has_rel else ("stride_relh_head", "stride_relh_t",
                                                                        "stride_relw_head", "stride_relw_t"))
        flags = dict(HEAD_DIM=64, HAS_REL=has_rel, ALIGNED=True, DOT_PRECISION="tf32", ACC=tl.float32)
        tile = f"M{c['BLOCK_M']}" + (f"+{c['TAIL_M']}" if c["TAIL_M"] < c["BLOCK_M"] else "")
        for lse in (False, True):
            k = attention._attention_kernel
            entries.append(_entry(
                f"attention{'-lse' if lse else ''}/{case}/{dt}", k, dt,
                dict(flags, BLOCK_M=c["BLOCK_M"], TAIL_M=c["TAIL_M"], BLOCK_KH=c["BLOCK_KH"], BLOCK_KW=c["BLOCK_KW"],
                     HAS_LSE=lse),
                pointers_and_strides(k, *but), fp32=acc, num_warps=c["num_warps"], num_stages=c["num_stages"],
                expect_mma=True, min_ctas_per_sm={90: 2} if c["BLOCK_M"] >= 128 else {},
                note=f"{tile} N{c['BLOCK_KH']}x{c['BLOCK_KW']}"))
        k = attention._attention_bwd_dq_kernel
        tile = f"M{c['BWD_BLOCK_M']}" + (f"+{c['BWD_TAIL_M']}" if c["BWD_TAIL_M"] < c["BWD_BLOCK_M"] else "")
        entries.append(_entry(
            f"attention-bwd-dq/{case}/{dt}", k, dt,
            dict(flags, BLOCK_M=c["BWD_BLOCK_M"], TAIL_M=c["BWD_TAIL_M"], BLOCK_KH=c["BWD_BLOCK_KH"],
                 BLOCK_KW=c["BWD_BLOCK_KW"]),
            pointers_and_strides(k, *but), fp32=acc + (("dq_ptr",) if has_rel else ()),
            num_warps=c["bwd_num_warps"], num_stages=c["bwd_num_stages"], expect_mma=True,
            note=f"{tile} N{c['BWD_BLOCK_KH']}x{c['BWD_BLOCK_KW']}"))
        k = attention._attention_bwd_dkdv_kernel
        entries.append(_entry(
            f"attention-bwd-dkdv/{case}/{dt}", k, dt,
            dict(flags, BLOCK_M=c["KV_BLOCK_M"], BLOCK_KH=c["KV_BLOCK_KH"], BLOCK_KW=c["KV_BLOCK_KW"]),
            pointers_and_strides(k, *but), fp32=acc, num_warps=c["kv_num_warps"], num_stages=c["bwd_num_stages"],
            expect_mma=True, note=f"N{c['KV_BLOCK_KH']}x{c['KV_BLOCK_KW']} M{c['KV_BLOCK_M']}"))
    for case, size in (("relpos-global-1024", 64), ("relpos-window-14", 14)):
        block_r = relpos_block(2 * size - 1)
        k = attention._relpos_kernel
        entries.append(_entry(   # the per-token tables' rows are padded to 16s
            f"attention/{case}/{dt}", k, dt,
            dict(HEAD_DIM=64, BLOCK_M=RELPOS_BLOCK_M, BLOCK_RH=block_r, BLOCK_RW=block_r, DOT_PRECISION="tf32"),
            pointers_and_strides(k, "stride_prog") + ["len_relh", "len_relw"], fp32=acc,
            num_warps=relpos_warps(block_r, block_r), expect_mma=True, note=f"M{RELPOS_BLOCK_M} R{block_r}"))
        k = attention._relpos_bwd_kernel
        for axis in (0, 1):     # rows: fp32 dq in place; columns: into dqkv
            entries.append(_entry(
                f"attention-bwd-{case}-{'hw'[axis]}/{dt}", k, dt,
                dict(AXIS=axis, HEAD_DIM=64, BLOCK_M=RELPOS_BLOCK_M, SUB_BLOCKS=RELPOS_BWD_SUB_BLOCKS,
                     BLOCK_R=block_r, DOT_PRECISION="tf32", ACC=tl.float32),
                pointers_and_strides(k, "stride_prog"),
                fp32=acc + ("dq_in_ptr",) + (("dq_out_ptr",) if axis == 0 else ()),
                num_warps=relpos_warps(block_r, block_r), expect_mma=True,
                note=f"M{RELPOS_BLOCK_M}x{RELPOS_BWD_SUB_BLOCKS} R{block_r}"))

    # C and the row strides are multiples of 16 for SAM's and CLIP's widths; extra: the fused residual (forward),
    # the gradient arriving on it (backward)
    for C, extra in ((1024, True), (1024, False), (768, True), (768, False)):
        entries += _row_norm_entries("layer_norm", layernorm._layer_norm_kernel, layernorm._layer_norm_bwd_kernel,
                                     dt, C, extra, layer_norm_config(C)["num_warps"], ("dw_ptr", "db_ptr"))

    for T_out in (8192, 893):
        cfg = project_layout_config(T_out)
        k = layout._project_layout_kernel
        entries.append(_entry(f"project_and_layout_{dt}_M{cfg['BLOCK_M']}", k, dt,
                              dict(N=1280, K_CLIP=1024, K_SAM=1024, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                                   BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="tf32", ACC=tl.float32),
                              pointers_and_strides(k), num_warps=cfg["num_warps"]))

    # DeepSeek-OCR 2's projector (896 -> 1280): the Qwen2 query rows alone, no SAM half
    cfg = project_layout_config(1120)
    k = layout._project_layout_kernel
    entries.append(_entry(f"project_and_layout_ocr2_{dt}_M{cfg['BLOCK_M']}", k, dt,
                          dict(N=1280, K_CLIP=896, K_SAM=0, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                               BLOCK_K=cfg["BLOCK_K"], INPUT_PRECISION="tf32", ACC=tl.float32),
                          pointers_and_strides(k), num_warps=cfg["num_warps"]))

    cfg = quick_gelu_config()
    k = activation._quick_gelu_kernel
    entries.append(_entry(f"quick_gelu/{dt}", k, dt, dict(BLOCK=cfg["BLOCK"]), pointers_and_strides(k) + ["n"],
                          num_warps=cfg["num_warps"]))

    # DeepSeek-OCR 2's Qwen2 attention (14 heads, 2 kv heads, head_dim 64): the inference and training forwards,
    # the dQ and dK/dV kernels and the backward's q rotation; the RoPE tables, LSE and delta are fp32
    c, D = prefix_attention_config(64, torch.bfloat16), 64
    tables = ("cos_ptr", "sin_ptr", "lse_ptr", "delta_ptr")
    but = ("stride_prog", "stride_lse_h")     # the program table's rows are 4 ints; T (the LSE's stride) is any
    flags = dict(GROUP=7, HEAD_DIM=D, BLOCK_H=max(16, D // 2), DOT_PRECISION="tf32", ACC=tl.float32)
    for lse in (True, False):
        k = prefix_attention._prefix_attention_kernel
        entries.append(_entry(f"prefix-attention{'-lse' if lse else ''}/{dt}", k, dt,
                              dict(flags, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], HAS_LSE=lse),
                              pointers_and_strides(k, *but), fp32=tables, num_warps=c["num_warps"],
                              num_stages=c["num_stages"], expect_mma=True, note=f"M{c['BLOCK_M']} N{c['BLOCK_N']}"))
    k = prefix_attention._prefix_attention_bwd_dq_kernel
    entries.append(_entry(f"prefix-attention-bwd-dq/{dt}", k, dt,
                          dict(flags, BLOCK_M=c["BWD_BLOCK_M"], BLOCK_N=c["BWD_BLOCK_N"]),
                          pointers_and_strides(k, *but), fp32=tables, num_warps=c["bwd_num_warps"],
                          num_stages=c["bwd_num_stages"], expect_mma=True,
                          note=f"M{c['BWD_BLOCK_M']} N{c['BWD_BLOCK_N']}"))
    k = prefix_attention._prefix_attention_bwd_dkdv_kernel
    entries.append(_entry(f"prefix-attention-bwd-dkdv/{dt}", k, dt,
                          dict(flags, BLOCK_M=c["KV_BLOCK_M"], BLOCK_N=c["KV_BLOCK_N"]),
                          pointers_and_strides(k, *but), fp32=tables, num_warps=c["kv_num_warps"],
                          num_stages=c["bwd_num_stages"], expect_mma=True,
                          note=f"N{c['KV_BLOCK_N']} M{c['KV_BLOCK_M']}"))
    k = prefix_attention._prefix_rope_kernel
    entries.append(_entry(f"prefix-attention-rope/{dt}", k, dt,
                          dict(HEAD_DIM=D, BLOCK_H=max(16, D // 2), BLOCK_M=prefix_attention.ROPE_BLOCK_M,
                               ACC=tl.float32),
                          pointers_and_strides(k, "stride_prog"), fp32=tables, num_stages=1,
                          note=f"M{prefix_attention.ROPE_BLOCK_M}"))

    # DeepSeek-OCR 2's Qwen2 RMSNorm (C = 896, a multiple of 16, as the row strides) with and without the fused
    # residual (forward) and the gradient arriving on it (backward)
    C = 896
    for extra in (True, False):
        entries += _row_norm_entries("rms_norm", rmsnorm._rms_norm_kernel, rmsnorm._rms_norm_bwd_kernel, dt, C,
                                     extra, rms_norm_config(C)["num_warps"], ("dw_ptr",))

    # its MLP's silu(gate) * up (I = 4864: the output rows' stride; the inputs' row strides are I or 2I)
    cfg = silu_mul_config(4864)
    for name, k in (("silu_mul", swiglu._silu_mul_kernel), ("silu_mul_bwd", swiglu._silu_mul_bwd_kernel)):
        entries.append(_entry(f"{name}/{dt}", k, dt, dict(BLOCK=cfg["BLOCK"], ACC=tl.float32),
                              pointers_and_strides(k) + ["I"], num_warps=cfg["num_warps"],
                              note=f"BLOCK{cfg['BLOCK']}"))
    return entries
