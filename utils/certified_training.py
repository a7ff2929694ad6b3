"""Certified training's loss (step 9's --method ibp and crown-ibp): the margin bounds of utils.certify.propagation
over each training image's L-infinity ball, the schedule that ramps them in (Ramp), and the held-out certified
accuracy step 9 prints. Apart from utils/training.py (the architectures, checkpoints and export), which the bounds'
module reads for its SmallCNN: the import goes one way."""
from dataclasses import dataclass

import torch
from torch import nn

from utils.certify.propagation import Box, Net, layer_bounds, margin_bounds

CERTIFIED_METHODS = ("ibp", "crown-ibp")
NATURAL_WEIGHT_END = 0.5  # Zhang et al. 2020: the natural loss's weight kappa goes from 1 to this over the ramp


@dataclass(frozen=True)
class Ramp:
    """Where a batch is in certified training's schedule (Zhang et al. 2020, "Towards Stable and Efficient Training
    of Verifiably Robust Neural Networks"): over the first `ramp_epochs`, epsilon grows from 0 to its value, the
    CROWN weight beta falls from 1 to 0 (CROWN-IBP; 0 throughout for IBP) and the natural loss's weight kappa falls
    from 1 to NATURAL_WEIGHT_END; then they stay."""
    epsilon: float
    crown_weight: float
    natural_weight: float

    @classmethod
    def at(cls, method, epsilon, progress):
        """`progress`: epochs done (fractional) over the ramp's length, clipped to [0, 1]."""
        progress = min(max(progress, 0.0), 1.0)
        crown = 1.0 - progress if method == "crown-ibp" else 0.0
        return cls(epsilon * progress, crown, 1.0 - (1.0 - NATURAL_WEIGHT_END) * progress)


def margin_floor(model, pixels, targets, epsilon, crown_weight):
    """Lower bounds (B, classes) on logit[target] - logit[t] over the L-infinity ball of `epsilon` levels around each
    image (clipped to [0, 1]), 0 at the target: interval bounds for every layer and, weighted by `crown_weight`,
    CROWN's bound on the margins from those interval bounds (CROWN-IBP). Differentiable in the weights."""
    net = Net.from_module(model.net, pixels.shape[1:], model.mean.view(-1), model.std.view(-1))
    flat = pixels.reshape(len(pixels), -1)
    box = Box((flat - epsilon / 255).clamp(0, 1), (flat + epsilon / 255).clamp(0, 1))
    bounds = layer_bounds(net, box, "interval")
    floor = margin_bounds(net, box, targets, bounds, "interval")
    if crown_weight > 0:
        floor = crown_weight * margin_bounds(net, box, targets, bounds, "crown") + (1 - crown_weight) * floor
    return torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)


def certified_loss(model, pixels, targets, ramp):
    """kappa * cross-entropy on the images + (1 - kappa) * cross-entropy of the worst logits the bounds allow (the
    negated margin floors): small only when the bounds prove the target class."""
    natural = nn.functional.cross_entropy(model(pixels), targets)
    if ramp.epsilon <= 0 and ramp.natural_weight >= 1:
        return natural
    worst = -margin_floor(model, pixels, targets, ramp.epsilon, ramp.crown_weight)
    return ramp.natural_weight * natural + (1 - ramp.natural_weight) * nn.functional.cross_entropy(worst, targets)


@torch.no_grad()
def certified_accuracy(model, pixels, targets, epsilon, batch_size=256):
    """The share of images whose CROWN-IBP margin bounds at `epsilon` levels are all above zero: proved robust."""
    proved = 0
    for start in range(0, len(pixels), batch_size):
        floor = margin_floor(model, pixels[start:start + batch_size], targets[start:start + batch_size], epsilon, 1.0)
        floor = floor.scatter(1, targets[start:start + batch_size, None], torch.inf)
        proved += int((floor.min(dim=1).values > 0).sum())
    return proved / max(len(pixels), 1)
