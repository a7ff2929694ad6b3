"""Model files: `FILE.pt2`, a torch.export program (torch.export.save, batch dimension dynamic), and `FILE.pt`, a
TorchScript module. The contract: input float RGB in [0, 1], shape (N, 3, H, W); output logits (N, C);
normalization inside the file. Loading never unpickles arbitrary objects: every tensor is read weights-only, and an
archive holding Python objects (or compiled AOTInductor code) is refused unread (`check_export_archive`);
`load_program` is the one checked loader of a .pt2 file.
"""
import zipfile
from pathlib import Path

import torch
from torch import nn

from utils.cli import UsageError
from utils.models.guards import first_line, warnings_silenced, weights_only_loads
from utils.models.labels import model_classes

FILE_SUFFIXES = (".pt2", ".pt")
PROBE_SIZE = 32  # the side of the blank image a model file is probed with when no --input-size says otherwise


class ExportedNet(nn.Module):
    """A loaded model file inside our modules. torch.export programs refuse .train() and .eval(), and so would any
    module holding one when .eval() recurses (ours in freeze(), torchattacks' too): this wrapper records the mode
    and does not pass it on. The file's network is in inference form already (it was exported or scripted so)."""

    def __init__(self, net, path):
        super().__init__()
        self.net = net
        self.path = str(path)

    def train(self, mode=True):
        self.training = mode
        return self

    def forward(self, pixels):
        try:
            return self.net(pixels)
        except Exception as error:  # a program's shape guard, a scripted assert: the user's file refuses this input
            raise UsageError(f"{self.path}: the model fails on an input of shape {tuple(pixels.shape)} "
                             f"({first_line(error)}); pass `input_size` with the size it was made for",
                             "input_size") from None


def check_export_archive(path):
    """UsageError unless `path` is a .pt2 archive whose payload is tensors and a graph: constants that are Python
    objects would be unpickled, and AOTInductor packages are compiled code, so both are refused unread."""
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: not a torch.export program (a .pt2 file is a zip archive written by torch.export.save)")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if not any(name.endswith("/archive_format") or name == "archive_format" for name in names):
        raise UsageError(f"{path}: not a torch.export program (no archive_format entry: write it with torch.export.save)")
    for name in names:
        parts = name.split("/")
        if "aotinductor" in parts:
            raise UsageError(f"{path}: holds AOTInductor compiled code, which this project does not run; "
                             "save the torch.export program itself with torch.export.save")
        if "constants" in parts and parts[-1].startswith(("custom_obj", "opaque_obj")):
            raise UsageError(f"{path}: holds Python objects ({parts[-1]}), which loading would unpickle; refused")


def load_export(path):
    """(module, fixed image side or None) of a torch.export program, read weights-only."""
    check_export_archive(path)
    try:
        with weights_only_loads():
            program = torch.export.load(str(path))
    except Exception as error:  # a damaged archive fails anywhere in torch's deserializer
        raise UsageError(f"{path}: cannot load the torch.export program ({first_line(error)})")
    return program.module(), fixed_side(program)



def load_program(path):
    """The callable module of a saved .pt2 program, checked and read weights-only as every model file is (it refuses
    .train() and .eval(): `ExportedNet` holds it where a mode is set)."""
    return load_export(path)[0]


def fixed_side(program):
    """The image side a program was exported for when its height and width are static and equal, else None: the
    size its images are resized and cropped to unless --input-size says otherwise."""
    inputs = [node for node in program.graph.nodes if node.op == "placeholder"
              and node.name in program.graph_signature.user_inputs]
    value = inputs[0].meta.get("val") if len(inputs) == 1 else None
    shape = getattr(value, "shape", ())
    if len(shape) == 4 and all(isinstance(side, int) for side in shape[2:]) and shape[2] == shape[3]:
        return shape[2]
    return None


def load_torchscript(path):
    """A TorchScript module (torch.jit.save); TorchScript's own reader builds only tensors and scripted code."""
    if not zipfile.is_zipfile(path):
        raise UsageError(f"{path}: not a TorchScript module (a .pt model file is a zip archive written by torch.jit.save)")
    try:
        with warnings_silenced():
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # e.g. a torch.save state dict: a zip, but no code in it
        raise UsageError(f"{path}: not a TorchScript module ({first_line(error)}); "
                         "save the model with torch.export.save as .pt2 (or torch.jit.save as .pt)")


def is_model_file(name):
    return Path(str(name)).suffix.lower() in FILE_SUFFIXES


def output_count(net, path, size):
    """C, from one forward of two blank images: anything but (2, C) float logits raises UsageError."""
    side = size or PROBE_SIZE
    with torch.no_grad():
        logits = net(torch.zeros(2, 3, side, side))  # ExportedNet names a refusal
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != 2 or not logits.is_floating_point():
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UsageError(f"{path}: the model must return float logits of shape (N, C); for N = 2 it returned {shape}")
    return logits.shape[1]


def load_model_file(path, classes_file=None, input_size=None):
    """(network, preprocessing settings, class names) of a .pt2 or .pt file. The file normalizes inside itself, so
    mean 0 and std 1; images are resized and cropped to input_size, else to the fixed size a .pt2 program was
    exported for, else used as they are."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such model file")
    net, side = load_export(path) if path.suffix.lower() == ".pt2" else (load_torchscript(path), None)
    net, input_size = ExportedNet(net, path), input_size or side
    classes = model_classes(output_count(net, path, input_size), classes_file, path)
    settings = dict(crop_size=input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return net, settings, classes

