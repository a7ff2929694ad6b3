"""The reference AutoAttack (Croce and Hein's own code, PyPI's pyautoattack) beside our step 8 ensemble, judged the
same way: on 8-bit images. Used by tests/test_crosscheck_autoattack.py and bench/robust_accuracy.py."""
import csv
from pathlib import Path

import torch

from utils.attacks import perturbation_size
from utils.attacks.lattice import lattice_within
from utils.cli import UsageError
from utils.images import to_tensor, to_uint8


# the iterations AutoAttack's standard version gives APGD-CE, APGD-T and FAB-T (Square: 5,000 queries, step 8's default)
STANDARD_ITERATIONS = 100


def worst_case_robust(folder, epsilon):
    """(robust images, images) of step 8's worst case at `epsilon`, read from FOLDER/robust_accuracy.csv."""
    path = Path(folder) / "robust_accuracy.csv"
    with open(path, newline="") as handle:
        rows = [row for row in csv.DictReader(handle)
                if row["attack"] == "worst-case" and float(row["epsilon"]) == float(epsilon)]
    if not rows:
        raise UsageError(f"{path}: no worst-case row at epsilon {epsilon:g}")
    return round(float(rows[0]["robust_accuracy"]) * int(rows[0]["images"])), int(rows[0]["images"])


def reference_autoattack(model, images, labels, epsilon, seed=0, batch_size=64, norm="Linf"):
    """How many images the reference AutoAttack (standard version in `norm`: APGD-CE, APGD-T, FAB-T, Square; in L1
    its L1 settings) leaves correctly classified, judged on its adversarial images put on whole levels (what a PNG
    holds; a rounding that undoes an attack counts as the model's) and, in L2 and L1, pulled back onto the lattice
    inside the ball as ours are (utils.attacks.lattice.lattice_within), and the largest perturbation in the norm's
    units. `epsilon`: levels out of 255 in Linf, the norm of the whole perturbation in [0, 1] units in L2 and L1."""
    robust, largest = reference_robust(model, images, labels, epsilon, seed, batch_size, norm)
    return int(robust.sum()), largest


def reference_robust(model, images, labels, epsilon, seed=0, batch_size=64, norm="Linf"):
    """Per image, whether the reference AutoAttack leaves it correctly classified (a bool tensor, judged as
    reference_autoattack says), and the largest perturbation in the norm's units."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:
        raise UsageError("the reference AutoAttack is not installed (pip install pyautoattack==0.2.0)")
    # contiguous images: AutoAttack views its gradients, made like its input (to_tensor's permuted batch is
    # channels-last in memory, and such a gradient cannot be viewed). The network runs as ours does, in the memory
    # format of utils.speed's fixed rule: the Classifier hands gradients back in the input's own layout, and a fixed
    # rule gives AutoAttack's randomness check the same floats twice
    images = images.contiguous()
    adversary = AutoAttack(model, eps=epsilon / 255 if norm == "Linf" else epsilon, norm=norm, version="standard",
                           seed=seed, device=images.device)
    adversarial, _ = adversary.run_standard_evaluation(images, labels, batch_size=batch_size)
    if norm == "Linf":
        on_lattice = to_tensor(to_uint8(adversarial), images.device)
    else:
        levels = (images * 255).round()
        on_lattice = lattice_within(levels, adversarial - images, norm, epsilon * 255) / 255
    largest = perturbation_size(on_lattice, images, norm).max().item()
    with torch.no_grad():
        clean_ok = model(images).argmax(dim=1) == labels
        robust = clean_ok & (model(on_lattice).argmax(dim=1) == labels)
    return robust.cpu(), largest
