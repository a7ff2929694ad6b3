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
"""
from pathlib import Path

from utils.cli import ArgumentParser, number_in, run
from utils.files import remove_killed_writes_of, save_figure
from utils.flags import add_device_argument, add_figure_argument, add_model_arguments, model_from_args
from utils.images import load_image, to_rgb, to_tensor, to_uint8
from utils.models import (DEFAULT_MODEL, IMAGENET_LABELS, OFFLINE_MODEL, Classifier, Preprocessing, find_class, freeze,
                          get_idx_to_label, get_image_transform, get_label, load_efficientnet_lite0, load_model,
                          load_torchvision, predict, predict_images, prepare_image, prepare_images,
                          torchvision_classifiers)
from utils.speed import get_device

LABELS_PATH = IMAGENET_LABELS
FIGURE = "predictions.png"

__all__ = ["DEFAULT_MODEL", "LABELS_PATH", "OFFLINE_MODEL", "Classifier", "Preprocessing", "add_model_arguments",
           "find_class", "freeze", "get_device", "get_idx_to_label", "get_image_transform", "get_label",
           "load_efficientnet_lite0", "load_image", "load_model", "load_torchvision", "model_from_args", "predict",
           "predict_images", "prepare_image", "prepare_images", "to_rgb", "to_tensor", "to_uint8",
           "torchvision_classifiers"]


def main(args):
    model = model_from_args(args, get_device(args.device))
    image = prepare_image(args.image, model)
    probabilities = predict(model, to_tensor(image))[0]
    top = probabilities.topk(min(args.top_k, len(model.classes)))
    print(f"Prediction: {get_label(top.indices[0], model.classes)}")
    for rank, (probability, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>3}. {probability:6.2%}  {get_label(index, model.classes)} ({index})")
    if args.figure:
        draw_predictions(image, [get_label(index, model.classes) for index in top.indices.tolist()], top.values.tolist(),
                         Path(args.output_dir) / FIGURE)


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


if __name__ == "__main__":
    run(main, get_args_parser())
