"""SGLang: `DeepseekOCRForCausalLM` of `python/sglang/srt/models/deepseek_ocr.py`.

Read (behaviour only) at sgl-project/sglang 092e3a4 and b4ea46f: `get_image_feature(items)` ->
`_process_image_input(items)` stacks the items' `feature` [1, 3, B, B], `images_crop` [1, N, 3, S, S] and
`images_spatial_crop` into the per-image layout and calls `_pixel_values_to_embedding`, which encodes one image
after another (crops iff not all zeros) and returns one tensor per image; the caller concatenates them. Stacking
items whose crop counts differ crashed (sglang PR 33214 then encoded item by item; issue 33408 reports the same
for Unlimited-OCR).

SGLang's `UnlimitedOCRForCausalLM` (models/unlimited_ocr.py, read at 17b6716) has the same encoder attributes
and methods; its items may hold several images each (feature [k, 3, B, B], images_crop [k, N, 3, S, S],
images_spatial_crop [1, k, 2]) and may carry `has_local_crops` flags, which its processor sets exactly when the
crops are not the all-zero placeholder (the test used here).

The patch replaces `_process_image_input` (the items' images as per-image lists, so different crop counts need
no stacking, and all images go through the encoder in one pass) and `_pixel_values_to_embedding` on the
instance.
"""
from __future__ import annotations

import torch

from gundam.hosts.shared import PixelValuesToEmbedding


def replacements(model, owner, state):
    return [(owner, "_pixel_values_to_embedding", PixelValuesToEmbedding(state)),
            (owner, "_process_image_input", ProcessImageInput(state))]


class ProcessImageInput:
    """`_process_image_input(mm_items)`, patched: every image of every item in one encoder pass (an object, not
    a closure: see gundam.hosts.shared.PixelValuesToEmbedding)."""

    def __init__(self, state):
        self.state = state

    def __call__(self, mm_items):
        pixel_values, images_crop, spatial = [], [], []
        for item in mm_items:               # one entry per image: an item holds k >= 1 images
            grids = torch.as_tensor(item.images_spatial_crop).reshape(-1, 2)
            for i in range(item.feature.shape[0]):
                pixel_values.append(item.feature[i:i + 1])           # [1, 3, B, B]
                images_crop.append(item.images_crop[i:i + 1])        # [1, N, 3, S, S]
                spatial.append(grids[i])
        return torch.cat(self.state.current().forward_vendor(pixel_values, images_crop, spatial))
