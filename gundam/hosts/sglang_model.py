"""SGLang's DeepSeek-OCR model, patched after it loads its weights. Register it before launching the server
(SGLang's documented way to add a model implementation without changing its source):

    from sglang.srt.models.registry import ModelRegistry
    from gundam.hosts.sglang_model import DeepseekOCRForCausalLM
    ModelRegistry.models["DeepseekOCRForCausalLM"] = DeepseekOCRForCausalLM

`GUNDAM_BACKEND` picks the backend (default "auto")."""
import os

from sglang.srt.models import deepseek_ocr

from gundam.hosts import patch


class DeepseekOCRForCausalLM(deepseek_ocr.DeepseekOCRForCausalLM):
    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        patch(self, backend=os.environ.get("GUNDAM_BACKEND", "auto"))
        return loaded
