"""Step 2: ask an ImageNet-pretrained classifier what is in a photo.

    python step_2_pretrained.py IMAGE [--model resnet18|FILE.pt2|FILE.pt|timm:NAME|robustbench:DATASET/THREAT/NAME]
                                      [--classes FILE] [--input-size N] [--top-k 5] [--device auto|cpu|cuda]
                                      [--output-dir outputs] [--no-figure]

prints "Prediction: Pembroke, Pembroke Welsh corgi" and then the top K classes with their probabilities, and draws
them (the photo as the model sees it beside its top K classes as bars, at most 20) in predictions.png in the output
dir.

As in the tutorial, every later step imports its helpers from this module: the label map, the image transform, image
loading, model loading and prediction. They live in utils/ (utils/models/ for the classifier, its loaders and its
class names; utils/images.py for files and tensors) and are re-exported here under the tutorial's names. Images
travel as 8-bit arrays (what a file holds) and enter a model as float tensors in [0, 1]; each model normalizes inside
itself, so attacks and defenses work on pixels and an epsilon of 10 means 10 levels out of 255.

The later steps and the page also read their shared flags here (model_from_args, prepared_model, chosen_target,
attack_options, defense_settings): utils/flags.py declares the flags, these turn a parsed command line into the
library's explicit parameters, and nothing in utils/ takes a Namespace.
"""
from pathlib import Path

from utils import speed
from utils.cli import ArgumentParser, UsageError, number_in, run
from utils.files import remove_killed_writes_of, save_figure
from utils.flags import add_device_argument, add_figure_argument, add_model_arguments
from utils.images import load_image, to_rgb, to_tensor, to_uint8
from utils.models import (DEFAULT_MODEL, DEFAULT_TARGET, IMAGENET_LABELS, OFFLINE_MODEL, Classifier, Preprocessing, find_class, freeze,
                          get_idx_to_label, get_image_transform, get_label, load_efficientnet_lite0, load_model,
                          load_torchvision, predict, predict_images, prepare_image, prepare_images,
                          torchvision_classifiers)
from utils.speed import get_device

LABELS_PATH = IMAGENET_LABELS
FIGURE = "predictions.png"

__all__ = ["DEFAULT_MODEL", "LABELS_PATH", "OFFLINE_MODEL", "Classifier", "Preprocessing", "add_model_arguments",
           "find_class", "freeze", "get_device", "get_idx_to_label", "get_image_transform", "get_label",
           "load_efficientnet_lite0", "load_image", "load_model", "load_torchvision", "model_from_args", "predict",
           "prepared_model", "chosen_target", "attack_options", "defense_settings", "top_k",
           "predict_images", "prepare_image", "prepare_images", "to_rgb", "to_tensor", "to_uint8",
           "torchvision_classifiers"]


def main(args):
    model = model_from_args(args, get_device(args.device))
    image = prepare_image(args.image, model)
    top = top_k(model, image, args.top_k)
    print(f"Prediction: {get_label(top[0][0], model.classes)}")
    for rank, (index, probability) in enumerate(top, 1):
        print(f"{rank:>3}. {probability:6.2%}  {get_label(index, model.classes)} ({index})")
    if args.figure:
        draw_predictions(image, [get_label(index, model.classes) for index, _ in top],
                         [probability for _, probability in top], Path(args.output_dir) / FIGURE)


def top_k(model, image, k):
    """The model's `k` most probable classes for the 8-bit HxWx3 `image` (all of them if it has fewer), most probable
    first: [(class index, probability)]. Step 2 prints and draws them; the page shows them."""
    top = predict(model, to_tensor(image))[0].topk(min(k, len(model.classes)))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def draw_predictions(image, labels, probabilities, path):
    """The figure, matplotlib imported only here: every later step imports this module for its helpers."""
    from utils.figures import predictions_figure
    remove_killed_writes_of([path])
    return save_figure(predictions_figure(image, labels, probabilities), path)


def get_args_parser():
    parser = ArgumentParser(description="Classify a photo with an ImageNet-pretrained model (the tutorial's step 2).")
    parser.add_argument("image", help="path to a photo (any format PIL reads)")
    add_model_arguments(parser)
    parser.add_argument("--top-k", type=number_in(1, 1000, int, name="--top-k"), default=5, help="classes to list (default: %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--output-dir", default="outputs", help=f"where to write {FIGURE} (default: %(default)s)")
    add_figure_argument(parser, f"{FIGURE} (the photo and its top classes as bars)")
    return parser


# ---- the shared flags as the library's parameters (steps 3 to 10 and the page) ---------------------------------

def model_from_args(args, device):
    """load_model with the command line's --model, --classes and --input-size."""
    return load_model(args.model, device, classes=getattr(args, "classes", None),
                      input_size=getattr(args, "input_size", None))


def prepared_model(args, device, batch_size, model=None):
    """The --model loaded (or `model`, a network given in its place) and set up by --precision, --memory-format and
    --compile (utils.speed.prepare_model). A precision the device cannot run is refused before the model is loaded:
    the load can take long, or fail offline."""
    speed.check_precision(args.precision, device)
    return speed.prepare_model(model if model is not None else model_from_args(args, device), args.precision,
                               args.memory_format, batch_size, device, compile=getattr(args, "compile", False))


def chosen_target(args, default=DEFAULT_TARGET):
    """The class text to reach: --target, else `default` (None: no target unless one is given); None when
    --untargeted. --target and --untargeted together are refused."""
    if args.untargeted and args.target is not None:
        raise UsageError("--target and --untargeted exclude each other")
    if args.untargeted:
        return None
    return default if args.target is None else args.target


def attack_options(args, **extra):
    """The attack's keyword arguments (utils.attacks.make_attack) from the command line."""
    options = dict(epsilon=args.epsilon, steps=args.steps, alpha=args.alpha, targeted=not args.untargeted,
                   early_stop=not args.no_early_stop, random_start=args.random_start, restarts=args.restarts,
                   seed=args.seed, c=args.c, decay=args.decay, loss=args.loss, target_classes=args.target_classes,
                   queries=args.queries, precision=args.precision, norm=getattr(args, "norm", None) or "Linf")
    options.update(extra)
    return options


def defense_settings(args):
    """The defense's parameters (utils.defenses.make_defense) from the command line."""
    return {"quality": args.quality, "bits": args.bits, "size": args.size, "sigma": args.sigma, "scale": args.scale}


if __name__ == "__main__":
    run(main, get_args_parser())
