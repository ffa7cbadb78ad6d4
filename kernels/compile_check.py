"""Compile Triton kernels for real NVIDIA GPUs on a machine without one, and read what ptxas made of them.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))` runs the whole pipeline (TTIR ->
TTGIR -> LLVM -> PTX -> cubin through the ptxas shipped in the triton wheel) with no driver. From the result
we read registers and spills (ptxas -v on the same PTX), shared memory (Triton's own allocation plus static),
and whether tensor-core instructions were emitted (HMMA on sm_80, HGMMA/wgmma on sm_90, from the SASS).

Registering a kernel: give its module in `gundam.kernels` a `COMPILE_CONFIGS` list of dicts with
  name, kernel, signature (arg -> "*bf16" / "i32" / "fp32" / "constexpr"), constexprs   (required)
  aligned: arg names that are 16-divisible in real launches (pointers, strides), as Triton's launcher
      would specialise them; or attrs: the raw ASTSource attrs {(index,): [["tt.divisibility", 16]]}
  num_warps (default 4), num_stages (default 3), expect_mma (default False), note (free text)
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
from dataclasses import asdict, dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# Max dynamic shared memory per block (opt-in), bytes.
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


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
    mma_kind: str           # e.g. "HGMMA", "HMMA", "" if none
    num_warps: int
    num_stages: int
    note: str = ""
    error: str = ""         # the compile failure, if any (compile_registered)

    @property
    def spills(self):
        return self.spill_stores + self.spill_loads

    @property
    def fits_smem(self):
        return self.shared_bytes <= self.smem_limit


def _bin(tool):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def _ptxas_usage(ptx, arch):
    """(registers, spill store bytes, spill load bytes, static smem bytes) from `ptxas -v` on the PTX."""
    # the same ptxas and flags Triton used to make the cubin, plus -v
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
               f"--gpu-name={sm_arch_from_capability(arch)}", src, "-o", os.path.join(d, "k.o")]
        res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed ({res.returncode}):\n{res.stderr}")
    log = res.stdout + res.stderr
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    smem = re.search(r"(\d+) bytes smem", log)
    if regs is None or spill is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    return int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(smem.group(1)) if smem else 0


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
    regs, st, ld, static_smem = _ptxas_usage(compiled.asm["ptx"], arch)
    mma = re.findall(r"\b(HGMMA|HMMA|UTCHMMA|UTCQMMA)\.", _sass(compiled.asm["cubin"]))
    kind = max(set(mma), key=mma.count) if mma else ""
    return CompileStats(name=name or kernel.__name__, arch=arch, regs=regs, spill_stores=st, spill_loads=ld,
                        shared_bytes=compiled.metadata.shared + static_smem, smem_limit=SMEM_LIMIT.get(arch, 0),
                        has_mma=bool(mma), mma_kind=kind, num_warps=num_warps, num_stages=num_stages, note=note)


def _run_worker(job):
    """Run `job` in a fresh interpreter without TRITON_INTERPRET (the interpreter's @jit wrappers, including
    triton.language's own helpers like tl.cdiv, cannot be compiled) and return its list of stats dicts."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", "from gundam.kernels.compile_check import _worker; _worker()"],
                         input=json.dumps(job), capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"compile worker failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return [CompileStats(**d) for d in json.loads(res.stdout.strip().splitlines()[-1])]


def _worker():
    job = json.load(sys.stdin)
    if job["kind"] == "registered":
        stats = compile_registered(job["archs"], job["names"])
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
        return _run_worker(job)[0]
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


def compile_registered(archs=ARCHS, names=None):
    """CompileStats for every registered entry (or those named) x arch; a failed build has `error` set.

    Under TRITON_INTERPRET=1 everything runs in one subprocess."""
    if _interpreting():
        return _run_worker(dict(kind="registered", archs=list(archs), names=names))
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
                                          shared_bytes=0, smem_limit=SMEM_LIMIT.get(arch, 0), has_mma=False,
                                          mma_kind="", num_warps=entry.get("num_warps", 4),
                                          num_stages=entry.get("num_stages", 3), error=msg[-2000:]))
    return stats


def format_table(stats):
    head = f"{'kernel':44s} {'arch':>5s} {'warps':>5s} {'stages':>6s} {'regs':>5s} {'spills':>7s} " \
           f"{'smem KB':>8s} {'limit':>6s} {'MMA':>6s}  config"
    lines = [head, "-" * len(head)]
    for s in stats:
        if s.error:
            lines.append(f"{s.name:44s} {'sm_' + str(s.arch):>5s}  FAILED: {s.error.splitlines()[0][:80]}")
            continue
        lines.append(f"{s.name:44s} {'sm_' + str(s.arch):>5s} {s.num_warps:5d} {s.num_stages:6d} {s.regs:5d} "
                     f"{s.spills:7d} {s.shared_bytes / 1024:8.1f} {s.smem_limit // 1024:6d} "
                     f"{s.mma_kind or 'none':>6s}  {s.note}")
    return "\n".join(lines)
