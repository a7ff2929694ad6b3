"""The pieces of step 9 that are not the training loop: the architectures, the catastrophic-overfitting guard, the
checkpoint and the resume from it and the checked export (the export itself is utils.models.export_program's); the
training images are utils.training_data's, certified training's loss utils.certified_training's.

- `build_net`: "small-cnn" (a few conv layers, for small images such as the 32x32 digits), "mlp" (a small fully
  connected ReLU network, small enough for step 10's exact verifier), or any torchvision or timm architecture name,
  with random initial weights and `classes` outputs.
- checkpoints hold plain tensors, state dicts and numbers only, so that `torch.load(weights_only=True)` reads them
  (a checkpoint file is never unpickled).
"""
import pickle
import warnings
from pathlib import Path

import torch
import torchvision
from torch import nn

from utils.cli import UsageError
from utils.files import atomic_path, display_path
from utils.models import export_program, load_program, torchvision_classifiers

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


SETTINGS = ("arch", "method", "norm", "epsilon", "steps", "alpha", "sigma", "batch_size", "lr", "val_fraction",
            "image_size", "seed", "epochs")
SAVED_DEFAULTS = {"norm": "Linf"}  # a checkpoint from before --norm was trained in L-infinity


def checkpoint_path(output):
    """The checkpoint beside the model file `output`: NAME.ckpt."""
    return Path(output).with_suffix(".ckpt")


def run_settings(options):
    """The settings a checkpoint records (SETTINGS), taken from the mapping `options` (name: value): a resume
    continues only a run made with the same ones."""
    return {name: options[name] for name in SETTINGS}


def resume_from(model, optimizer, path, settings, resume=True):
    """(the first epoch still to run, the history so far, the best epoch's {"epoch", "model"} or None): 1, [] and
    None unless `resume` and the checkpoint at `path` was made with the same `settings` (run_settings; "epochs" may
    grow: more epochs continue the same run), whose model and optimizer states are then loaded."""
    path = Path(path)
    if not resume or not path.exists():
        return 1, [], None
    state = load_checkpoint(path)
    saved = dict(state.get("settings", {}))
    saved = {**SAVED_DEFAULTS, **saved}
    changed = [name for name in SETTINGS if name != "epochs" and saved.get(name) != settings[name]]
    if changed:
        name = changed[0]
        raise UsageError(f"{path}: made with `{name}` {saved.get(name)}, not {settings[name]}; "
                         "resume with the same settings or remove the checkpoint", name)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    print(f"Resuming after epoch {state['epoch']} from {display_path(path)}")
    return state["epoch"] + 1, list(state["history"]), state.get("best")


def save_epoch(model, optimizer, epoch, history, settings, best, path):
    """The checkpoint at `path`: this epoch's model and optimizer, the history, the run's `settings` and the
    weights of the best held-out PGD epoch so far (what is written after catastrophic overfitting)."""
    save_checkpoint({"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "history": history, "settings": settings, "best": best}, path)


def copy_state(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ---- catastrophic overfitting ---------------------------------------------------------------------------------

COLLAPSE = 0.5   # held-out PGD accuracy below half its best so far ...
FGSM_GAP = 0.2   # ... while FGSM accuracy stays this far above it: the model has learnt to mask FGSM's gradient


def best_epoch(history):
    """The epoch with the best held-out PGD accuracy (the earliest among ties), or None without held-out images."""
    scored = [row for row in history if row.get("robust") is not None]
    return max(scored, key=lambda row: (row["robust"], -row["epoch"]))["epoch"] if scored else None


def watched_for_overfitting(method):
    """Whether a run is watched for catastrophic overfitting: fast (one-step) adversarial training, where it happens.
    Plain and noise training have next to no PGD accuracy to lose, and their noise around it can fit the rule; PGD
    training's multi-step attack does not overfit this way (Wong et al. 2020)."""
    return method == "fgsm-rs"


def catastrophic_overfitting(history):
    """Wong, Rice and Kolter 2020 ("Fast is better than free"): fast adversarial training can suddenly overfit to
    its one-step attack, held-out PGD accuracy collapsing within an epoch while FGSM accuracy stays high. True when
    the last epoch shows it: its PGD accuracy below COLLAPSE times the best of the epochs before, and its FGSM
    accuracy at least FGSM_GAP above its PGD accuracy."""
    *before, last = history
    best = max((row["robust"] for row in before if row.get("robust") is not None), default=None)
    if best is None or last.get("robust") is None or last.get("fgsm") is None:
        return False
    return last["robust"] < COLLAPSE * best and last["fgsm"] >= last["robust"] + FGSM_GAP


# ---- export ---------------------------------------------------------------------------------------------------

def export_checked(model, output, classes, image_size, examples):
    """Write the .pt2 `output` and its classes file, then check the saved program against the trained module on
    `examples` (pixels in [0, 1] on the model's device; 16 are enough): the same logits (batch 1 and the whole
    batch) and an input gradient (what every attack needs)."""
    model.eval()
    export_program(model, output, classes, image_size)
    program = load_program(output)
    for batch in (examples[:1], examples):
        with torch.no_grad():
            if not torch.allclose(program(batch), model(batch), atol=1e-5, rtol=1e-4):
                raise RuntimeError(f"{output}: the exported program's logits differ from the trained model's")
    probe = examples[:2].clone().requires_grad_(True)
    program(probe).sum().backward()
    if not probe.grad.abs().sum() > 0:
        raise RuntimeError(f"{output}: the exported program gives no input gradient")
