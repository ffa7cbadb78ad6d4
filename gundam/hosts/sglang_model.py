"""SGLang's DeepSeek-OCR models, patched after they load their weights. Register them before launching the
server (SGLang's documented way to add a model implementation without changing its source):

    from sglang.srt.models.registry import ModelRegistry
    from gundam.hosts.sglang_model import DeepseekOCRForCausalLM
    ModelRegistry.models["DeepseekOCRForCausalLM"] = DeepseekOCRForCausalLM

(`UnlimitedOCRForCausalLM` likewise, for baidu/Unlimited-OCR, where that SGLang has it.) `GUNDAM_BACKEND` picks
the backend (default "auto")."""
from sglang.srt.models import deepseek_ocr

from gundam.hosts import PatchAfterLoading


class DeepseekOCRForCausalLM(PatchAfterLoading, deepseek_ocr.DeepseekOCRForCausalLM):
    pass


try:
    from sglang.srt.models import unlimited_ocr
except ImportError:  # an SGLang without Unlimited-OCR
    unlimited_ocr = None

if unlimited_ocr is not None:
    class UnlimitedOCRForCausalLM(PatchAfterLoading, unlimited_ocr.UnlimitedOCRForCausalLM):
        pass
