"""The analytic cost model: FLOPs, HBM bytes and memory per stage of the encoder, and a roofline floor per GPU
(gundam.cost.model, which defines every count); its text report, sweep CSV and plot (gundam.cost.report).

    r = gundam.cost.estimate(2000, 3000, mode="gundam")   # CostReport
    print(gundam.cost.format_report(r, gpu="h100"))
"""
from gundam.cost.model import (COST_STAGES, DTYPE_NAMES, GPU, GPUS, OCR2_COST_STAGES, CostReport, Floor, StageCost,
                               clip_weight_elems, estimate, get_gpu, qwen2_weight_elems, sam_weight_elems)
from gundam.cost.report import SWEEP_ASPECTS, SWEEP_SIDES, format_report, plot, sweep, write_csv

__all__ = [
    "estimate", "CostReport", "StageCost", "Floor", "GPU", "GPUS", "get_gpu", "COST_STAGES", "OCR2_COST_STAGES",
    "DTYPE_NAMES",
    "sam_weight_elems", "clip_weight_elems", "qwen2_weight_elems",
    "format_report", "sweep", "write_csv", "plot", "SWEEP_SIDES", "SWEEP_ASPECTS",
]
