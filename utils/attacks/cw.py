"""Carlini and Wagner's L2 attack, with the shared L-infinity cap."""
import torch

from utils.attacks.base import Attack, margin


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
