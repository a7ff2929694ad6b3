"""Projected Gradient Descent, in L-infinity and in L2."""
from utils.attacks import norms
from utils.attacks.base import Attack


class PGD(Attack):
    """Projected Gradient Descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
    Attacks"; targeted as in Kurakin et al. 2017), with optional `random_start` and `restarts`.
    L-infinity: sign-gradient steps of `alpha` levels (default 2.5 * epsilon / steps, at least MIN_STEP_LEVELS).
    L2: steps of `alpha` ([0, 1] units, default 2.5 * epsilon / steps) along the gradient normalized to unit L2 norm,
    each followed by the exact projection onto the L2 ball intersected with [0, 1]; a random start is uniform in
    direction at radius epsilon.
    Distance: `norm`, "Linf" (default) or "L2"."""
    name = "pgd"
    norms = ("Linf", "L2")

    def update(self, delta, grad, state, loss=None):
        if self.norm == "Linf":
            return grad.sign().mul_(-self.alpha).add_(delta)  # delta - alpha * sign(grad), one allocation
        return delta - self.alpha * norms.steepest(grad, self.norm)
