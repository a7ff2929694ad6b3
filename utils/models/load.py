"""`load_model`, the one way every script, the page and the tests get a classifier: a torchvision ImageNet classifier
name, efficientnet_lite0 (offline), a model file (.pt2, .pt), timm:NAME or robustbench:DATASET/THREAT/NAME, frozen,
on a device, once per process."""
import dataclasses
import difflib
import functools

from utils import speed
from utils.cli import UsageError
from utils.models import model_files, zoo
from utils.models.classifier import Classifier, Preprocessing, freeze
from utils.models.labels import model_classes
from utils.models.zoo import OFFLINE_MODEL, ROBUSTBENCH_PREFIX, TIMM_PREFIX

DEFAULT_MODEL = "resnet18"


def load_named(name, input_size=None):
    """A classifier by name, before freezing: a model file, a timm: or robustbench: zoo model, efficientnet_lite0 or
    a torchvision ImageNet classifier (utils/models/model_files.py and zoo.py)."""
    if model_files.is_model_file(name):
        return from_parts(name, *model_files.load_model_file(name, input_size=input_size))
    if name.startswith(TIMM_PREFIX):
        return from_parts(name, *zoo.load_timm(name.removeprefix(TIMM_PREFIX), input_size))
    if name.startswith(ROBUSTBENCH_PREFIX):
        return from_parts(name, *zoo.load_robustbench(name.removeprefix(ROBUSTBENCH_PREFIX), input_size))
    if name == OFFLINE_MODEL:
        model = zoo.load_efficientnet_lite0()
    elif name in zoo.torchvision_classifiers():
        model = zoo.load_torchvision(name)
    else:
        close = difflib.get_close_matches(name, zoo.torchvision_classifiers() + [OFFLINE_MODEL], n=4)
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
        model.classes = model_classes(len(model.classes), classes)
    model = freeze(model)
    if fold and not model_files.is_model_file(name):
        model.net = speed.fold_batch_norms(model.net)
    return model.to(device)

