"""SGLang: `DeepseekOCRForCausalLM` of `python/sglang/srt/models/deepseek_ocr.py` (DeepSeek-OCR and, since one
class serves both, DeepSeek-OCR 2) and `UnlimitedOCRForCausalLM` of `models/unlimited_ocr.py` (baidu/Unlimited-OCR).

Read (behaviour only) in the released sglang 0.5.23: `get_image_feature(items)` -> `_process_image_input(items)`
-> `_pixel_values_to_embedding(pixel_values, images_crop, images_spatial_crop, has_local_crops=None)`, which
encodes one image after another (crops iff `has_local_crops[j]`, else iff they are not all zeros) and returns one
tensor per image; `_process_image_input` concatenates them, in the vision tower's dtype. `self.is_ocr2` (from
the checkpoint's config) picks the family: DeepSeek-OCR's SAM -> CLIP -> projector with a newline per row, or
DeepSeek-OCR 2's SAM -> Qwen2 (`qwen2_model`) -> projector, crops' tokens one crop after another.

An item (`MultimodalDataItem`, what SGLang's processors in configs/deepseek_ocr.py and configs/unlimited_ocr.py
make) holds one request's k >= 1 images: `feature` [k, 3, B, B], `images_crop` [1, all crops of the k images,
3, S, S] (one all-zero crop when none has crops), `images_spatial_crop` [1, k, 2] (columns, rows per image; an
image has w*h crops when its grid is not 1x1), `has_local_crops` (one bool, or one per image for Unlimited-OCR).
DeepSeek-OCR's `_process_image_input` goes item by item (items of one image each: its per-item formatting takes
one); Unlimited-OCR's stacks the items' tensors, which crashes when their crop counts differ (sglang issue 33408).

The patch replaces `_process_image_input` (every image of every item in one encoder pass, crops split per image
by the grids, so different crop counts need no stacking) and `_pixel_values_to_embedding` (the per-image
layout, `has_local_crops` accepted: the grids say the same) on the instance.
"""
from __future__ import annotations

import torch

from gundam.hosts.shared import PixelValuesToEmbedding


def replacements(model, owner, state):
    return [(owner, "_pixel_values_to_embedding", PixelValuesToEmbedding(state)),
            (owner, "_process_image_input", ProcessImageInput(state))]


class ProcessImageInput:
    """`_process_image_input(mm_items)`, patched: every image of every item in one encoder pass, returned as the
    host returns it (the images' tokens concatenated, in the encoder's dtype). An object, not a closure: see
    gundam.hosts.shared.PixelValuesToEmbedding."""

    def __init__(self, state):
        self.state = state

    def __call__(self, mm_items):
        enc = self.state.current()
        pixel_values, crops, grids = [], [], []
        for n, item in enumerate(mm_items):
            feature = item.feature if item.feature.dim() == 4 else item.feature[None]    # [k, 3, B, B]
            k = feature.shape[0]
            grid = torch.as_tensor(item.images_spatial_crop).reshape(-1, 2).long()       # [k, 2]
            if grid.shape[0] != k:
                raise ValueError(f"gundam.patch: item {n} has {k} images and images_spatial_crop "
                                 f"{list(torch.as_tensor(item.images_spatial_crop).shape)}, expected one "
                                 f"(columns, rows) per image")
            counts = [w * h if (w, h) != (1, 1) else 0 for w, h in grid.tolist()]
            pixel_values.append(feature)
            crops.extend(_item_crops(n, item.images_crop, counts))
            grids.append(grid)
        return torch.cat(enc.forward_vendor(torch.cat(pixel_values), torch.cat(crops), torch.cat(grids)))


def _item_crops(n, images_crop, counts) -> list[torch.Tensor]:
    """An item's crops [sum of counts, 3, S, S]: all the item's crops in one run ([1, N, 3, S, S], SGLang's
    processors; a zero placeholder when no image has crops) or one row per image ([k, N, 3, S, S], the first
    count of each row)."""
    S = images_crop.shape[-3:]
    if images_crop.dim() == 5 and images_crop.shape[0] == len(counts) > 1:
        return [row[:c] for row, c in zip(images_crop, counts)]
    flat = images_crop.reshape(-1, *S)
    total = sum(counts)
    if total == 0:
        return [flat[:0]]
    if flat.shape[0] != total:
        raise ValueError(f"gundam.patch: item {n} holds {flat.shape[0]} crops, its images_spatial_crop asks for "
                         f"{total} (w*h of each image whose grid is not 1x1)")
    return [flat]
