"""gundam: DeepSeek-OCR's vision encoder (DeepEncoder) in Gundam dynamic-crop mode, and DeepSeek-OCR 2's
(DeepEncoder V2), fast and exact.

    import gundam
    enc = gundam.GundamEncoder.from_pretrained("DeepSeek-OCR/")
    out = enc(gundam.preprocess(["page.png"]))        # EncoderOutput: packed embeddings + offsets

Data path: images -> `preprocess` (gundam.images) -> `Batch` -> `GundamEncoder` (gundam.encoder: each block's
torch forward and its packed Triton forward in gundam.model, the packed plan in gundam.packed) ->
`EncoderOutput` (gundam.output), laid out as gundam.layout says.
`patch(model)` routes a Hugging Face, vLLM or SGLang DeepSeek-OCR model's image encoding (or that of transformers'
native DeepSeek-OCR 2 or Unlimited-OCR model) through the encoder (gundam.hosts). `read_embeddings(dir)` reads
what `gundam encode-dataset` wrote (gundam.bulk).
"""
from gundam.bulk import read_embeddings
from gundam.config import MODES, ClipConfig, EncoderConfig, Mode, Ocr2Config, ProjectorConfig, Qwen2Config, SamConfig
from gundam.cost import estimate
from gundam.encoder import GundamEncoder
from gundam.hosts import patch, unpatch
from gundam.images import Batch, preprocess
from gundam.layout import count_image_tokens, crop_grid
from gundam.output import EncoderOutput

__version__ = "0.1.0"

__all__ = [
    "GundamEncoder", "EncoderOutput", "Batch", "preprocess", "crop_grid", "count_image_tokens",
    "EncoderConfig", "SamConfig", "ClipConfig", "ProjectorConfig", "Ocr2Config", "Qwen2Config", "Mode", "MODES",
    "estimate",
    "patch", "unpatch", "read_embeddings",
]
