"""vLLM's DeepSeek-OCR models, patched once their weights are loaded and processed (imported by vLLM only, through
the plugin in gundam.hosts.vllm when GUNDAM_PATCH_VLLM=1). vLLM finds a subclass's multimodal processor through the
MRO (its ClassRegistry), so the subclasses need no registration of their own.

The patch is applied in the model-level hook `process_weights_after_loading`, which vLLM's loaders (the default
one and the dummy one alike) call after every layer's quant method has processed its weights: on vLLM's CPU
platform that is after CLIP's linears were repacked, so the encoder is built once, around what the host keeps
(gundam.hosts.shared: the packed linears are run through the host's layers)."""
import os

from vllm.model_executor.models import deepseek_ocr

from gundam import hosts


class PatchAfterLoading:
    # vLLM reads encoder-CUDA-graph support off the class too: the patched encoder runs eagerly
    encoder_cudagraph_forward = None

    def process_weights_after_loading(self):
        hook = getattr(super(), "process_weights_after_loading", None)
        if hook is not None:
            hook()
        hosts.patch(self, backend=os.environ.get("GUNDAM_BACKEND", "auto"))


class DeepseekOCRForCausalLM(PatchAfterLoading, deepseek_ocr.DeepseekOCRForCausalLM):
    pass


try:
    from vllm.model_executor.models import deepseek_ocr2
except ImportError:  # a vLLM without DeepSeek-OCR 2
    deepseek_ocr2 = None

if deepseek_ocr2 is not None:
    class DeepseekOCR2ForCausalLM(PatchAfterLoading, deepseek_ocr2.DeepseekOCR2ForCausalLM):
        pass


try:
    from vllm.model_executor.models import unlimited_ocr
except ImportError:  # a vLLM without Unlimited-OCR
    unlimited_ocr = None

if unlimited_ocr is not None:
    class UnlimitedOCRForCausalLM(PatchAfterLoading, unlimited_ocr.UnlimitedOCRForCausalLM):
        pass
