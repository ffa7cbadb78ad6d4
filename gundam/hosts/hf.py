"""Hugging Face remote code: `AutoModel.from_pretrained("deepseek-ai/DeepSeek-OCR", trust_remote_code=True)`.

Read (behaviour only) in the HF repository's `modeling_deepseekocr.py`, as published in public copies of it
(e.g. zyfjrx/deepseekocr ff1b80f): `DeepseekOCRForCausalLM.model` is a `DeepseekOCRModel`
(a `DeepseekV2Model`) holding sam_model, vision_model, projector, image_newline, view_seperator. Its `forward`
encodes inline, under no_grad, when the step is a prefill (or training) and the first row's global view sums to
anything but 0: per batch row one `(crops [N, 3, S, S], global [1, 3, B, B])` tuple in `images` and its `[w, h]`
in `images_spatial_crop` (crops that sum to 0 = no crops), one image after another with a pass per view kind; the
row's tokens are scattered into `inputs_embeds[row]` where `images_seq_mask[row]` is set (the mask is moved
with a hard-coded `.cuda()`), then `DeepseekV2Model.forward` runs on `inputs_embeds`. `infer(...)` moves its
inputs with `.cuda()` and calls `generate`.

DeepSeek-OCR 2's `modeling_deepseekocr2.py` (HF repository deepseek-ai/DeepSeek-OCR-2; read in public copies of
it, RealBSMC/OpenNoteVisionLM 0b1e2f7 and sen-ye/DeepSeek-OCR2-query-ablation d397ea1, which agree on the
encoding, not on their own additions: device moves, ablation hooks):
`DeepseekOCR2ForCausalLM.model` is a `DeepseekOCR2Model` holding sam_model, qwen2_model, projector and
view_seperator, whose `forward` is the same loop with DeepEncoder V2: per row the crops' tokens (one crop after
another, when the crops are not all zeros), the global view's, the separator; `infer` crops only images larger
than 768 px, at 768 px, with 1024 px global views.

The patch replaces `DeepseekOCRModel.forward` (or `DeepseekOCR2Model.forward`) on the instance: the same steps, all rows' images in one encoder
pass, the mask moved to the embeddings' device; and wraps `infer` so that, on a model that is not on a GPU, its
`.cuda()` calls move tensors to the model's device instead. Which rows have an image is read from
`images_seq_mask` (a row with image positions), not from pixel sums: the vendor's test, the first row's global
view `sum != 0`, skips the images of a batch whose first page's normalised pixels happen to sum to 0.
"""
from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode

MODELS = ("DeepseekOCRModel", "DeepseekOCR2Model")   # the remote code's model classes that were read


def replacements(model, owner, state):
    out = [(owner, "forward", Forward(state))]
    for parent in model.modules():  # the DeepseekOCRForCausalLM around the patched model
        if getattr(parent, "model", None) is owner and callable(getattr(parent, "infer", None)):
            out.append((parent, "infer", OnDevice(state, parent)))
    return out


class Forward:
    """`DeepseekOCRModel.forward`, patched (an object, not a closure: a copied or unpickled model's forward is
    that model's; see gundam.hosts.shared.PixelValuesToEmbedding)."""

    def __init__(self, state):
        self.state = state    # gundam.hosts.Patch; state.owner is the DeepseekOCRModel

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                 inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None, images=None,
                 images_seq_mask=None, images_spatial_crop=None, return_dict=None):
        owner = self.state.owner
        if inputs_embeds is None:
            inputs_embeds = owner.get_input_embeddings()(input_ids)
        prefill = inputs_embeds.shape[1] != 1 or owner.training
        if images and prefill and images_seq_mask is not None:
            mask = images_seq_mask.to(inputs_embeds.device)
            n = min(len(images), len(images_spatial_crop), mask.shape[0])   # the vendor zips rows with grids
            rows = [i for i in range(n) if bool(mask[i].any())]              # rows that have image positions
            if rows:
                tokens = self.state.current().forward_vendor(
                    [images[i][1] for i in rows], [images[i][0][None] for i in rows],
                    [images_spatial_crop[i] for i in rows])
                for i, t in zip(rows, tokens):
                    inputs_embeds[i].masked_scatter_(mask[i].unsqueeze(-1), t.to(inputs_embeds.dtype))
        # the language model, as the vendor calls it
        vendor_cls = next(c for c in type(owner).__mro__ if c.__name__ in MODELS)
        return super(vendor_cls, owner).forward(
            input_ids=None, attention_mask=attention_mask, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, position_ids=position_ids,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict)


class OnDevice:
    """`DeepseekOCRForCausalLM.infer`, wrapped: on a model that is not on a GPU, its `.cuda()` calls move
    tensors to the model's device."""

    def __init__(self, state, parent):
        self.state, self.parent = state, parent
        self.previous = parent.__dict__.get("infer")   # an instance-level infer set before the patch, if any

    def __call__(self, *args, **kwargs):
        infer = self.previous or type(self.parent).infer.__get__(self.parent)
        device = self.state.current().device
        if device.type == "cuda":
            return infer(*args, **kwargs)
        with CudaCallsTo(device):
            return infer(*args, **kwargs)


class CudaCallsTo(TorchFunctionMode):
    """While active, `tensor.cuda()` moves the tensor to `device` instead (the vendor's `infer` hard-codes it)."""

    def __init__(self, device):
        super().__init__()
        self.device = device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda:
            return args[0].to(self.device)
        return func(*args, **(kwargs or {}))
