"""Small stand-ins for the hosts' DeepSeek-OCR classes, for tests where the host package is not installed.

Each follows its host's contract as read from the host's code (class and attribute names, method signatures,
inputs and data flow; commits named in gundam/hosts/*.py): the vendor's per-image encoding loop, the host's
input layout, its batching. The encoder modules are this project's torch modules, which carry the vendor's
module and parameter names, at the tiny test size; the language model is an embedding table and, for HF, an
lm_head.
"""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn

from gundam.model import build_modules
from testutils import OCR2_TINY, TINY, randomize

N_EMBED = TINY.projector.n_embed
VOCAB = 40


def add_encoder(module: nn.Module, seed: int):
    """sam_model, vision_model, projector, image_newline, view_seperator, random (vendor names)."""
    for name, part in build_modules(TINY).items():
        setattr(module, name, part)
    std = 1 / math.sqrt(N_EMBED)
    module.image_newline = nn.Parameter(torch.randn(N_EMBED) * std)
    module.view_seperator = nn.Parameter(torch.randn(N_EMBED) * std)
    randomize(module, seed)


def image_tokens(host, crops, glob, grid):
    """One image the vendor's way: a SAM -> CLIP -> projector pass for its crops [w*h, 3, S, S] (None: no crops)
    and one for its global view [3, B, B], rows assembled token by token with explicit indices."""
    def encode(x):
        sam = host.sam_model(x)
        clip = host.vision_model(x, sam)
        return host.projector(torch.cat([clip[:, 1:], sam.flatten(2).permute(0, 2, 1)], dim=-1))

    rows = []
    if crops is not None:
        w, h = int(grid[0]), int(grid[1])
        local = encode(crops)                                       # [w*h, qi*qi, D]
        qi = math.isqrt(local.shape[1])
        for r in range(h * qi):
            rows += [local[(r // qi) * w + c // qi, (r % qi) * qi + c % qi] for c in range(w * qi)]
            rows.append(host.image_newline)
    glob_tokens = encode(glob[None])[0]                             # [qb*qb, D]
    qb = math.isqrt(glob_tokens.shape[0])
    for r in range(qb):
        rows += list(glob_tokens[r * qb:(r + 1) * qb]) + [host.image_newline]
    rows.append(host.view_seperator)
    return torch.stack(rows)


def vendor_encode_image(host, patches, image_ori, crop_shape):
    """The vendor's per-image step: crops when they are not all zeros. patches [N, 3, S, S]; image_ori [1, 3, B, B]."""
    with_crops = patches.shape[0] and torch.sum(patches).item() != 0
    return image_tokens(host, patches if with_crops else None, image_ori[0], crop_shape)


# ---------------------------------------------------------------------------------------------------------
# Hugging Face remote code (modeling_deepseekocr.py)

class DeepseekV2Model(nn.Module):
    """The language model: here its embedding table, returning the embeddings it is given."""

    def __init__(self, dim=N_EMBED):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, dim)

    def get_input_embeddings(self):
        return self.embed_tokens

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        return (inputs_embeds,)


class DeepseekOCRModel(DeepseekV2Model):
    def __init__(self, seed=0):
        super().__init__()
        add_encoder(self, seed)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                images=None, images_seq_mask=None, images_spatial_crop=None, return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        sam_model = getattr(self, "sam_model", None)
        if sam_model is not None and (input_ids.shape[1] != 1 or self.training) and torch.sum(images[0][1]).item() != 0:
            for idx, (image, crop_shape) in enumerate(zip(images, images_spatial_crop)):
                with torch.no_grad():
                    tokens = vendor_encode_image(self, image[0], image[1], crop_shape)
                inputs_embeds[idx].masked_scatter_(images_seq_mask[idx].unsqueeze(-1).cuda(), tokens)
        return super(DeepseekOCRModel, self).forward(
            input_ids=None, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict)


class DeepseekOCR2Model(DeepseekV2Model):
    """DeepSeek-OCR 2's remote code (modeling_deepseekocr2.py): sam_model, qwen2_model, projector, view_seperator;
    per row the crops' tokens one crop after another (when not all zeros), the global view's, the separator."""

    def __init__(self, seed=0):
        super().__init__(OCR2_TINY.projector.n_embed)
        for name, part in build_modules(OCR2_TINY).items():
            setattr(self, name, part)
        self.view_seperator = nn.Parameter(torch.randn(OCR2_TINY.projector.n_embed) / math.sqrt(OCR2_TINY.projector.n_embed))
        randomize(self, seed)

    def encode(self, x):
        return self.projector(self.qwen2_model(self.sam_model(x)))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                images=None, images_seq_mask=None, images_spatial_crop=None, return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        if (input_ids.shape[1] != 1 or self.training) and torch.sum(images[0][1]).item() != 0:
            for idx, (image, crop_shape) in enumerate(zip(images, images_spatial_crop)):
                patches, image_ori = image
                with torch.no_grad():
                    parts = [self.encode(patches).flatten(0, 1)] if torch.sum(patches).item() != 0 else []
                    tokens = torch.cat(parts + [self.encode(image_ori).flatten(0, 1), self.view_seperator[None]])
                inputs_embeds[idx].masked_scatter_(images_seq_mask[idx].unsqueeze(-1).cuda(), tokens)
        return super(DeepseekOCR2Model, self).forward(
            input_ids=None, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict)


class HFDeepseekOCRForCausalLM(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.model = DeepseekOCRModel(seed)
        self.lm_head = nn.Linear(N_EMBED, VOCAB, bias=False)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                images=None, images_seq_mask=None, images_spatial_crop=None, return_dict=None):
        outputs = self.model(input_ids=input_ids, past_key_values=past_key_values, attention_mask=attention_mask,
                             position_ids=position_ids, inputs_embeds=inputs_embeds, use_cache=use_cache,
                             images=images, images_seq_mask=images_seq_mask, images_spatial_crop=images_spatial_crop)
        return self.lm_head(outputs[0]).float()

    def infer(self, input_ids, images, images_seq_mask, images_spatial_crop):
        """The vendor's infer moves its inputs with hard-coded .cuda() before generating (here: one forward)."""
        with torch.no_grad():
            return self(input_ids.unsqueeze(0).cuda(), images=[(c.cuda(), g.cuda()) for c, g in images],
                        images_seq_mask=images_seq_mask.unsqueeze(0).cuda(), images_spatial_crop=images_spatial_crop)


# ---------------------------------------------------------------------------------------------------------
# vLLM (vllm/model_executor/models/deepseek_ocr.py): flat layout, encoder-CUDA-graph protocol

class VllmDeepseekOCRForCausalLM(nn.Module):
    supports_encoder_cudagraph = True

    def __init__(self, seed=0):
        super().__init__()
        add_encoder(self, seed)

    def _pixel_values_to_embedding(self, pixel_values, images_crop, images_spatial_crop):
        is_tiled = (images_spatial_crop[:, 0] > 1) | (images_spatial_crop[:, 1] > 1)
        patches_per_image = torch.where(is_tiled, images_spatial_crop.prod(dim=-1), 0)
        images_crop = images_crop.split(patches_per_image.tolist())
        return [vendor_encode_image(self, images_crop[j], pixel_values[[j]], images_spatial_crop[j])
                for j in range(images_spatial_crop.size(0))]

    def _process_image_input(self, image_input):
        return self._pixel_values_to_embedding(pixel_values=image_input["data"],
                                               images_crop=image_input["images_crop"],
                                               images_spatial_crop=image_input["images_spatial_crop"].long())

    def embed_multimodal(self, **kwargs):
        return self._process_image_input({"data": kwargs["pixel_values"], "images_crop": kwargs["images_crop"],
                                          "images_spatial_crop": kwargs["images_spatial_crop"]})

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return inputs_embeds

    # SupportsEncoderCudaGraph (two of its methods; the rest follow the same pattern)
    def get_encoder_cudagraph_config(self):
        return {"modalities": ["image"]}

    def encoder_cudagraph_forward(self, values, path="default"):
        raise AssertionError("the vendor's encoder, captured for CUDA graphs")


# ---------------------------------------------------------------------------------------------------------
# SGLang 0.5.23 (python/sglang/srt/models/deepseek_ocr.py, unlimited_ocr.py): per-image layout, has_local_crops;
# items of one image each for DeepseekOCRForCausalLM (encoded item by item), stacked by UnlimitedOCRForCausalLM.
# tests/test_real_sglang.py checks these signatures and the item layout against the real classes.

class _SglangOCR(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        add_encoder(self, seed)

    def _pixel_values_to_embedding(self, pixel_values, images_crop, images_spatial_crop, has_local_crops=None):
        out = []
        with torch.no_grad():
            for j in range(images_spatial_crop.size(0)):
                patches = images_crop[j][0]
                crops = has_local_crops[j] if has_local_crops is not None else torch.sum(patches).item() != 0
                out.append(image_tokens(self, patches if crops else None, pixel_values[j][0], images_spatial_crop[j][0]))
        return out

    def get_image_feature(self, items):
        return self._process_image_input(items)

    def forward(self, input_ids, positions, forward_batch, **kwargs):
        return input_ids


class SglangDeepseekOCRForCausalLM(_SglangOCR):
    is_ocr2 = False                    # the real class serves DeepSeek-OCR 2 too (not stood in here)

    @staticmethod
    def _collect_mm_flag(items, flag_name):
        values = []
        for item in items:
            value = getattr(item, flag_name, None)
            if value is None:
                return None
            values.append(bool(value))
        return values

    def _process_image_input(self, mm_items):
        flags = self._collect_mm_flag(mm_items, "has_local_crops")
        out = []
        for idx, item in enumerate(mm_items):          # item by item: crop counts may differ
            spatial = item.images_spatial_crop.long()
            out.extend(self._pixel_values_to_embedding(
                pixel_values=item.feature.unsqueeze(0), images_crop=item.images_crop.unsqueeze(0),
                images_spatial_crop=spatial.unsqueeze(0) if spatial.dim() == 2 else spatial,
                has_local_crops=[flags[idx]] if flags is not None else None))
        return torch.cat(out)


class SglangUnlimitedOCRForCausalLM(_SglangOCR):
    """The same encoder methods; its items are stacked into one batch, which crashes when their crop counts
    differ (sglang issue 33408)."""

    @staticmethod
    def _collect_mm_flag(items, flag_name):
        values = []
        for item in items:
            value = getattr(item, flag_name, None)
            if value is None:
                return None
            values.extend(value) if isinstance(value, list) else values.append(bool(value))
        return values

    def _process_image_input(self, mm_items):
        flags = self._collect_mm_flag(mm_items, "has_local_crops")
        pixel_values = torch.stack([item.feature for item in mm_items])
        images_crop = torch.stack([item.images_crop for item in mm_items])
        spatial = torch.cat([item.images_spatial_crop for item in mm_items]).long()
        pixel_values = pixel_values.view(-1, 1, *pixel_values.shape[2:])
        images_crop = images_crop.view(-1, 1, *images_crop.shape[2:])
        spatial = spatial.view(-1, 1, *spatial.shape[2:])
        return torch.cat(self._pixel_values_to_embedding(pixel_values, images_crop, spatial, has_local_crops=flags))


def sglang_item(glob, crops, grid, S):
    """One image as SGLang's processor makes a MultimodalDataItem: feature [1, 3, B, B], images_crop
    [1, N, 3, S, S] (one all-zero crop when the image has none), images_spatial_crop [1, 1, 2], has_local_crops."""
    has = len(crops) > 0
    crops = crops if has else torch.zeros(1, 3, S, S)
    return SimpleNamespace(feature=glob[None], images_crop=crops[None], images_spatial_crop=torch.tensor([[list(grid)]]),
                           has_local_crops=has)
