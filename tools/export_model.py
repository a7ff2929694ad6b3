"""Export any classifier this project loads to a model file: a torch.export program (.pt2) with its normalization
inside and a dynamic batch dimension, and its class list beside it (NAME.classes.txt), which every script then takes
as `--model NAME.pt2`.

    python -m tools.export_model [--model efficientnet_lite0] [--output outputs/efficientnet_lite0.pt2]

It is the README's recipe for "Your own model", run on a model that works offline.
"""
from pathlib import Path

from utils.cli import ArgumentParser, UsageError, run
from utils.flags import add_model_arguments
from utils.models import OFFLINE_MODEL, classes_path, export_program, load_model, normalized


def main(args):
    output = Path(args.output or f"outputs/{Path(args.model).stem}.pt2")
    if output.suffix != ".pt2":
        raise UsageError(f"--output must end in .pt2, got {output.name}")
    model = load_model(args.model, "cpu", classes=args.classes, input_size=args.input_size)
    export_program(normalized(model), output, model.classes, model.preprocessing.crop_size)
    print(f"Wrote {output} ({len(model.classes)} classes, {model.preprocessing.crop_size} x "
          f"{model.preprocessing.crop_size} RGB in [0, 1]) and {classes_path(output)}")


def get_args_parser():
    parser = ArgumentParser(description="Export a classifier to a .pt2 model file with its class list beside it.")
    add_model_arguments(parser, default=OFFLINE_MODEL)
    parser.add_argument("--output", help="the .pt2 file to write (default: outputs/MODEL.pt2)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
