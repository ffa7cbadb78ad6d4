"""Every registered kernel config compiles for sm_80 and sm_90 without a GPU: builds, spills no registers (with
Triton's ptxas flags or a plain re-assembly), fits shared memory, draws no ptxas performance warning (e.g. C7515,
serialized wgmma), reaches its minimum occupancy, and uses tensor-core MMA where it should
(gundam.kernels.compile_check)."""
import pytest

from gundam.kernels import activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu
from gundam.kernels.compile_check import (ARCHS, CompileStats, format_table, occupancy, problems, compile_registered,
                                          registered_configs)

ENTRIES = registered_configs()


@pytest.fixture(scope="module")
def stats():
    return {(s.name, s.arch): s for s in compile_registered(ARCHS)}   # one batch, one subprocess at most


def test_production_kernels_are_registered():
    names = [e["name"] for e in ENTRIES]
    assert len(set(names)) == len(names), names
    for case in ("sam-global-1024", "sam-global-640", "sam-global-mixed", "sam-window-14", "clip-1024", "clip-640",
                 "relpos-global-1024", "relpos-window-14"):
        assert f"attention/{case}/bf16" in names, names
    assert "attention/sam-global-1024/fp16" in names and "attention/relpos-global-1024/fp16" in names, names
    assert any(n.startswith("quick_gelu/") for n in names) and any(n.startswith("layer_norm") for n in names)
    # DeepSeek-OCR 2's Qwen2 norm and MLP activation at the real widths, forward and backward
    for name in ("rms_norm_bf16_C896_residual", "rms_norm_bf16_C896", "rms_norm_bwd_bf16_C896_dh",
                 "rms_norm_bwd_bf16_C896", "silu_mul/bf16", "silu_mul_bwd/bf16", "silu_mul/fp16",
                 "project_and_layout_ocr2_bf16_M64"):
        assert name in names, names
    # every kernel of the package is registered, and each has one fp16 entry (fp16 builds the same code as bf16
    # with other MMA types)
    modules = (activation, attention, layernorm, layout, prefix_attention, rmsnorm, swiglu)
    kernels = sorted(n for m in modules for n in dir(m) if n.startswith("_") and n.endswith("_kernel"))
    assert sorted({e["kernel"].fn.__name__ for e in ENTRIES}) == kernels
    assert sorted(e["kernel"].fn.__name__ for e in ENTRIES if "*fp16" in e["signature"].values()) == kernels
    # the SAM global blocks must keep two CTAs per SM on sm_90
    glob = [e for e in ENTRIES if e["name"].startswith("attention/sam-global")]
    assert glob and all(e["min_ctas_per_sm"] == {90: 2} for e in glob)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_compiles_clean(stats, entry, arch):
    s = stats[(entry["name"], arch)]
    assert not problems(s, entry), f"{s.name} sm_{arch}: " + "; ".join(problems(s, entry))
    assert s.ctas_per_sm >= 1, f"{s.name} sm_{arch}: cannot launch (regs {s.regs}, smem {s.shared_bytes} B)"


def test_occupancy_limits():
    # registers: 4 sub-partitions of 16K, 256-register units per warp; shared memory: 1 KB reserved per CTA
    assert occupancy(128, 8, 80 * 1024, 90) == (2, 2, 8)      # 128 regs x 8 warps: 2 CTAs; 81 KB each: 2
    assert occupancy(129, 8, 80 * 1024, 90) == (1, 2, 8)      # 136 per thread after rounding: 3 warps per part
    assert occupancy(64, 4, 0, 80) == (8, 164, 16)
    assert occupancy(255, 4, 100 * 1024, 80) == (2, 1, 16)      # 256 regs: 2 warps per sub-partition


def test_problems_and_table_name_each_failure():
    entry = dict(name="k", constexprs=dict(BLOCK_M=128), expect_mma=True, min_ctas_per_sm={90: 2})
    s = CompileStats(name="k", arch=90, regs=168, spill_stores=8, spill_loads=8, shared_bytes=240 * 1024,
                     smem_limit=227 * 1024, has_mma=True, mma_kind="HMMA", num_warps=8, num_stages=3,
                     warnings=["(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized"],
                     ctas_by_regs=1, ctas_by_smem=0, ctas_by_threads=8)
    found = problems(s, entry)
    assert len(found) == 5, found
    for text in ("spill", "shared memory", "C7515", "expected wgmma", "0 CTAs per SM"):
        assert any(text in p for p in found), (text, found)
    assert "C7515" in format_table([s])
