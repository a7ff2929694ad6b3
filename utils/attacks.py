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

Each attack then only says what it minimizes (`loss`) and how it steps (`update`).
"""
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from utils import speed
from utils.images import to_tensor, to_uint8


@dataclass
class AttackResult:
    adversarial: torch.Tensor  # (B, 3, H, W) in [0, 1], on whole levels: exactly what a PNG will hold
    success: torch.Tensor      # (B,) bool: the 8-bit image reached the goal
    steps_used: torch.Tensor   # (B,) gradient steps taken before the returned image
    predictions: torch.Tensor  # (B,) top-1 class of the returned image, through `forward`


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

    def default_alpha_levels(self):
        return 2.5 * self.levels / self.steps  # Madry et al.: enough to cross the ball and come back

    # -- what each attack defines --------------------------------------------------------------------------------
    def loss(self, logits, labels, adversarial, original):
        """Per-sample loss to minimize: cross-entropy to the target, or minus cross-entropy to the true class."""
        cross_entropy = F.cross_entropy(logits, labels, reduction="none")
        return cross_entropy if self.targeted else -cross_entropy

    def init_state(self, delta):
        return {}

    def update(self, delta, grad, state):
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

    def run(self, original, labels, restart):
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
                moved = self.project(self.update(delta, grad, state), original)
                delta = torch.where(active.view(-1, 1, 1, 1), moved, delta) if self.early_stop else moved
        return AttackResult(best, success, steps_used, predictions)

    def __call__(self, images, labels):
        """Attack a batch: `images` (B, 3, H, W) in [0, 1] on whole levels (not modified), `labels` (B,) targets or
        true classes. Failed samples are retried from new random starts, `restarts` tries in all."""
        images = images.detach()
        labels = torch.as_tensor(labels, device=images.device).view(-1)
        result = self.run(images, labels, 0)
        for restart in range(1, self.restarts):
            failed = (~result.success).nonzero().view(-1)
            if len(failed) == 0:
                break
            retry = self.run(images[failed], labels[failed], restart)
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

    def update(self, delta, grad, state):
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

    def update(self, delta, grad, state):
        return grad.sign().mul_(-self.alpha).add_(delta)  # delta - alpha * sign(grad), one allocation


class PGD(Attack):
    """Projected Gradient Descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
    Attacks"; targeted as in Kurakin et al. 2017): sign-gradient steps of `alpha` levels (default 2.5 * epsilon /
    steps), projected onto the ball, with optional `random_start` and `restarts`. Distance: L-infinity."""
    name = "pgd"

    def update(self, delta, grad, state):
        return grad.sign().mul_(-self.alpha).add_(delta)  # delta - alpha * sign(grad), one allocation


class MIFGSM(Attack):
    """Momentum Iterative FGSM (Dong et al. 2018, "Boosting Adversarial Attacks with Momentum"): the sign of an
    accumulated, L1-normalized gradient, `decay` in [0, 1] (default 1.0), step alpha = epsilon / steps by default.
    Distance: L-infinity."""
    name = "mifgsm"

    def __init__(self, model, decay=1.0, **kwargs):
        super().__init__(model, **kwargs)
        self.decay = decay

    def default_alpha_levels(self):
        return self.levels / self.steps

    def init_state(self, delta):
        return {"momentum": torch.zeros_like(delta)}

    def update(self, delta, grad, state):
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
        label_logit = logits.gather(1, labels.view(-1, 1)).squeeze(1)
        others = logits.scatter(1, labels.view(-1, 1), float("-inf")).amax(dim=1)
        margin = others - label_logit if self.targeted else label_logit - others
        distance = (adversarial - original).flatten(1).pow(2).sum(dim=1)
        return distance + self.c * margin.clamp_min(-self.kappa)

    def init_state(self, delta):
        return {"m": torch.zeros_like(delta), "v": torch.zeros_like(delta), "t": 0}

    def update(self, delta, grad, state, beta1=0.9, beta2=0.999):
        state["t"] += 1
        state["m"] = beta1 * state["m"] + (1 - beta1) * grad
        state["v"] = beta2 * state["v"] + (1 - beta2) * grad * grad
        m_hat = state["m"] / (1 - beta1 ** state["t"])
        v_hat = state["v"] / (1 - beta2 ** state["t"])
        return delta - self.lr * m_hat / (v_hat.sqrt() + 1e-8)


ATTACKS = {attack.name: attack for attack in (SGD, FGSM, PGD, MIFGSM, CW)}


def make_attack(method, model, **kwargs):
    """An attack by name, given the shared arguments plus its own (others it does not take are dropped)."""
    own = {"sgd": ("lr", "momentum"), "mifgsm": ("decay",), "cw": ("c", "kappa", "lr")}.get(method, ())
    shared = ("epsilon", "steps", "alpha", "targeted", "early_stop", "random_start", "restarts", "seed", "forward",
              "eot", "on_step", "precision")
    chosen = {key: value for key, value in kwargs.items() if value is not None and key in own + shared}
    return ATTACKS[method](model, **chosen)


def perturbation_size(adversarial, original):
    """(L-infinity in levels, L2 in [0, 1] units) per sample."""
    difference = (adversarial - original).flatten(1)
    return (difference.abs().amax(dim=1) * 255).round(), difference.norm(dim=1)


def run_attack(model, method, images_u8, labels, **options):
    """One attack on a list of 8-bit images: (adversarial 8-bit images, steps each used)."""
    device = model.mean.device
    result = make_attack(method, model, **options)(to_tensor(images_u8, device), torch.tensor(labels, device=device))
    return to_uint8(result.adversarial), result.steps_used.tolist()


def goal_reached(prediction, goal, untargeted):
    """A prediction meets the goal: the target class, or (untargeted) anything but the class to leave."""
    return prediction != goal if untargeted else prediction == goal
