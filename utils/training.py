"""The pieces of step 9 that are not the training loop: the architectures and the checkpoint (the export is
utils.models.export_program's).

- `build_net`: "small-cnn" (a few conv layers, for small images such as the 32x32 digits), "mlp" (a small fully
  connected ReLU network, small enough for step 10's exact verifier), or any torchvision or timm architecture name,
  with random initial weights and `classes` outputs.
- checkpoints hold plain tensors, state dicts and numbers only, so that `torch.load(weights_only=True)` reads them
  (a checkpoint file is never unpickled).
"""
import pickle
import warnings

import torch
import torchvision
from torch import nn

from utils.cli import UsageError
from utils.files import atomic_path
from utils.models import torchvision_classifiers

SMALL_CNN = "small-cnn"
MLP = "mlp"
MLP_WIDTH = 100


class SmallCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels, each a 3x3 conv and ReLU, the last two after a 2x2 max pool), average
    pooled to 4x4, then two linear layers: about 3 million multiply-adds per 32x32 image, so PGD training on a few
    thousand images takes seconds per epoch on a CPU. No batch norm: the attack that makes the training examples sees
    the same function as the training step."""

    def __init__(self, classes, width=16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2), nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(4))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


def mlp(classes, side=32, width=MLP_WIDTH):
    """Flatten, then two hidden layers of `width` ReLUs and a linear layer to `classes` logits, on side x side RGB
    images: 200 ReLUs in all, so that an exact verifier (mixed-integer programming, one binary per ReLU it cannot
    decide from bounds) answers in seconds. Takes only side x side images (32 for the digits)."""
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * side * side, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, classes))


def build_net(arch, classes, side=32):
    """A network with random weights and `classes` outputs; the caller seeds torch first (its initialization).
    `side`: the image side, which only the fully connected "mlp" depends on."""
    if arch == SMALL_CNN:
        return SmallCNN(classes)
    if arch == MLP:
        return mlp(classes, side)
    if arch in torchvision_classifiers():
        return torchvision.models.get_model(arch, weights=None, num_classes=classes)
    with warnings.catch_warnings():  # timm's import warns that torch.jit.interface is deprecated: not the user's concern
        warnings.simplefilter("ignore", FutureWarning)
        import timm
    name = arch.removeprefix("timm:")
    if name in timm.list_models():
        return timm.create_model(name, pretrained=False, num_classes=classes)
    raise UsageError(f"unknown architecture {arch!r}: give {SMALL_CNN}, {MLP}, a torchvision classifier (such as "
                     "resnet18) or a timm model name (such as timm:resnet18)")


# ---- checkpoints ----------------------------------------------------------------------------------------------

def save_checkpoint(state, path):
    """`state`: numbers, strings, lists/dicts of them, tensors and state dicts; written atomically (a kill mid-write
    leaves the previous epoch's checkpoint whole)."""
    with atomic_path(path) as temp:
        torch.save(state, temp)


def load_checkpoint(path):
    """A checkpoint written by save_checkpoint, read without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{path}: not a readable step 9 checkpoint ({reason})")
