"""The one exporter: any classifier this project loads, written as a model file every script takes (`--model
NAME.pt2`): a torch.export program with the normalization inside and a dynamic batch dimension, saved atomically,
and its class list beside it (`utils.models.labels.classes_path`)."""
import torch
from torch import nn

from utils.cli import UsageError
from utils.files import atomic_path, save_text
from utils.models.labels import classes_path

MAX_BATCH = 4096  # the largest batch the exported program accepts: every --batch-size the scripts allow


class Normalized(nn.Module):
    """The model-file contract: RGB pixels in [0, 1] in, logits out, the network's normalization inside."""

    def __init__(self, net, mean, std):
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, pixels):
        return self.net((pixels - self.mean) / self.std)


def normalized(model):
    """A Classifier's network with its normalization in front, as a plain module: what a model file holds."""
    return Normalized(model.net, model.preprocessing.mean, model.preprocessing.std).eval()


def export_program(module, path, classes, size):
    """Save `module` (RGB pixels in [0, 1] -> logits: a Classifier, or `normalized(classifier)`) as the .pt2 program
    `path` for size x size images with a dynamic batch dimension (1..MAX_BATCH), and `classes` as `classes_path(path)`;
    returns the exported program."""
    if size is None:
        raise UsageError(f"{getattr(module, 'name', 'the model')} has no fixed input size: pass `input_size` N",
                         "input_size")
    device = next(iter(module.parameters()), torch.zeros(())).device
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    with torch.no_grad():
        program = torch.export.export(module.eval(), (torch.zeros(2, 3, size, size, device=device),),
                                      dynamic_shapes=({0: batch},))
    with atomic_path(path) as temp:
        torch.export.save(program, temp)
    save_text("".join(f"{name}\n" for name in classes), classes_path(path))
    return program
