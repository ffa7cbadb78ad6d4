"""vLLM's DeepSeek-OCR model, patched after it loads its weights (imported by vLLM only, through the plugin in
gundam.hosts.vllm when GUNDAM_PATCH_VLLM=1)."""
import os

from vllm.model_executor.models import deepseek_ocr
from vllm.multimodal import MULTIMODAL_REGISTRY

from gundam.hosts import patch


@MULTIMODAL_REGISTRY.register_processor(deepseek_ocr.DeepseekOCRMultiModalProcessor,
                                        info=deepseek_ocr.DeepseekOCRProcessingInfo,
                                        dummy_inputs=deepseek_ocr.DeepseekOCRDummyInputsBuilder)
class DeepseekOCRForCausalLM(deepseek_ocr.DeepseekOCRForCausalLM):
    # vLLM reads encoder-CUDA-graph support off the class too: the patched encoder runs eagerly
    encoder_cudagraph_forward = None

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        patch(self, backend=os.environ.get("GUNDAM_BACKEND", "auto"))
        return loaded
