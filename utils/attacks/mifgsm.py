"""Momentum Iterative FGSM."""
import torch

from utils.attacks.base import Attack


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
