"""Images as the steps pass them around: reading a file (any format PIL reads, upright, as 8-bit RGB), 8-bit HxWx3
arrays (what a file holds) and float batches in [0, 1] (what a model takes); finding the photos in a folder and
naming their outputs."""
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from utils.cli import UsageError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def to_rgb(image):
    """Any PIL image as 8-bit RGB: 16-bit scaled down, transparency composited on white, CMYK and palettes converted."""
    if image.mode.startswith("I") or image.mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        scale = 257.0 if image.mode.startswith("I") else 1.0
        image = Image.fromarray(np.clip(np.round(levels / scale), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path):
    """Open an image file as an RGB PIL image, upright per its EXIF; bad files raise UsageError naming the problem."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UsageError(f"{path}: image is too large (over {Image.MAX_IMAGE_PIXELS} pixels); refusing a possible decompression bomb")
    except UnidentifiedImageError:
        raise UsageError(f"{path}: not an image file (PIL cannot identify it)")
    except (OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"{path}: cannot read the image, it may be truncated or corrupt ({error})")


def to_tensor(images_u8, device="cpu"):
    """8-bit HxWx3 arrays (one or a list) as a float batch (B, 3, H, W) in [0, 1], contiguous: the attacks' arithmetic
    flattens images per row (a view only in this layout), and the model puts its input in its own format anyway."""
    batch = np.stack([images_u8] if np.ndim(images_u8) == 3 else list(images_u8))
    return torch.from_numpy(batch).to(device).permute(0, 3, 1, 2).contiguous().float().div(255)


def to_uint8(batch):
    """A float batch in [0, 1] as a list of 8-bit HxWx3 arrays (rounded to the nearest level)."""
    levels = batch.detach().mul(255).round().clamp(0, 255).to(torch.uint8)
    return list(levels.permute(0, 2, 3, 1).cpu().numpy())


def images_in(folder):
    """The image files directly inside `folder`, sorted (by suffix: reading them is the loader's job)."""
    return sorted(path for path in Path(folder).iterdir() if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)


def list_images(paths):
    """The image files named, with folders expanded to the images directly inside them (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = images_in(path)
            if not inside:
                raise UsageError(f"{path}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        else:
            found.append(path)
    return found


def output_names(paths):
    """A distinct file stem per input, so two cat.jpg from different folders do not overwrite each other."""
    names, seen = [], {}
    for path in paths:
        seen[path.stem] = seen.get(path.stem, 0) + 1
        names.append(path.stem if seen[path.stem] == 1 else f"{path.stem}_{seen[path.stem]}")
    return names
