"""Training data for the encoder: JSONL records (gundam.data.records), a dataset of uint8 views, `collate` into the
encoder's `Batch` and a batch sampler that fills batches by a budget of views (gundam.data.dataset), and the
rendered overfit set (gundam.data.overfit).

    ds = GundamDataset.from_jsonl("overfit/records.jsonl", mode="gundam")
    sampler = ViewBudgetSampler(ds.views, budget=24, seed=0)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=collate, num_workers=2, pin_memory=True)
    for rb in loader:                       # RecordBatch
        out = encoder(rb.batch)             # uint8 pixels, normalised on the encoder's device
        per_image = out.split()             # the i-th goes with rb.records[i]

Images are decoded and cropped in the worker through `gundam.images.image_views`, the code path `preprocess`
uses; pixels stay uint8 (4x fewer bytes between processes and to the device than float32).
"""
from gundam.data.dataset import Example, GundamDataset, RecordBatch, ViewBudgetSampler, collate
from gundam.data.records import Record, read_records, write_records

__all__ = ["Record", "read_records", "write_records", "Example", "GundamDataset", "RecordBatch", "collate",
           "ViewBudgetSampler"]
