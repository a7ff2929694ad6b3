"""Attacking through a defense (step 7, step 8's --adaptive): the real defense in the forward pass, the identity in
the backward pass (BPDA, Athalye, Carlini and Wagner 2018, "Obfuscated Gradients Give a False Sense of Security")."""
import torch

from utils.images import to_tensor, to_uint8

JUDGE_SEED_OFFSET = 7919  # the judge's draws of a random defense are not the attacker's


class DefenseBPDA(torch.autograd.Function):
    """Forward: the real defense on each 8-bit image. Backward: the identity (Backward Pass Differentiable Approximation)."""

    @staticmethod
    def forward(ctx, pixels, defense):
        return to_tensor([defense(image) for image in to_uint8(pixels)], pixels.device)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def defended_forward(model, defense):
    """The model behind the defense, differentiable by BPDA."""
    return lambda pixels: model(DefenseBPDA.apply(pixels, defense))
