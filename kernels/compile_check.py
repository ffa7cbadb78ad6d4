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

Registering a kernel: give its module in `gundam.kernels` a `COMPILE_CONFIGS` list of dicts with
  name, kernel, signature (arg -> "*bf16" / "i32" / "fp32" / "constexpr"), constexprs   (required)
  aligned: arg names that are 16-divisible in real launches (pointers, strides), as Triton's launcher
      would specialise them; or attrs: the raw ASTSource attrs {(index,): [["tt.divisibility", 16]]}
  num_warps (default 4), num_stages (default 3), expect_mma (default False),
  min_ctas_per_sm ({arch: CTAs}: the occupancy it must reach), note (free text)
`registered_configs()` finds them all; `compile_registered(archs)` compiles them all (in a subprocess when
the Triton interpreter is on), `compile_kernel` / `compile_entry` compile one.
"""
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

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


def _compile_here(kernel, signature, constexprs, arch, num_warps, num_stages, aligned, attrs, name, note):
    if not isinstance(kernel, JITFunction):
        kernel = JITFunction(kernel.fn)
    names = list(signature)
    for a in aligned:
        if a not in signature:
            raise ValueError(f"aligned arg {a!r} is not in the signature of {kernel.__name__}")
    attrs = dict(attrs or {})
    attrs.update({(names.index(a),): [["tt.divisibility", 16]] for a in aligned})
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
        attrs = {tuple(k): v for k, v in job["attrs"]}
        stats = [_compile_here(kernel, job["signature"], job["constexprs"], job["arch"], job["num_warps"],
                               job["num_stages"], job["aligned"], attrs, job["name"], job["note"])]
    print(json.dumps([asdict(s) for s in stats]))


def compile_kernel(kernel, signature, constexprs, arch, *, num_warps=4, num_stages=3, aligned=(), attrs=None,
                   name=None, note=""):
    """Compile `kernel` for sm_<arch> and return its CompileStats. Raises if Triton or ptxas fails.

    aligned: arg names to specialise as 16-divisible (what Triton's launcher does for aligned pointers and
    strides that are multiples of 16); attrs: raw ASTSource attrs, merged with those.
    Under TRITON_INTERPRET=1 the compile runs in a subprocess (the kernel must be a module-level name)."""
    if _interpreting():
        fn = kernel.fn
        job = dict(kind="kernel", module=fn.__module__, qualname=fn.__qualname__, signature=signature,
                   constexprs=constexprs, arch=arch, num_warps=num_warps, num_stages=num_stages,
                   aligned=list(aligned), attrs=[[list(k), v] for k, v in (attrs or {}).items()], name=name,
                   note=note)
        return _run_workers([job])[0][0]
    return _compile_here(kernel, signature, constexprs, arch, num_warps, num_stages, aligned, attrs, name, note)


def registered_configs():
    """All COMPILE_CONFIGS entries of the kernel modules in gundam.kernels."""
    import gundam.kernels as pkg
    entries = []
    for mod in sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)):
        if f"gundam.kernels.{mod}" == __name__:
            continue  # this tool, not a kernel
        module = importlib.import_module(f"gundam.kernels.{mod}")
        entries.extend(getattr(module, "COMPILE_CONFIGS", []))
    return entries


def compile_entry(entry, arch):
    """Compile one COMPILE_CONFIGS entry for sm_<arch>."""
    return compile_kernel(entry["kernel"], entry["signature"], entry["constexprs"], arch,
                          num_warps=entry.get("num_warps", 4), num_stages=entry.get("num_stages", 3),
                          aligned=entry.get("aligned", ()), attrs=entry.get("attrs"), name=entry["name"],
                          note=entry.get("note", ""))


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
                                          num_warps=entry.get("num_warps", 4),
                                          num_stages=entry.get("num_stages", 3), error=msg[-2000:]))
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
