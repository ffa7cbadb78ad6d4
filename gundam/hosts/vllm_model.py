"""vLLM's DeepSeek-OCR models, patched after they load their weights (imported by vLLM only, through the plugin
in gundam.hosts.vllm when GUNDAM_PATCH_VLLM=1). vLLM finds a subclass's multimodal processor through the MRO
(its ClassRegistry), so the subclasses need no registration of their own."""
from vllm.model_executor.models import deepseek_ocr

from gundam import hosts


class PatchAfterLoading(hosts.PatchAfterLoading):
    # vLLM reads encoder-CUDA-graph support off the class too: the patched encoder runs eagerly
    encoder_cudagraph_forward = None


class DeepseekOCRForCausalLM(PatchAfterLoading, deepseek_ocr.DeepseekOCRForCausalLM):
    pass


try:
    from vllm.model_executor.models import unlimited_ocr
except ImportError:  # a vLLM without Unlimited-OCR
    unlimited_ocr = None

if unlimited_ocr is not None:
    class UnlimitedOCRForCausalLM(PatchAfterLoading, unlimited_ocr.UnlimitedOCRForCausalLM):
        pass
