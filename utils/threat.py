"""The threat model a run is judged in: its norm, the units of its epsilon, the range an epsilon may take, and the
default a RobustBench model brings with its name.

Units (as utils.attacks takes them): "Linf" in levels out of 255, in (0, 255]; "L2" and "L1" the norm of the
perturbation of the whole (C, H, W) image in [0, 1] pixel units (AutoAttack's and RobustBench's convention), in
(0, largest], where the largest is the distance between the all-black and the all-white image: sqrt(C*H*W) in L2,
C*H*W in L1 (no perturbation of an image in [0, 1] can be larger).
"""
import math

from utils.attacks import ATTACKS, NORMS
from utils.cli import UsageError

DEFAULT_NORM = "Linf"
NAMES = {"Linf": "L-infinity", "L2": "L2", "L1": "L1"}
UNITS = {"Linf": "levels out of 255", "L2": "[0, 1] pixel units", "L1": "[0, 1] pixel units"}

# RobustBench's leaderboards: the threat model in a model's name and the epsilon it is ranked at, in our units
ROBUSTBENCH_EPSILONS = {("cifar10", "Linf"): 8.0, ("cifar10", "L2"): 0.5, ("cifar100", "Linf"): 8.0,
                        ("imagenet", "Linf"): 4.0}


def describe(norm):
    """"L2 ([0, 1] pixel units)": the norm's name and the units of its epsilon, for reports and captions."""
    return f"{NAMES[norm]} ({UNITS[norm]})"


def size_text(size, norm, digits=3):
    """A perturbation's size (or a budget's) as every output writes it: whole levels in L-infinity ("12"), `digits`
    decimals of [0, 1] pixel units in L2 and L1 ("0.512"; results.csv keeps 4)."""
    return f"{size:.0f}" if norm == "Linf" else f"{size:.{digits}f}"


def largest_distance(norm, shape):
    """The largest perturbation an image of `shape` (C, H, W) in [0, 1] can take, in the norm's units."""
    count = math.prod(shape)
    return {"Linf": 255.0, "L2": math.sqrt(count), "L1": float(count)}[norm]


def check_norm(norm):
    """`norm` if it is one of NORMS, else a UsageError naming them."""
    if norm not in NORMS:
        raise UsageError(f"`norm` {norm!r}: choose from {', '.join(NORMS)}", "norm")
    return norm


def check_epsilon(epsilon, norm, shape=None, name="epsilon"):
    """`epsilon` if it is a budget of `norm` (UsageError otherwise): a positive number, at most 255 levels in
    L-infinity and, once the image `shape` (C, H, W) is known, at most its largest distance in L2 and L1. `name`:
    the parameter the message names (a command line writes its flag, utils.errors.UsageError)."""
    if not isinstance(epsilon, (int, float)) or epsilon != epsilon or epsilon <= 0:
        raise UsageError(f"`{name}` must be a positive number, got {epsilon}", name)
    if norm == "Linf" and epsilon > 255:
        raise UsageError(f"`{name}` must be in (0, 255], got {epsilon:g} (levels out of 255, L-infinity)", name)
    if norm != "Linf" and shape is not None and epsilon > largest_distance(norm, shape):
        size = "x".join(map(str, shape))
        formula = f"sqrt({size.replace('x', '*')})" if norm == "L2" else size.replace("x", "*")
        raise UsageError(f"`{name}` {epsilon:g} is over the largest {norm} distance of a {size} image in [0, 1] "
                         f"units, {formula} = {largest_distance(norm, shape):.6g}", name)
    return epsilon


def check_methods(methods, norm, name="method"):
    """UsageError unless every attack in `methods` offers `norm`; the message names the norms the first one has and
    the parameter `name` (a command line writes its flag)."""
    for method in methods:
        if method in ATTACKS and norm not in ATTACKS[method].norms:
            raise UsageError(f"`{name}` {method} has no {norm} version: it has {', '.join(ATTACKS[method].norms)}",
                             name)


def zoo_threat(model):
    """(norm, epsilon) a RobustBench model is ranked at, read from its name robustbench:DATASET/THREAT/NAME; None for
    any other model (or a threat model with no norm, such as corruptions)."""
    if not isinstance(model, str) or not model.startswith("robustbench:"):
        return None
    parts = model.removeprefix("robustbench:").split("/")
    if len(parts) != 3:
        return None
    dataset, threat = parts[0].lower(), parts[1]
    norm = {"linf": "Linf", "l2": "L2", "l1": "L1"}.get(threat.lower())
    if norm is None or (dataset, norm) not in ROBUSTBENCH_EPSILONS:
        return None
    return norm, ROBUSTBENCH_EPSILONS[dataset, norm]


def resolve(model, norm, epsilons, default_epsilons, flag="--epsilon"):
    """The run's (norm, epsilons, note): --norm and --epsilon(s) as given; where one is missing, a RobustBench model's
    threat model and epsilon (and `note`, the one line that says so), else L-infinity and `default_epsilons` (which
    an L2 or L1 run without a zoo default must give: None there is a UsageError)."""
    zoo = zoo_threat(model)
    note = None
    if zoo is not None and (norm is None or (norm == zoo[0] and epsilons is None)):
        taken = []
        if norm is None:
            norm = zoo[0]
            taken.append(f"--norm {norm}")
        if epsilons is None and norm == zoo[0]:
            epsilons = [zoo[1]]
            taken.append(f"{flag} {zoo[1]:g}")
        if taken:
            note = (f"{model} is ranked by RobustBench in {NAMES[zoo[0]]} at epsilon {zoo[1]:g} "
                    f"({UNITS[zoo[0]]}): using {' '.join(taken)}")
    norm = check_norm(norm or DEFAULT_NORM)
    if epsilons is None:
        if norm != DEFAULT_NORM:
            raise UsageError(f"`norm` {norm} needs `{flag}`: the {norm} norm of the whole perturbation in [0, 1] "
                             "pixel units (e.g. 0.5 for CIFAR-10 in L2)", "norm", flag)
        epsilons = default_epsilons
    for epsilon in epsilons:
        check_epsilon(epsilon, norm, name=flag)
    return norm, epsilons, note
