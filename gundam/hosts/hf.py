"""Hugging Face remote code: `AutoModel.from_pretrained("deepseek-ai/DeepSeek-OCR", trust_remote_code=True)`.

Read (behaviour only) in the HF repository's `modeling_deepseekocr.py`, as published in public copies of it
(e.g. zyfjrx/deepseekocr ff1b80f): `DeepseekOCRForCausalLM.model` is a `DeepseekOCRModel`
(a `DeepseekV2Model`) holding sam_model, vision_model, projector, image_newline, view_seperator. Its `forward`
encodes inline, under no_grad, when the step is a prefill (or training) and the first row's global view is not
all zeros: per batch row one `(crops [N, 3, S, S], global [1, 3, B, B])` tuple in `images` and its `[w, h]`
in `images_spatial_crop` (all-zero crops = no crops), one image after another with a pass per view kind; the
row's tokens are scattered into `inputs_embeds[row]` where `images_seq_mask[row]` is set (the mask is moved
with a hard-coded `.cuda()`), then `DeepseekV2Model.forward` runs on `inputs_embeds`. `infer(...)` moves its
inputs with `.cuda()` and calls `generate`.

The patch replaces `DeepseekOCRModel.forward` on the instance: the same steps, all rows' images in one encoder
pass, the mask moved to the embeddings' device; and wraps `infer` so that, on a model that is not on a GPU, its
`.cuda()` calls move tensors to the model's device instead.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


def replacements(model, owner, encoder):
    vendor_cls = next(c for c in type(owner).__mro__ if c.__name__ == "DeepseekOCRModel")

    def forward(input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                use_cache=None, output_attentions=None, output_hidden_states=None, images=None, images_seq_mask=None,
                images_spatial_crop=None, return_dict=None):
        if inputs_embeds is None:
            inputs_embeds = owner.get_input_embeddings()(input_ids)
        prefill = inputs_embeds.shape[1] != 1 or owner.training
        if images and prefill and bool(images[0][1].sum() != 0):
            n = min(len(images), len(images_spatial_crop))       # the vendor zips rows with their grids
            rows = encoder().forward_vendor([images[i][1] for i in range(n)], [images[i][0][None] for i in range(n)],
                                            [images_spatial_crop[i] for i in range(n)])
            mask = images_seq_mask.to(inputs_embeds.device)
            for i, tokens in enumerate(rows):
                inputs_embeds[i].masked_scatter_(mask[i].unsqueeze(-1), tokens.to(inputs_embeds.dtype))
        # the language model, as the vendor calls it
        return super(vendor_cls, owner).forward(
            input_ids=None, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict)

    out = [(owner, "forward", forward)]
    for parent in model.modules():  # the DeepseekOCRForCausalLM around the patched model
        if getattr(parent, "model", None) is owner and callable(getattr(parent, "infer", None)):
            out.append((parent, "infer", _on_device(parent.infer, encoder)))
    return out


def _on_device(infer, encoder):
    def wrapped(*args, **kwargs):
        device = encoder().device
        if device.type == "cuda":
            return infer(*args, **kwargs)
        with CudaCallsTo(device):
            return infer(*args, **kwargs)
    return wrapped


class CudaCallsTo(TorchFunctionMode):
    """While active, `tensor.cuda()` moves the tensor to `device` instead (the vendor's `infer` hard-codes it)."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0].to(self.device)
        return func(*args, **(kwargs or {}))
