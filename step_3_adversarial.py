"""Step 3: apply an adversarial perturbation r to a photo and see the prediction change.

    python step_3_adversarial.py IMAGE [--perturbation outputs/adversarial_r.npy] [--output outputs/adversarial.png]
                                       [--model resnet18] [--device auto|cpu|cuda]

The perturbation file format is the tutorial's: a float NumPy array of shape (1, 3, H, W) (or (3, H, W)), H x W the
image the model sees (224 x 224 for ResNet18), in the model's *normalized* units, i.e. added to (x - mean) / std. The tutorial's
published `adversarial_r.npy` is in ResNet18's units; the `adversarial_r.npy` that step 5 writes is in the units of
the `--model` it was made for, so use it with that same `--model`. Both are read with allow_pickle=False.

The new prediction is made on the saved PNG read back from disk: that file is what a person would share.
"""
from pathlib import Path

import numpy as np
import torch

from step_2_pretrained import (add_model_arguments, get_device, get_label, model_from_args, predict_images, prepare_image,
                               to_tensor, to_uint8)
from utils.cli import ArgumentParser, UsageError, run
from utils.files import save_image

DEFAULT_PERTURBATION = "outputs/adversarial_r.npy"


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


def get_adversarial_example(image_u8, r, model):
    """x + r, where r is in the model's normalized units: clipped to valid pixels and rounded to an 8-bit image.
    (The tutorial inverted the normalization with 0.255 instead of 0.225 for blue and truncated instead of rounding.)"""
    pixels = to_tensor(image_u8) + torch.from_numpy(r) * model.std.cpu()
    return to_uint8(pixels.clamp(0, 1))[0]


def read_back(path, model):
    """The image a person receiving the file would classify."""
    return prepare_image(path, model)


def main(args):
    if Path(args.output).suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png: a lossy format would change the perturbation, got {args.output}")
    model = model_from_args(args, get_device(args.device))
    image = prepare_image(args.image, model)
    r = load_perturbation(args.perturbation, image.shape[:2])
    saved = save_image(get_adversarial_example(image, r, model), args.output)
    print(f"Old prediction: {get_label(predict_images(model, image)[0], model.classes)}")
    print(f"New prediction: {get_label(predict_images(model, read_back(saved, model))[0], model.classes)}")


def get_args_parser():
    parser = ArgumentParser(description="Apply an adversarial perturbation r to a photo (the tutorial's step 3).")
    parser.add_argument("image", help="path to the photo")
    parser.add_argument("--perturbation", default=DEFAULT_PERTURBATION,
                        help="float .npy of shape (1, 3, 224, 224) in the model's normalized units (default: %(default)s)")
    parser.add_argument("--output", default="outputs/adversarial.png", help="where to save the PNG (default: %(default)s)")
    add_model_arguments(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
