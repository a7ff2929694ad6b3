"""Classifiers from anywhere: model files (.pt2, .pt), timm's zoo, RobustBench's zoo, and their class names.

step_2_pretrained.load_model dispatches here for every `--model` that is not a torchvision name:

- `FILE.pt2`: a torch.export program (torch.export.save, batch dimension dynamic); `FILE.pt`: a TorchScript module.
  The contract: input float RGB in [0, 1], shape (N, 3, H, W); output logits (N, C); normalization inside the file.
  Loading never unpickles arbitrary objects: every tensor is read weights-only, and an archive holding Python
  objects (or compiled AOTInductor code) is refused.
- `timm:NAME`: timm's model with its pretrained config (input size, interpolation, crop, mean, std); weights come
  through huggingface_hub's cache.
- `robustbench:DATASET/THREAT/NAME`: RobustBench's loader, with its checkpoints under $TORCH_HOME/robustbench.

A model's class names: `--classes FILE` (one per line), else the sidecar `<file without suffix>.classes.txt`, else
ImageNet's 1000 names when C == 1000, else "0".."C-1". Zoo models bring their own (ImageNet's, CIFAR-10's).
"""
import contextlib
import difflib
import functools
import io
import json
import math
import os
import sys
import zipfile
from pathlib import Path

import torch
from torch import nn
from torchvision import transforms

from utils.cli import UsageError
from utils.files import display_path

IMAGENET_LABELS = Path(__file__).resolve().parent.parent / "assets" / "imagenet_idx_to_label.json"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
FILE_SUFFIXES = (".pt2", ".pt")
TIMM_PREFIX, ROBUSTBENCH_PREFIX = "timm:", "robustbench:"
PROBE_SIZE = 32  # the side of the blank image a model file is probed with when no --input-size says otherwise


# ---- class names ----------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def imagenet_classes():
    """ImageNet-1k's 1000 names, in index order: the tutorial's label map."""
    with open(IMAGENET_LABELS) as handle:
        labels = json.load(handle)
    return tuple(labels[str(index)] for index in range(len(labels)))


def default_classes(count):
    """Names for a model that brings none: ImageNet's for 1000 outputs, else the indices "0".."C-1"."""
    return imagenet_classes() if count == 1000 else tuple(str(index) for index in range(count))


def read_classes(path):
    """The class names in a text file, one per line (blank lines at the end ignored); bad files raise UsageError."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such class list (one class name per line)")
    try:
        lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    except (UnicodeDecodeError, OSError) as error:
        raise UsageError(f"{path}: cannot read the class list as UTF-8 text ({error})")
    names = tuple(line.strip() for line in lines)
    if not any(names) or not all(names):
        raise UsageError(f"{path}: the class list has an empty line {names.index('') + 1}; one name per line")
    return names


def sidecar_classes(model_path):
    """The class list beside a model file, `<model path without suffix>.classes.txt`, or None."""
    sidecar = Path(model_path).with_suffix(".classes.txt")
    return sidecar if sidecar.is_file() else None


def model_classes(count, classes_path=None, model_path=None):
    """The names of a model's `count` classes: from --classes, else the model file's sidecar, else the default."""
    source = classes_path or (sidecar_classes(model_path) if model_path else None)
    if source is None:
        return default_classes(count)
    names = read_classes(source)
    if len(names) != count:
        raise UsageError(f"{source}: {len(names)} class names for a model with {count} outputs; "
                         f"the list needs one name per line, {count} lines")
    return names


# ---- model files ----------------------------------------------------------------------------------------------

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
                             f"({first_line(error)}); pass --input-size with the size it was made for") from None


@contextlib.contextmanager
def weights_only_loads():
    """Every torch.load inside reads tensors only, even where a library asks for weights_only=False
    (torch.export.load, timm's .bin fallback): a model file or a download is data, never code to run."""
    saved = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = saved


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


@contextlib.contextmanager
def warnings_silenced():
    """torch.jit warns that it is deprecated on every use: the README says so once, the user's output need not."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


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


def load_model_file(path, classes_path=None, input_size=None):
    """(network, preprocessing settings, class names) of a .pt2 or .pt file. The file normalizes inside itself, so
    mean 0 and std 1; images are resized and cropped to input_size, else to the fixed size a .pt2 program was
    exported for, else used as they are."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such model file")
    net, side = load_export(path) if path.suffix.lower() == ".pt2" else (load_torchscript(path), None)
    net, input_size = ExportedNet(net, path), input_size or side
    classes = model_classes(output_count(net, path, input_size), classes_path, path)
    settings = dict(crop_size=input_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return net, settings, classes


# ---- timm -----------------------------------------------------------------------------------------------------

def hub_cache():
    """huggingface_hub's cache folder (HF_HOME/hub, or HF_HUB_CACHE, default ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


def timm_download_hint(name, cfg):
    """Where timm's weights come from and where to put them by hand: the snapshot "main" of the model's hub repo."""
    repo = cfg.hf_hub_id or f"timm/{name}"
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    return (f"download https://huggingface.co/{repo}/resolve/main/model.safetensors to "
            f"{display_path(folder / 'snapshots' / 'main' / 'model.safetensors')} and write main into "
            f"{display_path(folder / 'refs' / 'main')}")


def load_timm(name, input_size=None):
    """(network, preprocessing settings, class names) of timm's pretrained NAME, through timm's own loader."""
    import timm
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_pretrained(), n=4, cutoff=0.5)
        raise UsageError(f"unknown timm model {name!r}" + (f"; closest: {', '.join(close)}" if close else ""))
    try:
        with weights_only_loads(), contextlib.redirect_stdout(sys.stderr):
            net = timm.create_model(name, pretrained=True)
    except (OSError, RuntimeError, ValueError) as error:  # hub errors are OSErrors or ValueErrors; a torn file too
        cfg = timm.models.get_pretrained_cfg(name) or timm.create_model(name, pretrained=False).pretrained_cfg
        cfg = cfg if not isinstance(cfg, dict) else timm.models.PretrainedCfg(**cfg)
        raise UsageError(f"cannot load timm's weights of {name} ({first_line(error)}): {timm_download_hint(name, cfg)}")
    cfg = net.pretrained_cfg
    crop = cfg["input_size"][-1]
    settings = dict(crop_size=crop, mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
                    interpolation=transforms.InterpolationMode(cfg.get("interpolation", "bilinear")),
                    resize_size=math.floor(crop / cfg.get("crop_pct", 1.0)))
    if input_size:
        settings.update(crop_size=input_size, resize_size=input_size)
    return net, settings, default_classes(net.num_classes)


# ---- RobustBench ----------------------------------------------------------------------------------------------

def import_robustbench():
    """robustbench.utils, importable: robustbench/eval.py does `from autoattack import AutoAttack`, and PyPI ships
    that package as pyautoattack, so the old name is registered as an alias first."""
    import pyautoattack
    import pyautoattack.state
    sys.modules.setdefault("autoattack", pyautoattack)
    sys.modules.setdefault("autoattack.state", pyautoattack.state)
    import robustbench.utils
    return robustbench.utils


def robustbench_dir():
    """Where RobustBench checkpoints live: $TORCH_HOME/robustbench (~/.cache/torch/robustbench by default)."""
    return Path(torch.hub.get_dir()).parent / "robustbench"


# RobustBench's preprocessing names -> (resize, crop, interpolation); None: the image as it is, CIFAR's 32 x 32.
ROBUSTBENCH_PREPROCESSING = {"Res256Crop224": (256, 224, "bilinear"), "BicubicRes256Crop224": (256, 224, "bicubic"),
                             "Res224": (224, 224, "bilinear"), "Crop288": (288, 288, "bilinear"),
                             None: (32, 32, "bilinear")}
DATASET_CLASSES = {"cifar10": CIFAR10_CLASSES}


def parse_robustbench(spec):
    """(dataset, threat, name) of "DATASET/THREAT/NAME", each checked against RobustBench's zoo."""
    utils = import_robustbench()
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel
    parts = spec.split("/")
    if len(parts) != 3:
        raise UsageError(f"robustbench:{spec}: expected robustbench:DATASET/THREAT/NAME, "
                         "e.g. robustbench:cifar10/Linf/Carmon2019Unlabeled")
    dataset, threat, name = parts
    datasets = [item.value for item in BenchmarkDataset]
    if dataset not in datasets:
        raise UsageError(f"unknown RobustBench dataset {dataset!r}; one of {', '.join(datasets)}")
    zoo = utils.all_models[BenchmarkDataset(dataset)]
    threats = [item.value for item in zoo]
    if threat not in threats:
        raise UsageError(f"unknown RobustBench threat model {threat!r} for {dataset}; one of {', '.join(threats)}")
    names = list(zoo[ThreatModel(threat)])
    if name not in names:
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
        raise UsageError(f"unknown RobustBench model {name!r} for {dataset}/{threat}"
                         + (f"; closest: {', '.join(close)}" if close else ""))
    return dataset, threat, name, zoo[ThreatModel(threat)][name]


def load_robustbench(spec, input_size=None):
    """(network, preprocessing settings, class names) of a RobustBench model, through RobustBench's own loader.
    RobustBench models take pixels in [0, 1] and normalize inside (their contract), so mean 0 and std 1 here."""
    dataset, threat, name, entry = parse_robustbench(spec)
    utils = import_robustbench()
    folder = robustbench_dir()
    try:
        with weights_only_loads(), contextlib.redirect_stdout(sys.stderr):  # it announces downloads on stdout
            net = utils.load_model(name, model_dir=folder, dataset=dataset, threat_model=threat)
    except Exception as error:  # gdown, requests and a torn file each fail in their own way
        gdrive = entry.get("gdrive_id")
        address = f"https://drive.google.com/uc?id={gdrive}" if isinstance(gdrive, str) else "RobustBench's Google Drive"
        target = folder / dataset / threat / f"{name}.pt"
        raise UsageError(f"cannot load RobustBench's weights of {dataset}/{threat}/{name} ({first_line(error)}): "
                         f"download {address} to {display_path(target)}")
    resize, crop, interpolation = ROBUSTBENCH_PREPROCESSING[entry.get("preprocessing")]
    settings = dict(crop_size=input_size or crop, resize_size=input_size or resize, mean=(0.0, 0.0, 0.0),
                    std=(1.0, 1.0, 1.0), interpolation=transforms.InterpolationMode(interpolation))
    count = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]
    return net, settings, DATASET_CLASSES.get(dataset) or default_classes(count)
