"""--method bounds: CROWN's linear bounds (or interval bounds) on the margins, sound and fast, never complete."""
import time
from dataclasses import dataclass

import numpy as np
import torch

from utils.certify.base import MISCLASSIFIED, ROBUST, UNKNOWN, Certifier, Settings
from utils.certify.bounds import layer_bounds, make_ball, margin_bounds
from utils.certify.network import extract_layers
from utils.cli import UsageError, one_of
from utils.images import to_tensor


@dataclass(frozen=True)
class BoundSettings(Settings):
    norm: str = "Linf"
    propagation: str = "crown"
    lattice: bool = True


def model_logits(model, images_u8):
    """The model's own logits (B, classes) for 8-bit images: the forward every verdict is judged by."""
    with torch.no_grad():
        return model(to_tensor(images_u8, model.mean.device)).double().cpu().numpy()


def clean_prediction(model, image_u8):
    return int(np.argmax(model_logits(model, image_u8)[0]))


def network_of(model, image_shape):
    """The model's layers for (3, H, W) images (UsageError for an operation a verifier cannot encode)."""
    side = model.preprocessing.crop_size
    if side is None:
        raise UsageError(f"{model.name} takes images as they are; a verifier needs one size: pass --input-size N")
    return extract_layers(model, image_shape or (3, side, side))


class BoundsCertifier(Certifier):
    """Bound propagation alone (Zhang et al. 2018's CROWN, or interval bounds): robust when every margin's lower
    bound over the ball is above zero, else unknown. Margin column: the smallest such lower bound (logits)."""
    name = "bounds"
    norms = ("Linf", "L1")
    columns = ("margin_bound",)
    verdicts = (ROBUST, UNKNOWN, MISCLASSIFIED)
    description = "bound propagation (CROWN), sound, not complete"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--propagation", type=one_of(("crown", "interval"), "propagation"), default="crown",
                            help="bounds: CROWN's linear bounds or plain intervals (default: %(default)s)")

    @classmethod
    def settings(cls, args):
        return BoundSettings(args.norm, args.propagation, not args.continuous)

    def __init__(self, model, settings, device="cpu", image_shape=None):
        super().__init__(model, settings, device)
        self.network = network_of(model, image_shape)

    def certify(self, image_u8, label, epsilons):
        started = time.perf_counter()
        prediction = clean_prediction(self.model, image_u8)
        rows = []
        for epsilon in epsilons:
            if prediction != label:
                verdict, bound = MISCLASSIFIED, ""
            else:
                ball = make_ball(image_u8, self.config.norm, epsilon, self.config.lattice)
                bounds = layer_bounds(self.network, ball, self.config.propagation)
                bound = float(margin_bounds(self.network, ball, label, bounds, self.config.propagation).min())
                verdict = ROBUST if bound > 0 else UNKNOWN
            rows.append({"epsilon": epsilon, "verdict": verdict, "prediction": prediction,
                         "seconds": time.perf_counter() - started, "margin_bound": bound, "counterexample": None})
            started = time.perf_counter()
        return rows
