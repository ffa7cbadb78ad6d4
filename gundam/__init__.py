"""gundam: DeepSeek-OCR's vision encoder (DeepEncoder) in Gundam dynamic-crop mode, fast and exact."""
from gundam.config import ClipConfig, EncoderConfig, Mode, MODES, ProjectorConfig, SamConfig

__version__ = "0.1.0"
