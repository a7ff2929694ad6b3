"""Step 3: apply an adversarial perturbation r to a photo and see the prediction change.

    python step_3_adversarial.py IMAGE [--perturbation outputs/adversarial_r.npy] [--output outputs/adversarial.png]
                                       [--model resnet18] [--device auto|cpu|cuda] [--no-figure]

The perturbation file format is the tutorial's: a float NumPy array of shape (1, 3, H, W) (or (3, H, W)), H x W the
image the model sees (224 x 224 for ResNet18), in the model's *normalized* units, i.e. added to (x - mean) / std. The tutorial's
published `adversarial_r.npy` is in ResNet18's units; the `adversarial_r.npy` that step 5 writes is in the units of
the `--model` it was made for, so use it with that same `--model`. Both are read with allow_pickle=False.

The new prediction is made on the saved PNG read back from disk: that file is what a person would share. The figure
applied.png, beside the output, shows the result: the original, the adversarial image and the applied perturbation
magnified, each with what the model predicts.
"""
from pathlib import Path

import torch

from step_2_pretrained import (add_model_arguments, get_device, get_label, model_from_args, predict_images, prepare_image,
                               to_tensor, to_uint8)
from utils.cli import ArgumentParser, UsageError, run
from utils.figures import comparison_figure
from utils.files import remove_killed_writes_of, save_figure, save_image
from utils.flags import add_device_argument, add_figure_argument
from utils.perturbations import load_perturbation

DEFAULT_PERTURBATION = "outputs/adversarial_r.npy"
FIGURE = "applied.png"


def get_adversarial_example(image_u8, r, model):
    """x + r, where r is in the model's normalized units: clipped to valid pixels and rounded to an 8-bit image.
    (The tutorial inverted the normalization with 0.255 instead of 0.225 for blue and truncated instead of rounding.)"""
    pixels = to_tensor(image_u8) + torch.from_numpy(r) * model.std.cpu()
    return to_uint8(pixels.clamp(0, 1))[0]


def main(args):
    if Path(args.output).suffix.lower() != ".png":
        raise UsageError(f"--output must be a .png: a lossy format would change the perturbation, got {args.output}")
    figure = Path(args.output).parent / FIGURE
    remove_killed_writes_of([args.output, figure])
    model = model_from_args(args, get_device(args.device))
    image = prepare_image(args.image, model)
    r = load_perturbation(args.perturbation, image.shape[:2])
    saved = save_image(get_adversarial_example(image, r, model), args.output)
    adversarial = prepare_image(saved, model)  # the file, read back
    old, new = (get_label(predict_images(model, picture)[0], model.classes) for picture in (image, adversarial))
    print(f"Old prediction: {old}")
    print(f"New prediction: {new}")
    if args.figure:
        save_figure(comparison_figure(image, adversarial, old, new), figure)


def get_args_parser():
    parser = ArgumentParser(description="Apply an adversarial perturbation r to a photo (the tutorial's step 3).")
    parser.add_argument("image", help="path to the photo")
    parser.add_argument("--perturbation", default=DEFAULT_PERTURBATION,
                        help="float .npy of shape (1, 3, 224, 224) in the model's normalized units (default: %(default)s)")
    parser.add_argument("--output", default="outputs/adversarial.png", help="where to save the PNG (default: %(default)s)")
    add_model_arguments(parser)
    add_device_argument(parser)
    add_figure_argument(parser, f"{FIGURE} beside --output (original, adversarial, the perturbation magnified)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
