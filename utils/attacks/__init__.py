"""Adversarial attacks on RGB pixels in [0, 1], each bounded in a threat model (`norm`): L-infinity (epsilon in
levels out of 255, the default), L2 or L1 (epsilon the norm of the whole image's perturbation in [0, 1] units).

This package owns the attacks and everything they share: `base` (the result, the shared loop, the 8-bit lattice, the
restarts and target ranking), `norms` (the threat models: sizes, steepest steps, the projection's dispatch),
`projection` (the exact L2 and L1 projections onto a ball intersected with the pixel box), `lattice` (the 8-bit
lattice inside an L2 or L1 ball), `rows` (the exact per-row sums and counts they share), and one module per attack
(sgd, fgsm, pgd, mifgsm, cw, apgd, square, fab), each with its paper in its docstring. Here: the registry `ATTACKS`
by name, `make_attack`, `run_attack` on 8-bit images, and the small helpers the step scripts share
(`perturbation_size`, `budget_unit`, `goal_reached`).
"""
import torch

from utils.attacks import norms
from utils.attacks.apgd import APGD, APGDT, apgd_checkpoints
from utils.attacks.base import (MIN_STEP_LEVELS, Attack, AttackResult, dlr, image_ids, margin, over_targets,
                                top_targets)
from utils.attacks.cw import CW
from utils.attacks.fab import FAB, hyperplane_step
from utils.attacks.fgsm import FGSM
from utils.attacks.mifgsm import MIFGSM
from utils.attacks.norms import NORMS
from utils.attacks.pgd import PGD
from utils.attacks.sgd import SGD
from utils.attacks.square import SQUARE_TOLERANCE, Square, SquareDraws, image_seed, square_fraction, square_side
from utils.cli import UsageError
from utils.images import to_tensor, to_uint8

ATTACKS = {attack.name: attack for attack in (SGD, FGSM, PGD, MIFGSM, CW, APGD, APGDT, Square, FAB)}


def make_attack(method, model, **kwargs):
    """An attack by name, given the shared arguments plus its own (others it does not take are dropped). A `norm`
    the method does not offer is a UsageError naming the norms it has."""
    own = {"sgd": ("lr", "momentum"), "mifgsm": ("decay",), "cw": ("c", "kappa", "lr"),
           "apgd": ("loss", "growing_epsilon"), "apgd-t": ("target_classes", "growing_epsilon"),
           "square": ("queries", "p_init"), "fab": ("target_classes",)}.get(method, ())
    shared = ("epsilon", "steps", "alpha", "targeted", "early_stop", "random_start", "restarts", "seed", "forward",
              "eot", "on_step", "precision", "norm")
    chosen = {key: value for key, value in kwargs.items() if value is not None and key in own + shared}
    if method not in ATTACKS:
        raise UsageError(f"unknown attack {method!r}: choose from {', '.join(ATTACKS)}")
    try:
        norms.check_norm(chosen.get("norm", "Linf"), ATTACKS[method].norms, method)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return ATTACKS[method](model, **chosen)


def perturbation_size(adversarial, original, norm=None):
    """Per sample: without `norm`, the pair (L-infinity in levels, L2 in [0, 1] units); with a norm, its size in that
    threat model's units (Linf: levels out of 255; L2, L1: [0, 1] pixel units), as a float64 tensor."""
    difference = (adversarial - original).flatten(1)
    if norm is None:
        return (difference.abs().amax(dim=1) * 255).round(), difference.norm(dim=1)
    levels = norms.size((adversarial.double() * 255).round() - (original.double() * 255).round(), norms.check_norm(norm))
    return levels if norm == "Linf" else levels / 255


def run_attack(model, method, images_u8, labels, ids=None, **options):
    """One attack on a list of 8-bit images: (adversarial 8-bit images, steps each used). `ids`: each image's position
    in the whole run (default 0..N-1), so that an attack drawing per image (Square) draws the same for an image
    whatever batch it is in."""
    device = model.mean.device
    attack = make_attack(method, model, **options)
    result = attack(to_tensor(images_u8, device), torch.tensor(labels, device=device), ids)
    return to_uint8(result.adversarial), result.steps_used.tolist()


def budget_unit(method):
    """What an attack's budget and its steps used count: "queries" for a gradient-free attack, else "steps"."""
    return "queries" if ATTACKS[method].gradient_free else "steps"


def goal_reached(prediction, goal, untargeted):
    """A prediction meets the goal: the target class, or (untargeted) anything but the class to leave."""
    return prediction != goal if untargeted else prediction == goal
