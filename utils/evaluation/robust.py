"""Robust accuracy as one library call: step 8's ensemble on images already in memory, without its files.

    from utils.evaluation import robust_accuracy
    result = robust_accuracy(model, images, labels, norm="Linf", epsilon=8)   # images: uint8 (N, 3, H, W)
    print(result.clean_accuracy, result.robust_accuracy, result.per_attack)

It runs what step 8 runs for a labelled folder and one epsilon: the plan (utils/evaluation/plan.py: the clean job,
then AutoAttack's standard ensemble in the norm, or `attacks`), the same batches of `batch_size` in order, each stage
only on the images correct when clean that every earlier stage failed to fool, with the same attack options, seeds
and image ids: step 8's own loop (utils/evaluation/engine.py: run_batch), judged on the 8-bit image kept in memory
where step 8 judges its PNG read back (engine.MemoryStore: a PNG holds the same 8 bits), and counted as
robust_accuracy.csv counts (report.robust_counts). So the same images, settings and device give step 8's verdicts;
step 8 is this evaluation plus its files (PNGs, results.csv, --resume, the report, several processes). With `certify`, step 8's --certify
certifiers (with their default flags) bound the robust accuracy from below.

Bad input (the images' shape, range or lattice, the labels, the norm, the budget, an attack's name) raises
utils.cli.UsageError, one sentence naming the value, before any attack runs.
"""
import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from utils.certify.run import certify_images
from utils.cli import UsageError
from utils.data import cut
from utils.evaluation.engine import MemoryStore, decode_batch, run_batch
from utils.evaluation.interval import (certified_counts, check_certifies, default_certifier_options,
                                       interval_certifiers, make_certifiers)
from utils.evaluation.plan import CLEAN, NAMED_ENSEMBLES, Plan, Settings, check_ensemble, ensemble_jobs, named_ensemble
from utils.evaluation.report import robust_counts
from utils.models import Classifier, Preprocessing, default_classes
from utils.speed import get_device
from utils.threat import check_epsilon, check_norm


@dataclass
class RobustAccuracy:
    """What robust_accuracy found, for N images at one `epsilon` in `norm`.

    `robust_accuracy`: the share of the N images correct when clean that no attack fooled (the per-image worst case,
    step 8's "worst case" column); `clean_accuracy`: the share correct when clean; `per_attack`: {attack: accuracy
    after attacks 1..k}, cumulative in the order they ran, as step 8's "robust accuracy after ATTACK" columns (the
    last equals `robust_accuracy`); `fooled`: bool (N,), an attack found an image within the budget that the model
    misclassifies (never set for an image misclassified when clean: no attack runs on it); `adversarial`: uint8
    (N, 3, H, W), the fooling image where fooled, else the original; `distances`: float64 (N,), the smallest
    adversarial perturbation found, in the norm's units (step 8's robust_vs_distance.png: the size of the fooling
    image, or FAB's distance, which may exceed epsilon; inf where none was found, 0 where the clean image is already
    misclassified), so `(distances > e).float().mean()` bounds the robust accuracy at a budget e from above; `attacks`
    the ensemble run. With `certify`: `certified`, the share proved robust (a lower bound), and `interval`
    (certified, robust_accuracy), where the true robust accuracy lies; `certified_by` {certifier: its share}."""
    robust_accuracy: float
    clean_accuracy: float
    per_attack: dict
    fooled: torch.Tensor
    adversarial: torch.Tensor
    distances: torch.Tensor
    norm: str
    epsilon: float
    attacks: list
    certified: float | None = None
    interval: tuple | None = None
    certified_by: dict = field(default_factory=dict)

    def __repr__(self):
        """The numbers, not the N images (the dataclass's own repr would print every pixel)."""
        bound = "" if self.interval is None else f", interval=({self.interval[0]:.4g}, {self.interval[1]:.4g})"
        per_attack = ", ".join(f"{name}: {value:.4g}" for name, value in self.per_attack.items())
        return (f"RobustAccuracy({self.norm} epsilon {self.epsilon:g}: clean_accuracy={self.clean_accuracy:.4g}, "
                f"robust_accuracy={self.robust_accuracy:.4g}, per_attack={{{per_attack}}}, "
                f"fooled {int(self.fooled.sum())} of {len(self.fooled)}{bound})")


def robust_accuracy(model, images, labels, *, norm="Linf", epsilon=8, attacks=None, steps=50, queries=5000,
                    target_classes=None, early_stop=True, batch_size=16, device=None, seed=0, certify=None):
    """Robust accuracy of `model` on `images` with true `labels` under step 8's ensemble, as a RobustAccuracy.

    `model`: a utils.models Classifier (what step 2 and step 8 load), or any nn.Module that maps float images in
    [0, 1] (N, 3, H, W) to logits (N, C), wrapped with no normalization and no resize. `images`: uint8 (N, 3, H, W), or
    float in [0, 1] on the 8-bit lattice (each value k / 255); `labels`: N class indices. `norm` "Linf", "L2" or "L1";
    `epsilon` in step 8's units: levels out of 255 in Linf, the norm of the whole perturbation in [0, 1] pixel units
    in L2 and L1. `attacks`: step 8's --ensemble names in order, or "standard" (AutoAttack's standard version in the
    norm, step 8's default; None too) or "fast" (step 8's --ensemble fast); `steps` (step 8's largest --steps),
    `queries`, `target_classes`, `early_stop`, `batch_size` and `seed` as step 8's flags. `device`: "cpu", "cuda", "auto" (CUDA if any) or None (the model's own). `certify`: a
    name or list of names of step 8's --certify certifiers ("bounds", "exact").

    Example (AutoAttack's `AutoAttack(net, norm="Linf", eps=8/255).run_standard_evaluation(x, y)`, with x in [0, 1]
    on the 8-bit lattice, as CIFAR-10's test set is):

        result = robust_accuracy(net, x, y, norm="Linf", epsilon=8)     # epsilon in levels: 8/255
        print(result.clean_accuracy, result.robust_accuracy, result.per_attack)
        x_adv = result.adversarial.float() / 255                         # the fooling images, else the originals
    """
    images_u8 = checked_images(images)
    labels = checked_labels(labels, len(images_u8))
    check_norm(norm)
    restarts = None
    if attacks is None or (isinstance(attacks, str) and attacks in NAMED_ENSEMBLES):
        ensemble, target_classes, restarts = named_ensemble(attacks or "standard", norm, target_classes)
    else:
        ensemble = checked_attacks(attacks)
    check_ensemble(ensemble, norm, "attacks")
    for name, value in (("steps", steps), ("queries", queries), ("batch_size", batch_size)):
        check_count(name, value)
    check_epsilon(epsilon, norm, tuple(images_u8.shape[1:]), "epsilon")
    certifier_names = checked_certifiers(certify, norm)
    settings = Settings(model="model", folder="", epsilons=(float(epsilon),), steps=(steps,), queries=queries,
                        target_classes=target_classes, restarts=restarts, seed=seed, early_stop=early_stop,
                        batch_size=batch_size, norm=norm)
    plan = Plan([], ensemble, None, [CLEAN, *ensemble_jobs(ensemble, settings.epsilons, (steps,), queries)])
    with evaluated(model, images_u8, device) as classifier:
        check_label_range(labels, len(classifier.classes))
        arrays = list(images_u8.permute(0, 2, 3, 1).numpy())  # HxWx3, as step 8 decodes a photo
        rows, stages = run_stages(classifier, arrays, labels, plan, settings)
        certified = certify_all(classifier, certifier_names, arrays, labels, settings) if certifier_names else {}
    return summarize(rows, stages, images_u8, plan, settings, certified)


# ---- inputs -----------------------------------------------------------------------------------------------------

def checked_images(images):
    """`images` as a uint8 (N, 3, H, W) CPU tensor: from uint8, or from floats in [0, 1] that are whole levels k/255
    (the 8-bit images step 8 reads; an attack's budget in levels needs them)."""
    if not isinstance(images, torch.Tensor):
        raise UsageError(f"images must be a torch tensor (N, 3, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise UsageError(f"images must have shape (N, 3, H, W) with N >= 1 (RGB), got {tuple(images.shape)}")
    images = images.detach().cpu()
    if images.dtype == torch.uint8:
        return images.contiguous()
    if not images.is_floating_point():
        raise UsageError(f"images must be uint8 or float in [0, 1], got {images.dtype}")
    low, high = images.min().item(), images.max().item()
    if not (0 <= low and high <= 1):  # also refuses NaN
        raise UsageError(f"float images must lie in [0, 1], got values from {low:g} to {high:g}")
    levels = images.double() * 255
    off = (levels - levels.round()).abs().max().item()
    if off > 1e-3:
        raise UsageError(f"float images must be 8-bit images k/255 (k whole); some value is {off / 255:.3g} away "
                         "from the nearest level: quantize them, e.g. (x * 255).round() / 255, or pass uint8")
    return levels.round().to(torch.uint8).contiguous()


def checked_labels(labels, count):
    """`labels` as a list of `count` ints."""
    labels = torch.as_tensor(labels).detach().cpu()
    if labels.dim() != 1 or len(labels) != count:
        raise UsageError(f"labels must be {count} class indices (one per image), got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise UsageError(f"labels must be integer class indices, got {labels.dtype}")
    if len(labels) and labels.min().item() < 0:
        raise UsageError(f"labels must be class indices >= 0, got {labels.min().item()}")
    return labels.tolist()


def check_label_range(labels, classes):
    """Every label names one of the model's `classes` outputs (an attack's goal and APGD-T's targets index them)."""
    if max(labels) >= classes:
        raise UsageError(f"labels must be class indices below the model's {classes} outputs, got {max(labels)}")


def checked_attacks(attacks):
    """`attacks` as a list of names: a lone string is one name, not its letters."""
    return [attacks] if isinstance(attacks, str) else list(attacks)


def check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a whole number >= 1, got {value!r}")


def checked_certifiers(certify, norm):
    """`certify` (None, a name or names of step 8's --certify certifiers) as a list, each one that certifies
    `norm`."""
    names = [] if certify is None else [certify] if isinstance(certify, str) else list(certify)
    for name in names:
        if name not in interval_certifiers():
            raise UsageError(f"certify {name!r}: choose from {', '.join(interval_certifiers())}")
        check_certifies(name, norm)
    return names


# ---- the model --------------------------------------------------------------------------------------------------

def as_classifier(model, images_u8):
    """`model` as the Classifier the attacks take: itself, or a plain nn.Module wrapped as step 8 wraps a model file
    (mean 0, std 1: the module normalizes inside itself, if at all), its size the images' own where they are square
    (no resize: the call never transforms an image) and its classes named by index."""
    if isinstance(model, Classifier):
        return model
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module returning logits, got {type(model).__name__}")
    height, width = images_u8.shape[2:]
    with torch.no_grad():
        first = images_u8[:1].to(next(model.parameters(), torch.empty(0)).device).float() / 255
        logits = model(first)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UsageError(f"model must return float logits of shape (N, C); for one image it returned {found}")
    preprocessing = Preprocessing(height if height == width else None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    return Classifier(model, preprocessing, type(model).__name__, classes=default_classes(logits.shape[1]))


@contextlib.contextmanager
def evaluated(model, images_u8, device):
    """The model as a frozen Classifier on `device` (None: where its weights are) for the evaluation, then left as it
    was: training mode and requires_grad put back (the attacks need eval mode, and no gradients for the weights)."""
    modules = list(model.modules())
    training = [module.training for module in modules]
    parameters = list(model.parameters())
    requires_grad = [parameter.requires_grad for parameter in parameters]
    classifier = as_classifier(model, images_u8)
    home = classifier.mean.device
    classifier.eval()
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield classifier.to(get_device(device) if device is not None else home)
    finally:
        classifier.to(home)
        for module, mode in zip(modules, training):
            module.training = mode
        for parameter, flag in zip(parameters, requires_grad):
            parameter.requires_grad_(flag)


# ---- the evaluation ---------------------------------------------------------------------------------------------

def run_stages(model, arrays, labels, plan, settings):
    """Step 8's loop without its files: per batch of `settings.batch_size` in order, engine.run_batch (the loop step 8
    runs) with the images kept in memory (engine.MemoryStore) instead of PNGs. Returns step 8's rows and the Stages
    of the ensemble's jobs (each image's size and distance as floats, the fooling images)."""
    photos = SimpleNamespace(names=[str(index) for index in range(len(arrays))], labels=labels)
    done, rows, stages = {}, [], []
    store = MemoryStore()
    for members in cut(len(arrays), settings.batch_size):
        batch, _ = decode_batch(model, photos, plan, [(index, arrays[index], None) for index in members])
        for stage, found in run_batch(model, photos, plan, batch, done, settings, store):
            rows += found
            if stage.job.attack == "ensemble":
                stages.append(stage)
    return rows, stages


def certify_all(model, names, arrays, labels, settings):
    """{certifier: its rows} at the run's epsilon, step 8's --certify certifiers with their default flags."""
    options = default_certifier_options(settings.norm, settings.seed)
    certifiers = make_certifiers(names, model, options, (3, *arrays[0].shape[:2]))
    ids = [str(index) for index in range(len(arrays))]
    return {name: certify_images(certifier, arrays, labels, list(settings.epsilons), ids)
            for name, certifier in certifiers.items()}


def smallest_distances(rows, stages, count):
    """Per image, the smallest adversarial perturbation found (step 8's report.smallest_distances, at full
    precision): the size of a fooling image or FAB's distance, the smaller; inf where none was found; 0 for an
    image misclassified when clean."""
    smallest = torch.full((count,), float("inf"), dtype=torch.float64)
    for row in rows:
        if row["attack"] == "clean" and row["clean_correct"] != "1":
            smallest[int(row["image"])] = 0.0
    for stage in stages:
        for k, index in enumerate(stage.todo):
            distance = float("inf") if stage.distances[k] is None else stage.distances[k]
            found = [distance, *([stage.sizes[k].item()] if stage.success[k] else [])]
            smallest[index] = min(smallest[index].item(), *found)
    return smallest


def summarize(rows, stages, images_u8, plan, settings, certified):
    """The RobustAccuracy of the rows: the counts robust_accuracy.csv gives, the fooling images, the distances and,
    with `certified`, the interval."""
    count, correct, table = robust_counts(rows, plan, settings.epsilons)
    per_attack = {attack: robust / count for _, attack, robust in table if attack != "worst-case"}
    robust = table[-1][2] / count
    fooled = torch.zeros(count, dtype=torch.bool)
    result_images = images_u8.clone()
    for stage in stages:
        for index, image, success in zip(stage.todo, stage.images, stage.success):
            if success:
                fooled[index] = True
                result_images[index] = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    result = RobustAccuracy(robust, correct / count, per_attack, fooled, result_images,
                            smallest_distances(rows, stages, count), settings.norm, settings.epsilons[0],
                            list(plan.ensemble))
    if certified:
        epsilon = settings.epsilons[0]
        result.certified_by = {name: certified_counts(found, epsilon)[0] / count for name, found in certified.items()}
        result.certified = max(result.certified_by.values())  # a proof from any one certifier is a proof
        result.interval = (result.certified, robust)
    return result
