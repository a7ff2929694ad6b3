"""Attacking through a defense (step 7, the page, step 8's --adaptive): the real defense in the forward pass, the
identity in the backward pass (BPDA, Athalye, Carlini and Wagner 2018, "Obfuscated Gradients Give a False Sense of
Security"), with EOT's average over random draws of a randomized defense; and `break_defense`, step 7's whole
experiment as one function, judged on the files it writes."""
from dataclasses import dataclass
from pathlib import Path

import torch

from utils.attacks import run_attack
from utils.defenses import make_defense
from utils.files import save_image
from utils.images import to_tensor, to_uint8
from utils.models import predict_images, prepare_image

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


def attack_through(model, images_u8, labels, method, options, defense=None, eot=1):
    """Adversarial 8-bit images and the steps each used: through `defense` (BPDA, `eot` draws per step), or against
    the bare model (defense None, as in step 5). `options`: utils.attacks.make_attack's keyword arguments."""
    if defense is not None:
        options = dict(options, forward=defended_forward(model, defense), eot=eot)
    return run_attack(model, method, images_u8, labels, **options)


@dataclass
class DefenseBreak:
    """Step 7's results for one photo, all judged on the PNGs written and read back: `images` (plain, adaptive) as
    written, `files` their paths, `steps` each used, `before` their predictions, `defended` the files through the
    judge's draw of the defense, and `after` its predictions."""
    images: tuple
    files: tuple
    steps: tuple
    before: tuple
    defended: tuple
    after: tuple


FILES = ("plain.png", "adaptive.png")  # break_defense's two files: the plain attack's and the adaptive one's


def break_defense(model, image_u8, target, method, options, defense, parameters, out, eot=1, on_plain_step=None,
                  on_adaptive_step=None, names=FILES):
    """The plain attack (step 5's, blind to the defense) and the adaptive one (through it) towards `target` on one
    8-bit photo, written as out/plain.png and out/adaptive.png and judged as a recipient would: each file read back,
    then through the real defense (`defense` with `parameters`) drawn with the judge's own seed, options["seed"] +
    JUDGE_SEED_OFFSET, so a randomized defense is not judged on the draws the attacker saw."""
    seed = options.get("seed", 0)
    attacker = make_defense(defense, seed=seed, **parameters)
    judge = make_defense(defense, seed=seed + JUDGE_SEED_OFFSET, **parameters)
    [plain], [plain_steps] = attack_through(model, [image_u8], [target], method, dict(options, on_step=on_plain_step))
    [adaptive], [adaptive_steps] = attack_through(model, [image_u8], [target], method,
                                                  dict(options, on_step=on_adaptive_step), attacker, eot)
    files = tuple(save_image(picture, Path(out) / name) for picture, name in zip((plain, adaptive), names))
    received = [prepare_image(path, model) for path in files]
    defended = tuple(judge(picture) for picture in received)
    before, after = predict_images(model, received), predict_images(model, list(defended))
    return DefenseBreak((plain, adaptive), files, (plain_steps, adaptive_steps), tuple(before), defended, tuple(after))
