import os

# Triton kernels run in the interpreter on CPU; this must be set before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from gundam.config import ClipConfig, EncoderConfig, Mode, SamConfig  # noqa: E402

# A tiny encoder with the real structure: window and global SAM blocks, windows that need padding
# (view grids 12 and 16 with window 5), CLIP with a resized position grid, the real 2048 -> 1280 projector.
TINY = EncoderConfig(
    sam=SamConfig(img_size=256, embed_dim=48, depth=3, num_heads=3, window_size=5, global_attn_indexes=(1,)),
    clip=ClipConfig(num_layers=2, num_attention_heads=16, ffn_hidden_size=96, image_size=42, patch_size=14),
)
TINY_MODE = Mode(base_size=256, image_size=192, crop_mode=True)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random (the vendor init leaves pos_embed and rel-pos at zero, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if p.dim() == 1 else 1.0 / max(1, p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
    return module


@pytest.fixture(scope="session")
def tiny_encoder():
    from gundam.encoder import GundamEncoder
    torch.manual_seed(0)
    return randomize(GundamEncoder(TINY)).eval()
