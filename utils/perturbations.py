"""The tutorial's perturbation file: r, a float array (1, 3, H, W) in the model's *normalized* units (added to
(x - mean) / std), saved as .npy. Reading one never unpickles (`load_perturbation`); `perturbation_from_images` is
the r that turns one 8-bit image into another, which step 3's get_adversarial_example applies."""
from pathlib import Path

import numpy as np

from utils.cli import UsageError
from utils.images import to_tensor


def load_perturbation(path, size):
    """The float32 array (1, 3, H, W) in `path`, `size` being H = W or (H, W); anything else raises UsageError
    (never unpickles)."""
    height, width = (size, size) if isinstance(size, int) else size
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such perturbation file (step 5 writes one: python step_5_perturb.py IMAGE)")
    try:
        r = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise UsageError(f"{path}: not a NumPy .npy array saved without pickle ({str(error).splitlines()[0]})")
    if not isinstance(r, np.ndarray) or not np.issubdtype(r.dtype, np.floating):
        raise UsageError(f"{path}: the perturbation must be a float array, got {getattr(r, 'dtype', type(r).__name__)}")
    if r.ndim == 3:
        r = r[None]
    if r.shape != (1, 3, height, width):
        raise UsageError(f"{path}: the perturbation must have shape (1, 3, {height}, {width}), got {tuple(r.shape)}")
    if not np.isfinite(r).all():
        raise UsageError(f"{path}: the perturbation holds NaN or infinite values")
    return r.astype(np.float32)


def perturbation_from_images(adversarial_u8, original_u8, model):
    """The r (tutorial format, the model's normalized units) that turns one 8-bit image into another."""
    difference = to_tensor(adversarial_u8) - to_tensor(original_u8)
    return (difference / model.std.cpu()).numpy().astype(np.float32)

