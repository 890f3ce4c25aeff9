"""Pictures for the ImageNet tests: smooth, JPEG-like content (upsampled noise, not flat colour)."""
import numpy as np
from PIL import Image


def smooth_image(w: int, h: int, seed: int, mode: str = "RGB", cell: int = 24) -> Image.Image:
    """A ``w`` x ``h`` picture in ``mode``: uniform noise on a grid of ``cell``-pixel squares,
    upsampled bicubically."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, h // cell), max(2, w // cell), 3), dtype=np.uint8)
    img = Image.fromarray(small, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    return img if mode == "RGB" else img.convert(mode)
