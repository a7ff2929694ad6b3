"""Adversarial attacks on RGB pixels in [0, 1], bounded in L-infinity by `epsilon` levels out of 255.

The shared mechanics live once, in `Attack`:
- every iterate is projected onto the epsilon ball around the input and onto [0, 1], after the last step too;
- the model always sees the 8-bit image that would be saved (the iterate rounded to whole levels, with a
  straight-through gradient), so the success it reports is the success of the file, rounding cannot undo it, and an
  iterate whose rounding stops moving keeps accumulating until it crosses a level: optimization goes on on the
  8-bit lattice;
- a sample stops as soon as its 8-bit image is classified as the target (or, untargeted, as anything but its true
  class) unless `early_stop=False`; the steps it used are reported;
- below fp32 (`precision`), each step's forward and gradient run under autocast, but a success counts only when an
  fp32 forward of the 8-bit image confirms it, and the final image is judged in fp32: precision costs steps, not truth;
- restarts, random starts seeded per image (so a batch gives what its images give one at a time), and an optional
  `forward` (a defense in front of the model, see utils.defenses) averaged over `eot` random draws per step.

Each attack then only says what it minimizes (`loss`) and how it steps (`update`). Square, which queries scores
instead of following gradients, has its own loop but judges every image through the same `judge`.
"""
import contextlib
import hashlib
import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils import speed
from utils.images import to_tensor, to_uint8

# The model sees the rounded 8-bit image, so a pixel moves only once delta crosses half a level. A sign step much
# smaller than that starves: at epsilon 1 and 100 steps Madry's 2.5 * epsilon / steps is 0.025 levels, 20 steps of
# one sign before a single pixel changes, and PGD fooled fewer photos than torchattacks with alpha 0.25 (issue 7).
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


def image_ids(ids, count):
    """Each image's position in the run as a CPU long tensor (count,): the given `ids`, or 0..count-1."""
    if ids is None:
        return torch.arange(count)
    ids = torch.as_tensor(ids, dtype=torch.long, device="cpu").view(-1)
    if len(ids) != count:
        raise ValueError(f"ids: {len(ids)} for {count} images")
    return ids


class Attack:
    """The shared loop. Subclasses set `name`, `iterative`, and may override `loss`, `init_state`, `update`.

    Arguments (shared by every attack):
        model: a classifier on pixels in [0, 1] (step_2_pretrained.Classifier).
        epsilon: L-infinity budget in levels out of 255, in [0, 255].
        steps: gradient steps, >= 1.
        alpha: step size in levels (attacks that use one).
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
    iterative = True
    gradient_free = False  # reads only the model's scores: its budget and its `steps_used` count queries

    def __init__(self, model, epsilon=10, steps=30, alpha=None, targeted=True, early_stop=True, random_start=False,
                 restarts=1, seed=0, forward=None, eot=1, on_step=None, precision="fp32"):
        self.model = model
        self.levels = float(epsilon)
        self.eps = float(epsilon) / 255
        self.steps = int(steps)
        self.alpha = (float(alpha) if alpha is not None else self.default_alpha_levels()) / 255
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

    # -- the shared loop -----------------------------------------------------------------------------------------
    def reached(self, logits, labels):
        hit = logits.argmax(dim=-1) == labels
        return hit if self.targeted else ~hit

    # The elementwise helpers below work in place on one fresh tensor each: on a large batch an allocation costs more
    # than the arithmetic. They compute exactly, bit for bit, what the plain expressions in their comments compute.
    def project(self, delta, original):
        # (original + delta.clamp(-eps, eps)).clamp(0, 1) - original
        return delta.clamp(-self.eps, self.eps).add_(original).clamp_(0, 1).sub_(original)

    def on_lattice(self, original_levels, delta):
        """The 8-bit image original + delta, never more than floor(epsilon) levels away, as a float in [0, 1]."""
        budget = float(int(self.levels))
        # (original_levels + (delta * 255).round().clamp(-budget, budget)).clamp(0, 255) / 255
        steps = delta.detach().mul(255).round_().clamp_(-budget, budget)
        return steps.add_(original_levels).clamp_(0, 255).div_(255)

    def random_delta(self, original, restart):
        if not self.random_start:
            return torch.zeros_like(original)
        generator = torch.Generator().manual_seed(self.seed * 1000 + restart)
        noise = torch.rand(original.shape[1:], generator=generator).mul_(2).sub_(1).mul_(self.eps)
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

    def run(self, original, labels, restart, ids):
        self.original = original
        original_levels = (original * 255).round()
        delta = self.random_delta(original, restart)
        state = self.init_state(delta)
        best = self.on_lattice(original_levels, delta)
        success = torch.zeros(len(original), dtype=torch.bool, device=original.device)
        steps_used = torch.full_like(success, self.steps, dtype=torch.long)
        predictions = torch.zeros_like(steps_used)
        active = torch.ones_like(success)
        for step in range(self.steps + 1):
            last = step == self.steps
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
            retry = self.run(images[failed], labels[failed], restart, ids[failed.cpu()])
            for field in ("adversarial", "success", "steps_used", "predictions"):
                getattr(result, field)[failed] = getattr(retry, field)
        return result


class SGD(Attack):
    """The tutorial's attack: SGD (lr 0.1, momentum 0.1) on a perturbation r in the model's normalized units,
    minimizing the cross-entropy to the target, with r clipped to the budget.
    Distance: L-infinity. Arguments: lr > 0, momentum in [0, 1), plus the shared ones (alpha unused)."""
    name = "sgd"

    def __init__(self, model, lr=0.1, momentum=0.1, **kwargs):
        super().__init__(model, **kwargs)
        self.lr, self.momentum = lr, momentum

    def init_state(self, delta):
        return {"velocity": torch.zeros_like(delta)}

    def update(self, delta, grad, state, loss=None):
        std = self.model.std  # r = delta / std, so dL/dr = std * dL/ddelta and a step in r moves delta by std * step
        state["velocity"] = self.momentum * state["velocity"] + grad * std
        return delta - self.lr * state["velocity"] * std


class FGSM(Attack):
    """Fast Gradient Sign Method (Goodfellow, Shlens and Szegedy 2015, "Explaining and Harnessing Adversarial
    Examples"): one step of size epsilon along the sign of the gradient. Distance: L-infinity. `steps` is 1."""
    name = "fgsm"
    iterative = False

    def __init__(self, model, **kwargs):
        kwargs.update(steps=1, alpha=None, restarts=1, random_start=False)
        super().__init__(model, **kwargs)

    def default_alpha_levels(self):
        return self.levels

    def update(self, delta, grad, state, loss=None):
        return grad.sign().mul_(-self.alpha).add_(delta)  # delta - alpha * sign(grad), one allocation


class PGD(Attack):
    """Projected Gradient Descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
    Attacks"; targeted as in Kurakin et al. 2017): sign-gradient steps of `alpha` levels (default 2.5 * epsilon /
    steps, at least MIN_STEP_LEVELS), projected onto the ball, with optional `random_start` and `restarts`.
    Distance: L-infinity."""
    name = "pgd"

    def update(self, delta, grad, state, loss=None):
        return grad.sign().mul_(-self.alpha).add_(delta)  # delta - alpha * sign(grad), one allocation


class MIFGSM(Attack):
    """Momentum Iterative FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum"): the sign of an
    accumulated, L1-normalized gradient, `decay` in [0, 1] (default 1.0), step alpha = epsilon / steps (at least
    MIN_STEP_LEVELS) by default. Distance: L-infinity."""
    name = "mifgsm"
    travel = 1.0

    def __init__(self, model, decay=1.0, **kwargs):
        super().__init__(model, **kwargs)
        self.decay = decay

    def init_state(self, delta):
        return {"momentum": torch.zeros_like(delta)}

    def update(self, delta, grad, state, loss=None):
        l1 = grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        state["momentum"] = self.decay * state["momentum"] + grad / l1
        return delta - self.alpha * state["momentum"].sign()


class CW(Attack):
    """Carlini and Wagner 2017 ("Towards Evaluating the Robustness of Neural Networks"), L2 version: Adam (`lr`,
    default 0.01) on ||x' - x||_2^2 + c * max(max_{j != t} Z_j - Z_t, -kappa), with the box kept by clipping (the
    paper's "clipped gradient descent" variant) and the shared L-infinity cap of epsilon (255 lifts it).
    Distance: L2 (also reported in L-infinity). Arguments: c > 0 (default 1), kappa >= 0 (default 0), lr > 0."""
    name = "cw"

    def __init__(self, model, c=1.0, kappa=0.0, lr=0.01, **kwargs):
        super().__init__(model, **kwargs)
        self.c, self.kappa, self.lr = c, kappa, lr

    def loss(self, logits, labels, adversarial, original):
        to_go = -margin(logits, labels) if self.targeted else margin(logits, labels)
        distance = (adversarial - original).flatten(1).pow(2).sum(dim=1)
        return distance + self.c * to_go.clamp_min(-self.kappa)

    def init_state(self, delta):
        return {"m": torch.zeros_like(delta), "v": torch.zeros_like(delta), "t": 0}

    def update(self, delta, grad, state, loss=None, beta1=0.9, beta2=0.999):
        state["t"] += 1
        state["m"] = beta1 * state["m"] + (1 - beta1) * grad
        state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
        m_hat = state["m"] / (1 - beta1 ** state["t"])
        v_hat = state["v"] / (1 - beta2 ** state["t"])
        return delta - self.lr * m_hat / (v_hat.sqrt() + 1e-8)


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


def apgd_checkpoints(steps):
    """The steps where APGD may halve its step size: w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce and Hein 2020, section 3.2)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(fraction * steps, 6)) for fraction in p[1:]})


class APGD(Attack):
    """Auto-PGD (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks"), L-infinity: sign-gradient steps with momentum 0.75 and no step size to tune. The step
    starts at 2 * epsilon and is halved at the checkpoints `apgd_checkpoints` for each sample whose loss improved in
    fewer than `rho` (0.75) of the steps since the last checkpoint, or whose step was not halved at the last checkpoint
    and whose best loss has not improved since; a halving restarts that sample from its best point (with the
    gradient there). Distance: L-infinity. Arguments: loss "ce" (cross-entropy, default) or "dlr" (Difference of
    Logits Ratio; targeted: the margin of the target over the strongest other class, divided as in `dlr`'s targeted
    version), plus the shared ones (alpha unused)."""
    name = "apgd"
    momentum = 0.75  # the paper's alpha: the new step's weight; the previous move keeps 1 - alpha
    rho = 0.75

    def __init__(self, model, loss="ce", **kwargs):
        kwargs.update(alpha=None)
        super().__init__(model, **kwargs)
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        self.objective = loss
        self.checkpoints = set(apgd_checkpoints(self.steps))

    def default_alpha_levels(self):
        return 2 * self.levels

    def loss(self, logits, labels, adversarial, original):
        if self.objective == "ce":
            return super().loss(logits, labels, adversarial, original)
        if not self.targeted:
            return dlr(logits, labels)
        # the strongest non-target class stands in for the true class: at the start it is the clean prediction, and
        # it stays the class to beat until the target is top-1, which is what a targeted success asks for
        strongest_other = logits.scatter(-1, labels.unsqueeze(-1), float("-inf")).argmax(dim=-1)
        return dlr(logits, strongest_other, labels)

    def init_state(self, delta):
        return {"step": 0}

    def update(self, delta, grad, state, loss=None):
        step = state["step"]
        state["step"] += 1
        if step == 0:
            state.update(eta=torch.full_like(loss, self.alpha).view(-1, 1, 1, 1), previous=delta,
                         best_loss=loss, best_delta=delta, best_grad=grad, last_loss=loss,
                         improved=torch.zeros_like(loss), best_at_check=loss, halved=torch.zeros_like(loss, dtype=bool),
                         last_check=0)
        else:
            state["improved"] += loss < state["last_loss"]
            state["last_loss"] = loss
            better = loss < state["best_loss"]
            state["best_loss"] = torch.where(better, loss, state["best_loss"])
            state["best_delta"] = torch.where(better.view(-1, 1, 1, 1), delta, state["best_delta"])
            state["best_grad"] = torch.where(better.view(-1, 1, 1, 1), grad, state["best_grad"])
        if step in self.checkpoints:
            delta, grad = self.checkpoint(delta, grad, state, step)
        # z = P(x + eta sign(grad)); x' = x + a (z - x) + (1 - a) (x - x_prev), a = 1 on the first step
        z = self.project(grad.sign().mul_(-state["eta"]).add_(delta), self.original)
        keep = self.momentum if step > 0 else 1.0
        moved = delta + keep * (z - delta) + (1 - keep) * (delta - state["previous"])
        state["previous"] = delta
        return moved

    def checkpoint(self, delta, grad, state, step):
        """Halve the step of the samples that oscillate or stall, and send them back to their best point."""
        oscillating = state["improved"] < self.rho * (step - state["last_check"])
        stalled = ~state["halved"] & (state["best_loss"] >= state["best_at_check"])
        halve = oscillating | stalled
        state["eta"] = torch.where(halve.view(-1, 1, 1, 1), state["eta"] / 2, state["eta"])
        state.update(halved=halve, best_at_check=state["best_loss"], improved=torch.zeros_like(state["improved"]),
                     last_check=step)
        back = halve.view(-1, 1, 1, 1)
        return torch.where(back, state["best_delta"], delta), torch.where(back, state["best_grad"], grad)


class APGDT(APGD):
    """APGD-T (Croce and Hein 2020), the targeted-DLR APGD that AutoAttack uses to measure *untargeted* robustness.
    Untargeted (labels = true classes): one APGD run with the targeted DLR loss (z_true - z_t) / (z_1 - (z_3 + z_4)
    / 2) towards each of the `target_classes` (default 9, in [1, 999]) classes with the largest clean logits other
    than the true one, in that order, each run only on the images no earlier run fooled; an image is fooled when its
    prediction is not its true class. Targeted (labels = targets): one such run towards the target, the strongest
    non-target class standing in for the true class. Distance: L-infinity. The steps reported are those of the run
    that produced the returned image (as for restarts)."""
    name = "apgd-t"

    def __init__(self, model, target_classes=9, **kwargs):
        kwargs.update(loss="dlr")
        super().__init__(model, **kwargs)
        self.target_classes = int(target_classes)

    # Untargeted runs carry (true class, target) pairs as their labels, so that the shared loop's restarts and early
    # stop see one label per sample.
    def loss(self, logits, labels, adversarial, original):
        if labels.dim() == logits.dim():
            return dlr(logits, labels[..., 0], labels[..., 1])
        return super().loss(logits, labels, adversarial, original)

    def reached(self, logits, labels):
        if labels.dim() == logits.dim():
            return logits.argmax(dim=-1) != labels[..., 0]
        return super().reached(logits, labels)

    def __call__(self, images, labels, ids=None):
        if self.targeted:
            return super().__call__(images, labels, ids)
        ids = image_ids(ids, len(images))
        images = images.detach()
        labels = torch.as_tensor(labels, device=images.device).view(-1)
        with torch.no_grad():  # ranks the targets only: success is always judged by `judge`
            clean = self.forward(images)
        count = max(1, min(self.target_classes, clean.shape[1] - 1))
        targets = clean.scatter(1, labels.view(-1, 1), float("-inf")).topk(count, dim=1).indices
        result = None
        for rank in range(count):
            todo = torch.arange(len(images), device=images.device) if result is None else \
                (~result.success).nonzero().view(-1)
            if len(todo) == 0:
                break
            pairs = torch.stack([labels[todo], targets[todo, rank]], dim=1)
            part = super().__call__(images[todo], pairs, ids[todo.cpu()])
            if result is None:
                result = part
                continue
            for field in ("adversarial", "success", "steps_used", "predictions"):
                getattr(result, field)[todo] = getattr(part, field)
        return result


def square_fraction(p_init, query, queries):
    """Square's share of pixels changed per query: p_init, halved at the paper's marks 10, 50, 200, 500, 1000, 2000,
    4000, 6000, 8000 out of 10000 iterations, rescaled to `queries`: the reference's p_selection (pyautoattack's
    square.py, resc_schedule=True), iteration `query` of `queries`."""
    scaled = int(query / queries * 10000)
    return p_init / 2 ** sum(scaled > mark for mark in (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000))


def square_side(p_init, query, queries, height, width):
    """The window's side at iteration `query`: sqrt(square_fraction * pixels), rounded, in [1, min(height, width)]
    (the reference's rule)."""
    side = round(math.sqrt(square_fraction(p_init, query, queries) * height * width))
    return min(max(side, 1), height, width)


def image_seed(seed, restart, image_id):
    """The seed of one image's draws: a hash of (seed, restart, image id), so that nearby seeds and ids give unrelated
    streams. 32 bits: torch's CPU generator (mt19937) keeps only the low 32 bits of a seed anyway."""
    key = f"{int(seed)},{int(restart)},{int(image_id)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


class SquareDraws:
    """Square's random draws, one generator per image seeded from (seed, restart, the image's id): an image draws the
    same whichever images share its batch, and images of a batch draw independently. Windows and sign orders are
    drawn ahead in blocks of `BLOCK` queries per image, one call per image and block, so a query costs no Python loop
    over images."""
    BLOCK = 256

    def __init__(self, seed, restart, ids, channels, signs):
        self.generators = [torch.Generator().manual_seed(image_seed(seed, restart, i)) for i in ids.tolist()]
        self.channels = channels
        self.signs = signs  # how many sign patterns a window can take (2 ** channels)
        self.start = self.stop = 0

    def stripes(self, width):
        """(B, channels, 1, width) of +-1: one sign per channel and column of each image."""
        return torch.stack([torch.randint(0, 2, (self.channels, 1, width), generator=generator)
                            for generator in self.generators]).mul_(2).sub_(1)

    def window(self, query):
        """Iteration `query`'s draws, (B,) each: (row, column) of the window's corner as fractions in [0, 1) of the
        free range, and (B, signs) the order in which each image tries the sign patterns."""
        if not self.start <= query < self.stop:
            uniforms = [torch.rand(self.BLOCK, 2 + self.signs, dtype=torch.float64, generator=generator)
                        for generator in self.generators]
            self.block = torch.stack(uniforms)
            self.start, self.stop = query, query + self.BLOCK
        drawn = self.block[:, query - self.start]
        return drawn[:, 0], drawn[:, 1], drawn[:, 2:].argsort(dim=1)


SQUARE_TOLERANCE = 1e-5


class Square(Attack):
    """Square Attack (Andriushchenko et al. 2020, "Square Attack: a query-efficient black-box adversarial attack via
    random search"), L-infinity, score-based: it reads the model's output scores and never a gradient. It starts from
    vertical stripes of +-epsilon (one sign per channel and column), then each query sets a random square window to
    +-epsilon (one sign per channel, the first in a random order that changes the image) and keeps it when the loss
    drops: the margin of the true class over the strongest other (untargeted) or the cross-entropy to the target
    (targeted), as in the paper. The window covers a share `square_fraction` of the pixels, from `p_init` (default
    0.8, the reference implementation's and torchattacks') down, on the reference's schedule rescaled to `queries`.
    Every image is on whole levels at every query, so its budget is floor(epsilon) levels.
    Distance: L-infinity. Arguments: queries >= 1 (the budget per image, the first query included; default: `steps`),
    p_init in (0, 1], plus the shared ones (alpha and random_start unused). `steps_used` reports the queries used.
    Each image draws its stripes, windows and signs from its own generator, seeded from `seed`, the restart and the
    image's id (its position in the run, see `Attack.__call__`): windows differ between the images of a batch, and an
    image's result does not depend on which other images share its batch."""
    name = "square"
    gradient_free = True

    def __init__(self, model, queries=None, p_init=0.8, **kwargs):
        super().__init__(model, **kwargs)
        self.queries = int(queries) if queries is not None else self.steps
        self.p_init = float(p_init)

    def loss(self, logits, labels, adversarial, original):
        if self.targeted:
            return F.cross_entropy(logits, labels, reduction="none")
        return margin(logits, labels)

    @torch.no_grad()
    def run(self, original, labels, restart, ids):
        self.original = original
        channels, height, width = original.shape[1:]
        device = original.device
        budget = float(int(self.levels))
        original_levels = (original * 255).round()
        # the two values a pixel can take in a window: original + budget and original - budget, clipped to [0, 255]
        up, down = original_levels.add(budget).clamp_(max=255), original_levels.sub(budget).clamp_(min=0)
        combos = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=channels)), device=device)
        draws = SquareDraws(self.seed, restart, ids, channels, len(combos))
        best = original_levels.add(budget * draws.stripes(width).to(device)).clamp_(0, 255)
        loss, success, logits = self.judge(best / 255, labels)
        used = torch.ones(len(original), dtype=torch.long, device=device)
        active = ~success if self.early_stop else torch.ones_like(success)
        for query in range(1, self.queries if budget > 0 else 1):
            if self.on_step:
                self.on_step(query - 1, loss, logits)
            side = square_side(self.p_init, query - 1, self.queries, height, width)
            top, left, order = (drawn.to(device) for drawn in draws.window(query - 1))
            todo = active.nonzero().view(-1)
            if len(todo) == 0:
                break
            if len(todo) == len(best):
                todo = slice(None)  # a view instead of gathered copies: most queries, without early stop all
            # every corner that keeps the window inside the image, 0..height - side, equally likely
            top = (top[todo] * (height - side + 1)).long()
            left = (left[todo] * (width - side + 1)).long()
            candidate = self.square_step(best[todo], up[todo], down[todo], top, left, side, combos, order[todo])
            new_loss, new_success, new_logits = self.judge(candidate / 255, labels[todo])
            # a lower loss moves on, but never away from success; reaching the goal is always kept. "Lower" means by
            # more than float noise: a window the model does not feel gives the same loss up to the last bits, and
            # those bits depend on the batch's size, so a strict < would make an image's path depend on its batch
            lower = new_loss < loss[todo] - SQUARE_TOLERANCE * loss[todo].abs().clamp_min(1)
            accept = (lower & (new_success | ~success[todo])) | (new_success & ~success[todo])
            best[todo] = torch.where(accept.view(-1, 1, 1, 1), candidate, best[todo])
            loss[todo] = torch.where(accept, new_loss, loss[todo])
            logits[todo] = torch.where(accept.view(-1, 1), new_logits, logits[todo])
            success[todo] = torch.where(accept, new_success, success[todo])
            used[todo] += 1
            if self.early_stop:
                active &= ~success
        return AttackResult(best / 255, success, used, logits.argmax(dim=-1))

    @staticmethod
    def square_step(best, up, down, top, left, side, combos, order):
        """`best` with each image's side x side window at (`top`, `left`) (B,) set to up or down per channel: the
        first sign pattern in the image's `order` (indices into `combos`, (patterns, C) of +-1) that changes the image
        (the first one if none can). Only the windows are read and written: a view of every window of the batch,
        indexed at each image's corner, so a small window costs little whatever the image's size."""
        rows = torch.arange(len(best), device=best.device)

        def windows(levels):  # (B, C, s, s): each image's window, a gather from the view (B, C, corners, corners, s, s)
            return levels.unfold(2, side, 1).unfold(3, side, 1)[rows, :, top, left]
        current, raised, lowered = windows(best), windows(up), windows(down)
        # per image and channel, whether each sign changes any pixel of the window; a pattern changes the image when
        # one of its channels does
        changes_up = (raised != current).flatten(2).any(dim=2)  # (B, C)
        changes_down = (lowered != current).flatten(2).any(dim=2)
        changes = torch.where(combos > 0, changes_up.unsqueeze(1), changes_down.unsqueeze(1)).any(dim=2)  # (B, P)
        first = changes.gather(1, order).int().argmax(dim=1, keepdim=True)
        signs = combos[order.gather(1, first).view(-1)].view(len(best), -1, 1, 1)  # (B, C, 1, 1)
        candidate = best.clone()
        candidate.unfold(2, side, 1).unfold(3, side, 1)[rows, :, top, left] = torch.where(signs > 0, raised, lowered)
        return candidate


ATTACKS = {attack.name: attack for attack in (SGD, FGSM, PGD, MIFGSM, CW, APGD, APGDT, Square)}


def make_attack(method, model, **kwargs):
    """An attack by name, given the shared arguments plus its own (others it does not take are dropped)."""
    own = {"sgd": ("lr", "momentum"), "mifgsm": ("decay",), "cw": ("c", "kappa", "lr"), "apgd": ("loss",),
           "apgd-t": ("target_classes",), "square": ("queries", "p_init")}.get(method, ())
    shared = ("epsilon", "steps", "alpha", "targeted", "early_stop", "random_start", "restarts", "seed", "forward",
              "eot", "on_step", "precision")
    chosen = {key: value for key, value in kwargs.items() if value is not None and key in own + shared}
    return ATTACKS[method](model, **chosen)


def perturbation_size(adversarial, original):
    """(L-infinity in levels, L2 in [0, 1] units) per sample."""
    difference = (adversarial - original).flatten(1)
    return (difference.abs().amax(dim=1) * 255).round(), difference.norm(dim=1)


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
