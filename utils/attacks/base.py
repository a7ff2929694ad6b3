"""The shared base of every attack: the result, the loop, the projections and the 8-bit lattice, once.

- every iterate is projected onto the epsilon ball of the attack's `norm` around the input and onto [0, 1], after the
  last step too (the exact projections of utils.attacks.projection);
- the model always sees the 8-bit image that would be saved (the iterate rounded to whole levels and, in L2 and L1,
  pulled back onto the lattice inside the ball, with a straight-through gradient), so the success it reports is the
  success of the file, rounding cannot undo it, and an iterate whose rounding stops moving keeps accumulating until it
  crosses a level: optimization goes on on the 8-bit lattice;
- a sample stops as soon as its 8-bit image is classified as the target (or, untargeted, as anything but its true
  class) unless `early_stop=False`; the steps it used are reported;
- below fp32 (`precision`), each step's forward and gradient run under autocast, but a success counts only when an
  fp32 forward of the 8-bit image confirms it, and the final image is judged in fp32: precision costs steps, not truth;
- restarts, random starts seeded per image (so a batch gives what its images give one at a time), and an optional
  `forward` (a defense in front of the model, see utils.defenses) averaged over `eot` random draws per step.

Each attack then only says what it minimizes (`loss`) and how it steps (`update`).
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils import speed
from utils.attacks import norms
from utils.attacks.lattice import lattice_within

# The model sees the rounded 8-bit image, so a pixel moves only once delta crosses half a level. A sign step much
# smaller than that starves: at epsilon 1 and 100 steps Madry's 2.5 * epsilon / steps is 0.025 levels, 20 steps of
# one sign before a single pixel changes, and PGD fooled fewer photos than torchattacks with alpha 0.25.
# With a floor of a quarter level, two steps of one sign move a pixel, and a step is still fine enough to stop on
# each level on the way (measured in tests/test_crosscheck_torchattacks.py).
MIN_STEP_LEVELS = 0.25


def margin(logits, labels):
    """Per sample: the logit of `labels` minus the largest other logit (> 0 exactly when `labels` is top-1)."""
    label_logit = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, labels.unsqueeze(-1), float("-inf")).amax(dim=-1)
    return label_logit - others


@dataclass
class AttackResult:
    adversarial: torch.Tensor  # (B, 3, H, W) in [0, 1], on whole levels: exactly what a PNG will hold
    success: torch.Tensor      # (B,) bool: the 8-bit image reached the goal
    steps_used: torch.Tensor   # (B,) gradient steps taken before the returned image
    predictions: torch.Tensor  # (B,) top-1 class of the returned image, through `forward`
    # (B,) float, for attacks that minimize the perturbation (FAB): the size, in the threat model's units (Linf in
    # levels, L2 and L1 in [0, 1] units), of the smallest adversarial 8-bit image found, inf where none was found;
    # it may exceed epsilon (the returned image is then the input, not that adversarial). None for the others.
    distance: torch.Tensor = None

    FIELDS = ("adversarial", "success", "steps_used", "predictions", "distance")

    def merge(self, rows, part):
        """Write `part`'s results into `rows` of this result (a retry or a run on the images still standing)."""
        for name in self.FIELDS[:4]:
            getattr(self, name)[rows] = getattr(part, name)
        if self.distance is not None:  # the smallest adversarial found by any run
            self.distance[rows] = torch.minimum(self.distance[rows], part.distance)


def image_ids(ids, count):
    """Each image's position in the run as a CPU long tensor (count,): the given `ids`, or 0..count-1."""
    if ids is None:
        return torch.arange(count)
    ids = torch.as_tensor(ids, dtype=torch.long, device="cpu").view(-1)
    if len(ids) != count:
        raise ValueError(f"ids: {len(ids)} for {count} images")
    return ids


class Attack:
    """The shared loop. Subclasses set `name`, `iterative`, `norms` (the threat models they offer), and may override
    `loss`, `init_state`, `update`.

    Arguments (shared by every attack):
        model: a classifier on pixels in [0, 1] (utils.models.Classifier).
        norm: the threat model, one of the attack's `norms`: "Linf" (default), "L2" or "L1".
        epsilon: the budget. Linf: levels out of 255, in [0, 255]. L2, L1: the norm of the perturbation of the whole
            (3, H, W) image in [0, 1] pixel units (AutoAttack's convention), >= 0.
        steps: gradient steps, >= 1.
        alpha: step size (attacks that use one): in levels for Linf, in the norm's [0, 1] units for L2 and L1.
        targeted: labels are targets to reach (True) or true classes to leave (False).
        early_stop: stop each sample once its 8-bit image succeeds.
        random_start, restarts, seed: start uniformly in the ball; retry failed samples from new random starts.
        forward: what the attack differentiates and judges (default: the model; a defense wrapper for BPDA).
        eot: random draws of `forward` averaged per step (Expectation over Transformation); success needs all.
        on_step: called as on_step(step, loss, logits) before each update, for progress reporting.
        precision: "fp32", or "bf16" / "fp16" (CUDA) to compute each step's forward and gradient under autocast;
            a success then counts only when an fp32 forward of the 8-bit image confirms it (see `judge`).
    """
    name = "attack"
    norms = ("Linf",)
    iterative = True
    gradient_free = False  # reads only the model's scores: its budget and its `steps_used` count queries

    def __init__(self, model, epsilon=10, steps=30, alpha=None, targeted=True, early_stop=True, random_start=False,
                 restarts=1, seed=0, forward=None, eot=1, on_step=None, precision="fp32", norm="Linf"):
        self.model = model
        self.norm = norms.check_norm(norm, self.norms, self.name)
        if float(epsilon) < 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.steps = int(steps)
        if norm == "Linf":
            self.levels = float(epsilon)
            self.eps = float(epsilon) / 255
            self.alpha = (float(alpha) if alpha is not None else self.default_alpha_levels()) / 255
        else:
            self.eps = float(epsilon)
            self.levels = self.eps * 255  # the budget in levels of the same norm: what the 8-bit file may spend
            self.alpha = float(alpha) if alpha is not None else self.default_alpha()
        self.targeted = targeted
        self.early_stop = early_stop
        self.random_start = random_start
        self.restarts = max(1, int(restarts))
        self.seed = seed
        self.forward = forward or model
        self.eot = max(1, int(eot))
        self.on_step = on_step
        if precision not in speed.PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(speed.PRECISIONS)}, got {precision!r}")
        self.precision = precision

    travel = 2.5  # Madry et al.: steps of alpha = 2.5 * epsilon / steps are enough to cross the ball and come back

    def default_alpha_levels(self):
        """`travel` * epsilon / steps, but never under MIN_STEP_LEVELS, so that the default step cannot starve on the
        8-bit lattice (see MIN_STEP_LEVELS)."""
        return max(self.travel * self.levels / self.steps, MIN_STEP_LEVELS)

    def default_alpha(self):
        """L2 and L1: `travel` * epsilon / steps, in the norm's units (Madry et al.'s rule)."""
        return self.travel * self.eps / self.steps

    # -- what each attack defines --------------------------------------------------------------------------------
    def loss(self, logits, labels, adversarial, original):
        """Per-sample loss to minimize: cross-entropy to the target, or minus cross-entropy to the true class."""
        cross_entropy = F.cross_entropy(logits, labels, reduction="none")
        return cross_entropy if self.targeted else -cross_entropy

    def init_state(self, delta):
        return {}

    def update(self, delta, grad, state, loss=None):
        """The next delta from the current one, its gradient and its per-sample `loss` (APGD's step control)."""
        raise NotImplementedError

    def conclude(self, delta, loss, state):
        """A run with final=False ends here with its last iterate `delta` and its per-sample `loss`, which no update
        sees: for attacks that chain runs (APGD's growing epsilon keeps the stage's best point)."""

    # -- the shared loop -----------------------------------------------------------------------------------------
    def reached(self, logits, labels):
        hit = logits.argmax(dim=-1) == labels
        return hit if self.targeted else ~hit

    # The elementwise helpers below work in place on one fresh tensor each: on a large batch an allocation costs more
    # than the arithmetic. They compute exactly, bit for bit, what the plain expressions in their comments compute.
    def project(self, delta, original):
        if self.norm != "Linf":
            return norms.project(delta, original, self.eps, self.norm)
        # (original + delta.clamp(-eps, eps)).clamp(0, 1) - original
        return delta.clamp(-self.eps, self.eps).add_(original).clamp_(0, 1).sub_(original)

    def on_lattice(self, original_levels, delta):
        """The 8-bit image original + delta as a float in [0, 1]: in Linf never more than floor(epsilon) levels away,
        in L2 and L1 pulled back onto the lattice inside the ball (lattice_within)."""
        if self.norm != "Linf":
            return lattice_within(original_levels, delta, self.norm, self.levels).div_(255)
        budget = float(int(self.levels))
        # (original_levels + (delta * 255).round().clamp(-budget, budget)).clamp(0, 255) / 255
        steps = delta.detach().mul(255).round_().clamp_(-budget, budget)
        return steps.add_(original_levels).clamp_(0, 255).div_(255)

    def random_delta(self, original, restart):
        if not self.random_start:
            return torch.zeros_like(original)
        generator = torch.Generator().manual_seed(self.seed * 1000 + restart)
        if self.norm == "Linf":
            noise = torch.rand(original.shape[1:], generator=generator).mul_(2).sub_(1).mul_(self.eps)
        else:
            # L2: a uniform direction at radius epsilon; L1: Gaussian noise projected onto the ball (AutoAttack's)
            noise = torch.randn(original.shape[1:], generator=generator)
            if self.norm == "L2":
                noise = noise.mul_(self.eps / noise.norm().clamp_min(1e-12))
        return self.project(noise.to(original.device).expand_as(original).clone(), original)

    def draws(self, image):
        """Logits (eot, B, classes) of `forward` on `eot` draws of the batch."""
        batch = image.repeat(self.eot, 1, 1, 1) if self.eot > 1 else image
        return self.forward(batch).view(self.eot, image.shape[0], -1)

    def judge(self, image, labels, settled=None):
        """Mean loss over the `eot` draws, success in all of them, and the last draw's logits.

        Below fp32 the forward runs under autocast only when a gradient is wanted (`image` requires it): that is
        where the time goes; an image only judged is judged in fp32. A low-precision success is a claim, and `reached`
        holds only where an fp32 forward of the same 8-bit image confirms it, so a rounding near the decision
        boundary can cost steps, never a wrong success. `settled` rows (already successes: their verdict is no
        longer needed) are not confirmed and read as not reached."""
        low = self.precision != "fp32" and image.requires_grad
        with speed.autocast(self.precision if low else "fp32", image.device):
            logits = self.draws(image).float()
        loss = torch.stack([self.loss(draw, labels, image, self.original) for draw in logits]).mean(dim=0)
        reached = self.reached(logits, labels.unsqueeze(0)).all(dim=0)
        if low:
            reached, logits = self.confirm(image, labels, reached if settled is None else reached & ~settled, logits)
        return loss, reached, logits[-1]

    def confirm(self, image, labels, claimed, logits):
        """The claimed successes an fp32 forward confirms, and the logits with those rows replaced by the fp32 ones.
        Only claimed rows run again: a success costs one more forward, a failure none."""
        rows = claimed.nonzero().view(-1)
        logits = logits.detach()
        if len(rows) == 0:
            return claimed, logits
        with torch.no_grad(), speed.full_precision(image.device):
            exact = self.draws(image.detach()[rows]).float()
        confirmed = torch.zeros_like(claimed)
        confirmed[rows] = self.reached(exact, labels[rows].unsqueeze(0)).all(dim=0)
        logits = logits.clone()
        logits[:, rows] = exact
        return confirmed, logits

    def run(self, original, labels, restart, ids, start=None, final=True):
        """One try on a batch, from a random start (or from `start`, a delta); the state of `update` is kept as
        `self.state` for attacks that chain runs. `final=False`: a run wanted only for that state (a stage that finds
        the next one's start), which ends with the loss of its last iterate given to `conclude` (a forward without a
        gradient) and returns None."""
        self.original = original
        original_levels = (original * 255).round()
        delta = self.random_delta(original, restart) if start is None else self.project(start.clone(), original)
        state = self.state = self.init_state(delta)
        best = self.on_lattice(original_levels, delta)
        success = torch.zeros(len(original), dtype=torch.bool, device=original.device)
        steps_used = torch.full_like(success, self.steps, dtype=torch.long)
        predictions = torch.zeros_like(steps_used)
        active = torch.ones_like(success)
        for step in range(self.steps + 1):
            last = step == self.steps
            if last and not final:
                # the last iterate judged too (no gradient): a stage's best point may be where it ended
                with torch.no_grad():
                    loss = self.judge(self.on_lattice(original_levels, delta), labels)[0]
                self.conclude(delta, loss, state)
                return None
            lattice = self.on_lattice(original_levels, delta)
            # straight-through rounding: the model sees exactly the 8-bit image, and its gradient with respect to that
            # image is used as the gradient for delta (rounding treated as the identity in the backward pass)
            image = lattice.clone().requires_grad_(not last)
            with torch.no_grad() if last else contextlib.nullcontext():  # the last image is only judged
                loss, reached, logits = self.judge(image, labels, settled=success)
            with torch.no_grad():
                keep = (reached & active) | (active & ~success)  # a success, or the latest try of a failure
                # torch.where rather than x[keep] = y[keep]: no host sync on a GPU
                best = torch.where(keep.view(-1, 1, 1, 1), lattice, best)
                steps_used = torch.where(keep, step, steps_used)
                predictions = torch.where(keep, logits.argmax(dim=1), predictions)
                success |= reached & active
                if self.early_stop:
                    active &= ~reached
            # without early stop every sample stays active: no need to ask the device (a host sync) every step
            if step == self.steps or (self.early_stop and not active.any()):
                break
            if self.on_step:
                self.on_step(step, loss.detach(), logits.detach())
            grad, = torch.autograd.grad(loss.sum(), image)
            with torch.no_grad():
                moved = self.project(self.update(delta, grad, state, loss.detach()), original)
                delta = torch.where(active.view(-1, 1, 1, 1), moved, delta) if self.early_stop else moved
        return AttackResult(best, success, steps_used, predictions)

    def __call__(self, images, labels, ids=None):
        """Attack a batch: `images` (B, 3, H, W) in [0, 1] on whole levels (not modified), `labels` (B,) targets or
        true classes, `ids` (B,) each image's position in the whole run (default 0..B-1), for attacks that draw
        per image (Square), so that an image draws the same alone or in any batch. Failed samples are retried from
        new random starts, `restarts` tries in all."""
        images = images.detach()
        labels = torch.as_tensor(labels, device=images.device).view(len(images), -1).squeeze(1)  # (B,), or (B, k)
        ids = image_ids(ids, len(images))
        result = self.run(images, labels, 0, ids)
        for restart in range(1, self.restarts):
            failed = (~result.success).nonzero().view(-1)
            if len(failed) == 0:
                break
            result.merge(failed, self.run(images[failed], labels[failed], restart, ids[failed.cpu()]))
        return result



def dlr(logits, labels, targets=None):
    """Croce and Hein's Difference of Logits Ratio, as a loss to minimize: a margin divided by the spread of the top
    logits, so that rescaling the logits does not change it.
    Without `targets`: margin(logits, labels) / (z_1 - z_3), where z_k is the k-th largest logit (untargeted).
    With `targets`: (z_labels - z_targets) / (z_1 - (z_3 + z_4) / 2), the targeted version."""
    top = logits.topk(4, dim=-1).values
    if targets is None:
        return margin(logits, labels) / (top[..., 0] - top[..., 2] + 1e-12)
    pick = lambda classes: logits.gather(-1, classes.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    return (pick(labels) - pick(targets)) / (top[..., 0] - (top[..., 2] + top[..., 3]) / 2 + 1e-12)



def top_targets(forward, images, labels, count):
    """(B, count) the classes with the largest clean logits other than `labels`, best first: the targets AutoAttack's
    targeted attacks (APGD-T, FAB-T) try in turn. Ranking only: success is always judged on the 8-bit image."""
    with torch.no_grad():
        clean = forward(images)
    count = max(1, min(count, clean.shape[1] - 1))
    return clean.scatter(1, labels.view(-1, 1), float("-inf")).topk(count, dim=1).indices


def over_targets(attack_pairs, images, labels, targets, ids):
    """Untargeted robustness through targeted runs: `attack_pairs(images, pairs, ids)` towards each column of
    `targets` in turn, each run only on the images no earlier run fooled; `pairs` (n, 2) are (true class, target)."""
    result = None
    for rank in range(targets.shape[1]):
        todo = torch.arange(len(images), device=images.device) if result is None else \
            (~result.success).nonzero().view(-1)
        if len(todo) == 0:
            break
        pairs = torch.stack([labels[todo], targets[todo, rank]], dim=1)
        part = attack_pairs(images[todo], pairs, ids[todo.cpu()])
        if result is None:
            result = part
        else:
            result.merge(todo, part)
    return result


class OverTopTargets:
    """For an attack with targeted runs (APGD-T, FAB-T), put before it in the bases: untargeted (labels = true
    classes), one targeted run towards each of the `target_classes` classes with the largest clean logits other than
    the true one (`top_targets`), each on the images no earlier run fooled (`over_targets`); targeted, the attack's
    own single run."""

    def __call__(self, images, labels, ids=None):
        if self.targeted:
            return super().__call__(images, labels, ids)
        ids = image_ids(ids, len(images))
        images = images.detach()
        labels = torch.as_tensor(labels, device=images.device).view(-1)
        targets = top_targets(self.forward, images, labels, self.target_classes)
        return over_targets(super().__call__, images, labels, targets, ids)
