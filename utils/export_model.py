"""Export any classifier this project loads to a model file: a torch.export program (.pt2) with its normalization
inside and a dynamic batch dimension, and its class list beside it (NAME.classes.txt), which every script then takes
as `--model NAME.pt2`.

    python utils/export_model.py [--model efficientnet_lite0] [--output outputs/efficientnet_lite0.pt2]

It is the README's recipe for "Your own model", run on a model that works offline.
"""
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from step_2_pretrained import OFFLINE_MODEL, add_model_arguments, model_from_args  # noqa: E402
from utils.cli import ArgumentParser, UsageError, run  # noqa: E402
from utils.files import atomic_path, save_text  # noqa: E402


class Normalized(nn.Module):
    """The model-file contract: RGB pixels in [0, 1] in, logits out, the network's normalization inside."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pixels):
        return self.net((pixels - self.mean) / self.std)


def export(model, path):
    """Save `model` (a step_2_pretrained.Classifier) as a .pt2 program at its input size, the batch dimension dynamic."""
    size = model.preprocessing.crop_size
    if size is None:
        raise UsageError(f"{model.name} has no fixed input size: pass --input-size N")
    plain = Normalized(model.net, model.preprocessing.mean, model.preprocessing.std).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(plain, (torch.zeros(2, 3, size, size),), dynamic_shapes=({0: batch},))
    with atomic_path(path) as temp:
        torch.export.save(program, temp)
    return path


def main(args):
    output = Path(args.output or f"outputs/{Path(args.model).stem}.pt2")
    if output.suffix != ".pt2":
        raise UsageError(f"--output must end in .pt2, got {output.name}")
    model = model_from_args(args, "cpu")
    export(model, output)
    classes = save_text("\n".join(model.classes) + "\n", output.with_suffix(".classes.txt"))
    print(f"Wrote {output} ({len(model.classes)} classes, {model.preprocessing.crop_size} x "
          f"{model.preprocessing.crop_size} RGB in [0, 1]) and {classes}")


def get_args_parser():
    parser = ArgumentParser(description="Export a classifier to a .pt2 model file with its class list beside it.")
    add_model_arguments(parser, default=OFFLINE_MODEL)
    parser.add_argument("--output", help="the .pt2 file to write (default: outputs/MODEL.pt2)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
