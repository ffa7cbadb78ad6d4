"""Shared by the benchmarks (imported as a sibling module: run them as `python bench/<name>.py`)."""
import platform
import statistics
import time

import torch


def bench_ms(fn, device: torch.device, seconds: float = 1.0) -> dict:
    """Times of repeated calls of fn in ms: {"min", "median", "runs"}. On CUDA, triton.testing.do_bench with
    `seconds` of repetitions after a warm-up (L2 flushed between runs); on CPU, one warm-up call then calls
    until `seconds` have passed (just one call, no warm-up, for seconds=0: a smoke run)."""
    if device.type == "cuda":
        import triton.testing
        times = triton.testing.do_bench(fn, warmup=max(100, seconds * 250), rep=seconds * 1000, return_mode="all")
    else:
        if seconds > 0:
            fn()
        times, t_end = [], time.perf_counter() + seconds
        while not times or time.perf_counter() < t_end:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"min": min(times), "median": statistics.median(times), "runs": len(times)}


def peak_cuda_mb(fn) -> float:
    """Peak CUDA memory of one call of fn above what was allocated before it (weights, inputs), in MB;
    NaN without a GPU."""
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def environment(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import triton
    env = {"device": str(device), "torch": torch.__version__, "triton": triton.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(), "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def sdpa_backends(fn) -> list[str]:
    """The scaled_dot_product_attention implementations one call of fn dispatched to (aten op names)."""
    from torch.profiler import profile
    with profile() as prof:
        fn()
    return sorted({e.name for e in prof.events() if e.name.startswith("aten::_scaled_dot_product")
                   or e.name.startswith("aten::_efficient_attention") or e.name.startswith("aten::_flash_attention")})
