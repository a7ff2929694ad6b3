"""The tutorial's attack: SGD on a perturbation in the model's normalized units."""
import torch

from utils.attacks.base import Attack


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
