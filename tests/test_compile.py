"""Every registered kernel config compiles for sm_80 and sm_90 without a GPU: builds, spills no registers, fits
shared memory, and uses tensor-core MMA where it should (gundam.kernels.compile_check)."""
import pytest

from gundam.kernels.compile_check import ARCHS, compile_registered, registered_configs

ENTRIES = registered_configs()


@pytest.fixture(scope="module")
def stats():
    return {(s.name, s.arch): s for s in compile_registered(ARCHS)}   # one batch, one subprocess at most


def test_attention_is_registered():
    names = [e["name"] for e in ENTRIES]
    for case in ("sam-global-1024", "sam-global-640", "sam-global-mixed", "sam-window-14", "clip-1024"):
        for dt in ("bf16", "fp16"):
            assert f"attention/{case}/{dt}" in names, names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("entry", ENTRIES, ids=[e["name"] for e in ENTRIES])
def test_compiles_without_spills(stats, entry, arch):
    s = stats[(entry["name"], arch)]
    assert not s.error, f"{s.name} sm_{arch} failed to build: {s.error}"
    assert s.spills == 0, f"{s.name} sm_{arch}: {s.spill_stores} B spill stores, {s.spill_loads} B spill loads"
    assert s.fits_smem, f"{s.name} sm_{arch}: {s.shared_bytes} B shared memory > {s.smem_limit} B"
    if entry.get("expect_mma"):
        assert s.has_mma, f"{s.name} sm_{arch}: no tensor-core MMA in the SASS"
        if arch >= 90 and entry["constexprs"].get("BLOCK_M", 0) >= 64:
            assert s.mma_kind == "HGMMA", f"{s.name} sm_90: expected wgmma (HGMMA), got {s.mma_kind}"
