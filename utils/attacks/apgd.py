"""Auto-PGD and its targeted-DLR version APGD-T."""
import math

import torch

from utils.attacks import norms
from utils.attacks.base import Attack, OverTopTargets, dlr
from utils.attacks.rows import indicator, row_counts


def apgd_checkpoints(steps):
    """The steps where APGD may halve its step size: w_j = ceil(p_j * steps) with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06) (Croce and Hein 2020, section 3.2)."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(fraction * steps, 6)) for fraction in p[1:]})


class APGD(Attack):
    """Auto-PGD (Croce and Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks"), in L-infinity and L2: steepest-descent steps (the gradient's sign in L-infinity, the
    gradient normalized to unit L2 norm in L2) with momentum 0.75 and no step size to tune. The step
    starts at 2 * epsilon and is halved at the checkpoints `apgd_checkpoints` for each sample whose loss improved in
    fewer than `rho` (0.75) of the steps since the last checkpoint, or whose step was not halved at the last checkpoint
    and whose best loss has not improved since; a halving restarts that sample from its best point (with the
    gradient there).
    In L1 it is l1-APGD (Croce and Hein 2021, "Mind the box: l1-APGD for sparse adversarial attacks on image
    classifiers"), with AutoAttack's L1 settings: each step moves by eta in L1 along the signs of the gradient's
    largest coordinates (a share `topk` of them, first 0.2, or, from a given start as in each growing-epsilon stage,
    the start's sparsity / 1.5), spread evenly, then the exact projection onto the L1 ball intersected with [0, 1];
    no momentum; every max(1, int(0.04 * steps)) steps the share becomes the
    sparsity of the best point / 1.5 and, where that sparsity fell under 0.95 of the last check's, eta goes back to
    epsilon and the sample to its best point, elsewhere eta is divided by 1.5 (within [epsilon / 10, epsilon]).
    `growing_epsilon` (default on, for L1 only, at least 3 steps) runs 30% of the steps at 3 * epsilon from a
    Gaussian start, 30% at 2 * epsilon, each continuing from the best point of the last (its last iterate judged
    too), and the rest at epsilon: only the last stage's images count.
    Distance: `norm`, "Linf" (default), "L2" or "L1". Arguments: loss "ce" (cross-entropy, default) or "dlr"
    (Difference of Logits Ratio; targeted: the margin of the target over the strongest other class, divided as in
    `dlr`'s targeted version), growing_epsilon (bool, L1), plus the shared ones (alpha unused)."""
    name = "apgd"
    norms = ("Linf", "L2", "L1")
    momentum = 0.75  # the paper's alpha: the new step's weight; the previous move keeps 1 - alpha
    rho = 0.75

    def __init__(self, model, loss="ce", growing_epsilon=True, **kwargs):
        kwargs.update(alpha=None)
        super().__init__(model, **kwargs)
        self.growing_epsilon = bool(growing_epsilon) and self.norm == "L1" and self.steps >= 3
        self.from_start = False  # a growing-epsilon stage: the share and sparsity start from the start's sparsity
        if loss not in ("ce", "dlr"):
            raise ValueError(f"loss must be 'ce' or 'dlr', got {loss!r}")
        self.objective = loss
        self.checkpoints = set(apgd_checkpoints(self.steps))

    def default_alpha_levels(self):
        return 2 * self.levels

    def default_alpha(self):
        return (2.0 if self.norm == "L2" else 1.0) * self.eps

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
        if self.norm == "L1":
            return self.sparse_update(delta, grad, state, loss)
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
        z = self.project(norms.steepest(grad, self.norm).mul_(-state["eta"]).add_(delta), self.original)
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


    # -- L1 (Croce and Hein 2021) --------------------------------------------------------------------------------
    def track_best(self, delta, grad, state, loss):
        better = loss < state["best_loss"]
        state["best_loss"] = torch.where(better, loss, state["best_loss"])
        state["best_delta"] = torch.where(better.view(-1, 1, 1, 1), delta, state["best_delta"])
        if grad is not None:
            state["best_grad"] = torch.where(better.view(-1, 1, 1, 1), grad, state["best_grad"])

    def conclude(self, delta, loss, state):
        """A growing-epsilon stage's last iterate counts for its best point, the next stage's start: the reference
        judges each stage's n steps' n iterates, the last included (its best gradient is not needed: the next stage
        starts afresh)."""
        if self.norm == "L1" and state.get("step"):
            self.track_best(delta, None, state, loss)

    def sparse_update(self, delta, grad, state, loss):
        step = state["step"]
        state["step"] += 1
        features = delta[0].numel()
        if step == 0:
            sparsity = nonzero_counts(delta)
            state.update(eta=torch.full_like(loss, self.alpha).view(-1, 1, 1, 1), best_loss=loss, best_delta=delta,
                         best_grad=grad, every=max(int(0.04 * self.steps), 1),
                         share=sparsity / features / 1.5 if self.from_start else torch.full_like(sparsity, 0.2),
                         last_sparsity=sparsity if self.from_start else torch.full_like(sparsity, features))
        else:
            self.track_best(delta, grad, state, loss)
            if step % state["every"] == 0:
                delta, grad = self.sparse_checkpoint(delta, grad, state)
        # keep the coordinates at or above the (1 - share) quantile of |grad|, AutoAttack's rule
        magnitude = grad.abs().flatten(1)
        rank = ((1 - state["share"]) * features).clamp(0, features - 1).long()
        threshold = quantile_values(magnitude, rank).view(-1, 1)
        # projection.room_towards: why not torch.where; indicator: why not a bool mask
        signs = grad.flatten(1).sign().mul_(indicator(torch.ge, magnitude, threshold))
        spread = signs / signs.abs().sum(dim=1, keepdim=True).clamp_min(1e-10)
        return delta - state["eta"] * spread.view_as(delta)

    def sparse_checkpoint(self, delta, grad, state):
        sparsity = nonzero_counts(state["best_delta"])
        reset = sparsity / state["last_sparsity"] < 0.95
        state["share"] = sparsity / delta[0].numel() / 1.5
        eta = torch.where(reset.view(-1, 1, 1, 1), torch.full_like(state["eta"], self.alpha), state["eta"] / 1.5)
        state["eta"] = eta.clamp(self.alpha / 10, self.alpha)
        state["last_sparsity"] = sparsity
        back = reset.view(-1, 1, 1, 1)
        return torch.where(back, state["best_delta"], delta), torch.where(back, state["best_grad"], grad)

    def run(self, original, labels, restart, ids, start=None):
        if not self.growing_epsilon or start is not None:
            return super().run(original, labels, restart, ids, start)
        epsilon, steps, early_stop = self.eps, self.steps, self.early_stop
        stages = [math.ceil(0.3 * steps), math.ceil(0.3 * steps)]
        generator = torch.Generator().manual_seed(self.seed * 1000 + restart)
        delta = torch.randn(original.shape[1:], generator=generator).to(original.device).expand_as(original)
        try:
            self.early_stop = False  # a success beyond the budget is no success: these stages only find a start
            # every stage, the first too, starts from a given point, as the reference's do (x_init, its Gaussian start
            # first): its share of coordinates and last sparsity come from that point's sparsity, not 0.2 and all
            self.from_start = True
            for factor, count in zip((3, 2), stages):
                self.set_budget(factor * epsilon, count)
                super().run(original, labels, restart, ids, start=delta, final=False)
                delta = self.state["best_delta"]
            self.early_stop = early_stop
            self.set_budget(epsilon, steps - sum(stages))
            result = super().run(original, labels, restart, ids, start=delta)
        finally:
            self.set_budget(epsilon, steps)
            self.early_stop, self.from_start = early_stop, False
        result.steps_used += sum(stages)
        return result

    def set_budget(self, epsilon, steps):
        self.eps, self.levels, self.steps, self.alpha = epsilon, epsilon * 255, steps, epsilon


def nonzero_counts(delta):
    """Per sample, how many coordinates of `delta` are not 0, exactly, as float64 (indicator: why not a bool
    tensor's sum)."""
    return row_counts(torch.ne, delta.flatten(1), 0)


def quantile_values(values, rank):
    """Per row, the value at 0-based position rank[row] of the row sorted ascending (a selection, no sort): where
    every row wants one of its few largest values (l1-APGD once its share is the sparsity of its best point), all of
    them read off one partial sort of every row; else one kthvalue per distinct rank, over the rows that share it."""
    width = values.shape[1]
    largest = width - rank  # the value wanted is the row's largest-th largest
    most = int(largest.max())
    if most <= max(256, width // 64):
        return values.topk(most, dim=1).values.gather(1, (largest - 1).view(-1, 1)).view(-1)
    result = torch.empty(len(values), dtype=values.dtype, device=values.device)
    for position in rank.unique().tolist():
        rows = (rank == position).nonzero().view(-1)
        result[rows] = values[rows].kthvalue(position + 1, dim=1).values
    return result


class APGDT(OverTopTargets, APGD):
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
