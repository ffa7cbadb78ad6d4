"""Shared by the benchmarks (imported as a sibling module: run them as `python bench/<name>.py`) and the tests
(tests/testutils.py takes the tiny configs from here: one set for both)."""
import platform
import statistics
import time

import torch

import dataclasses

from gundam.config import MODES, ClipConfig, EncoderConfig, Mode, Ocr2Config, ProjectorConfig, Qwen2Config, SamConfig

# Tiny encoders for smoke runs and tests, each with the real structure at reduced widths.
# TINY: window and global SAM blocks, windows that need padding (view grids 12 and 16 with window 5), CLIP with
# a resized position grid, the real 2048 -> 1280 projector.
TINY = EncoderConfig(
    sam=SamConfig(img_size=256, embed_dim=48, depth=3, num_heads=3, window_size=5, global_attn_indexes=(1,)),
    clip=ClipConfig(num_layers=2, num_attention_heads=16, ffn_hidden_size=96, image_size=42, patch_size=14),
)
TINY_MODE = Mode(base_size=256, image_size=192, crop_mode=True)
# SMALL: smaller than TINY so Triton's interpreter stays quick: global views 192 px (grid 12, pos/rel tables
# resized), crops 128 px (grid 8); windows of 5 need padding on both; CLIP keeps its real 1024 width.
SMALL = EncoderConfig(
    sam=SamConfig(img_size=128, embed_dim=32, depth=2, num_heads=2, window_size=5, global_attn_indexes=(1,)),
    clip=ClipConfig(num_layers=1, num_attention_heads=16, ffn_hidden_size=64, image_size=28, patch_size=14),
)
SMALL_MODE = Mode(192, 128, True)
# TRAIN: small in every width, for training in the interpreter (its cost is per program, and the LayerNorms run
# one program per token): a window block (windows of 3 pad the 8x8 and 4x4 grids) and a global block, tables
# resized for both view sizes, two CLIP layers, a small projector.
TRAIN = EncoderConfig(
    sam=SamConfig(img_size=192, embed_dim=32, depth=2, num_heads=2, window_size=3, global_attn_indexes=(1,),
                  out_chans=32, net_2_chans=48, net_3_chans=64),
    clip=ClipConfig(hidden_size=64, num_layers=2, num_attention_heads=2, ffn_hidden_size=96, image_size=42,
                    patch_size=14),
    projector=ProjectorConfig(input_dim=128, n_embed=96),
)
TRAIN_MODE = Mode(128, 64, True)   # global views 8x8 patches, crops 4x4
# MICRO: smaller still, every width reduced (plumbing, not numerics): a few hundred kB.
MICRO = EncoderConfig(
    sam=SamConfig(img_size=128, embed_dim=24, depth=2, num_heads=2, window_size=5, global_attn_indexes=(1,),
                  out_chans=16, net_2_chans=32, net_3_chans=48),
    clip=ClipConfig(hidden_size=48, num_layers=1, num_attention_heads=4, ffn_hidden_size=40, image_size=28,
                    patch_size=14),
    projector=ProjectorConfig(input_dim=96, n_embed=40),
)

# OCR2_TINY: DeepSeek-OCR 2's structure at reduced widths: SAM with window and global blocks (windows of 5 pad
# the 16x16 and 12x12 grids), a 2-layer GQA Qwen2 (4 heads, 2 kv heads), 256 px global views and 192 px crops
# (query tables of 16 and 9 rows).
OCR2_TINY = Ocr2Config(
    sam=SamConfig(img_size=256, embed_dim=48, depth=3, num_heads=3, window_size=5, global_attn_indexes=(1,),
                  net_3_chans=64),
    qwen2=Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=96),
    projector=ProjectorConfig(input_dim=64, n_embed=80), base_size=256, image_size=192,
)
OCR2_TINY_MODE = dataclasses.replace(MODES["ocr2"], base_size=256, image_size=192)
# OCR2_TRAIN: DeepSeek-OCR 2's structure small enough to train in the interpreter: 192 px global views (12x12
# patches, 3x3 tokens) and 128 px crops (8x8, 2x2), windows of 5 padding both grids, a 2-layer GQA Qwen2.
OCR2_TRAIN = Ocr2Config(
    sam=SamConfig(img_size=192, embed_dim=32, depth=2, num_heads=2, window_size=5, global_attn_indexes=(1,),
                  out_chans=32, net_2_chans=32, net_3_chans=64),
    qwen2=dataclasses.replace(OCR2_TINY.qwen2, intermediate_size=80),
    projector=ProjectorConfig(input_dim=64, n_embed=48), base_size=192, image_size=128,
)
OCR2_TRAIN_MODE = dataclasses.replace(MODES["ocr2"], base_size=192, image_size=128)


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
