"""Projected Gradient Descent."""
from utils.attacks import norms
from utils.attacks.base import Attack


class PGD(Attack):
    """Projected Gradient Descent (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
    Attacks"; targeted as in Kurakin et al. 2017): sign-gradient steps of `alpha` levels (default 2.5 * epsilon /
    steps, at least MIN_STEP_LEVELS), projected onto the ball, with optional `random_start` and `restarts`.
    Distance: L-infinity."""
    name = "pgd"

    def update(self, delta, grad, state, loss=None):
        return grad.sign().mul_(-self.alpha).add_(delta)  # delta - alpha * sign(grad), one allocation
