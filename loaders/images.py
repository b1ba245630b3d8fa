"""Picture files, read one way everywhere: EXIF rotation applied (a phone photo is upright wherever it is used),
RGB, float32 in [0, 1]."""
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import LoadError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def open_rgb(path) -> Image.Image:
    """The picture as an upright RGB PIL image, fully read; LoadError naming the file when it cannot be read."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError:
        raise LoadError(f"{path}: no such picture file.") from None
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise LoadError(f"{path} could not be read as a picture ({type(e).__name__}: {e}). Replace or remove "
                        f"the file.") from None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1] of an RGB PIL image."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)


def load_image(path) -> torch.Tensor:
    """(H, W, 3) float32 in [0, 1], upright (EXIF), RGB."""
    return to_tensor(open_rgb(path))
