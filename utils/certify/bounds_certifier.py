"""--method bounds: linear bounds on the margins (interval, CROWN, alpha-CROWN; utils.certify.propagation), sound
and fast, never complete."""
import time
from dataclasses import dataclass

import numpy as np
import torch

from utils.certify.base import MISCLASSIFIED, ROBUST, UNKNOWN, Certifier, Settings
from utils.certify.bounds import make_ball
from utils.certify.network import extract_layers
from utils.certify.propagation import ALPHA_ITERATIONS, METHODS, Box, Net, layer_bounds, margin_bounds
from utils.cli import UsageError, number_in, one_of
from utils.images import to_tensor


@dataclass(frozen=True)
class BoundSettings(Settings):
    norm: str = "Linf"
    propagation: str = "alpha-crown"
    lattice: bool = True
    alpha_iterations: int = ALPHA_ITERATIONS


def tensor_net(network, device):
    """The tensor layers of a graph on `device`: float64 on the CPU, float32 (with its outward slack) on CUDA."""
    dtype = torch.float64 if str(device) == "cpu" else torch.float32
    return Net.from_layers(network, dtype, device), dtype


def bound_ladder(net, dtype, device, image_u8, label, norm, epsilon, lattice, propagation, iterations,
                 until_proved=False, deadline=None):
    """({method: its smallest margin bound} for interval, CROWN and alpha-CROWN up to `propagation`, each at least
    the one before; the last one's margin bounds per class (float64 NumPy); the layer bounds the last one used; the
    Box). The interval bound is IBP's alone (interval bounds for every layer); CROWN's and alpha-CROWN's use CROWN's
    intermediate bounds. `until_proved`: stop at the first method whose bound is above zero (a proof needs no
    tighter one). `deadline`: alpha-CROWN's (optimized_bound)."""
    box = Box.from_balls([make_ball(image_u8, norm, epsilon, lattice)], dtype, device)
    bounds = layer_bounds(net, box, "interval")
    found, best = {}, -np.inf
    for method in METHODS[:METHODS.index(propagation) + 1]:
        if method == "crown":
            bounds = layer_bounds(net, box, "crown")
        margins = margin_bounds(net, box, [label], bounds, method, iterations=iterations,
                                deadline=deadline)[0].cpu().double().numpy()
        best = found[method] = max(float(margins.min()), best)
        if until_proved and best > 0:
            break
    return found, margins, bounds, box


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
        raise UsageError(f"{model.name} takes images as they are; a verifier needs one size: pass `input_size` N",
                         "input_size")
    return extract_layers(model, image_shape or (3, side, side))


class BoundsCertifier(Certifier):
    """Bound propagation alone: robust when every margin's lower bound over the ball is above zero, else unknown.
    Interval bounds, then CROWN (Zhang et al. 2018), then alpha-CROWN (Xu et al. 2021), up to --propagation; the
    columns give each one's smallest margin bound (logits) and margin_bound the tightest."""
    name = "bounds"
    norms = ("Linf", "L1")
    columns = ("margin_bound", "interval_bound", "crown_bound", "alpha_bound")
    verdicts = (ROBUST, UNKNOWN, MISCLASSIFIED)
    description = "bound propagation (alpha-CROWN), sound, not complete"

    @classmethod
    def add_arguments(cls, parser):
        parser.add_argument("--propagation", type=one_of(METHODS, "propagation"), default="alpha-crown",
                            help="bounds: the tightest bound to compute: plain intervals, CROWN's linear bounds, or "
                                 "alpha-CROWN's optimized ones (default: %(default)s)")
        parser.add_argument("--alpha-iterations", type=number_in(1, 10000, int, name="--alpha-iterations"),
                            default=ALPHA_ITERATIONS,
                            help="bounds, exact: gradient steps of alpha-CROWN's slopes (default: %(default)s)")

    @classmethod
    def from_options(cls, norm="Linf", propagation="alpha-crown", continuous=False, alpha_iterations=ALPHA_ITERATIONS,
                     **_):
        return BoundSettings(norm, propagation, not continuous, alpha_iterations)

    def __init__(self, model, settings, device="cpu", image_shape=None):
        super().__init__(model, settings, device)
        self.network = network_of(model, image_shape)
        self.net, self.dtype = tensor_net(self.network, device)

    def certify(self, image_u8, label, epsilons):
        started = time.perf_counter()
        prediction = clean_prediction(self.model, image_u8)
        rows = []
        for epsilon in epsilons:
            found = {}
            if prediction != label:
                verdict, bound = MISCLASSIFIED, ""
            else:
                config = self.config
                found, _, _, _ = bound_ladder(self.net, self.dtype, self.device, image_u8, label, config.norm, epsilon,
                                           config.lattice, config.propagation, config.alpha_iterations)
                bound = max(found.values())
                verdict = ROBUST if bound > 0 else UNKNOWN
            rows.append({"epsilon": epsilon, "verdict": verdict, "prediction": prediction,
                         "seconds": time.perf_counter() - started, "margin_bound": bound,
                         **{f"{method.split('-')[0]}_bound": found.get(method, "") for method in METHODS},
                         "counterexample": None})
            started = time.perf_counter()
        return rows
