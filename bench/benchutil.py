"""Shared by the GPU benchmarks (imported as a sibling module: run them as `python bench/<name>.py`)."""
import torch


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
