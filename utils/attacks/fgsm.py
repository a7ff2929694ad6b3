"""Fast Gradient Sign Method: one sign step of epsilon."""
from utils.attacks.base import Attack


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
