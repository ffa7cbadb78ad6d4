"""SGLang: `DeepseekOCRForCausalLM` of `python/sglang/srt/models/deepseek_ocr.py`.

Read (behaviour only) at sgl-project/sglang 092e3a4 and b4ea46f: `get_image_feature(items)` ->
`_process_image_input(items)` stacks the items' `feature` [1, 3, B, B], `images_crop` [1, N, 3, S, S] and
`images_spatial_crop` into the per-image layout and calls `_pixel_values_to_embedding`, which encodes one image
after another (crops iff not all zeros) and returns one tensor per image; the caller concatenates them. Stacking
items whose crop counts differ crashed (sglang PR 33214 then encoded item by item; issue 33408 reports the same
for Unlimited-OCR).

The patch replaces `_process_image_input` (per-item lists, so different crop counts need no stacking, and all
items go through the encoder in one pass) and `_pixel_values_to_embedding` on the instance.
"""
from __future__ import annotations

import torch


def replacements(model, owner, encoder):
    def pixel_values_to_embedding(pixel_values, images_crop, images_spatial_crop):
        return encoder().forward_vendor(pixel_values, images_crop, images_spatial_crop)

    def process_image_input(mm_items):
        tokens = encoder().forward_vendor([item.feature for item in mm_items], [item.images_crop for item in mm_items],
                                          [item.images_spatial_crop for item in mm_items])
        return torch.cat(tokens)

    return [(owner, "_pixel_values_to_embedding", pixel_values_to_embedding),
            (owner, "_process_image_input", process_image_input)]
