"""Step 7: break the defense. An attacker who knows about the JPEG step attacks *through* it.

    python step_7_break_defense.py IMAGE [--defense jpeg] [--target goldfish] [--epsilon 10] [--steps 100] [--eot 1]
                                         [--method pgd] [--model resnet18] [--output-dir outputs]
                                         [--precision fp32|bf16|fp16]

The forward pass runs the real defense (the 8-bit image re-compressed, filtered, ...); the backward pass treats it as
the identity (BPDA, Athalye, Carlini and Wagner 2018, "Obfuscated Gradients Give a False Sense of Security"); with
--eot N each step averages N random draws of a randomized defense (Expectation over Transformation). Success is judged
only by the truth: the saved PNG read back from disk, put through the real defense, classified as the target.
Writes adaptive.png and break_defense.png (the plain step-5 attack and the adaptive one, before and after the defense).
"""
import functools
from pathlib import Path

import torch

from step_2_pretrained import find_class, get_device, get_label, model_from_args, predict_images, prepare_image
from step_3_adversarial import read_back
from step_5_perturb import add_attack_arguments, add_common_arguments, attack_options, print_loss_every
from step_6_defend import add_defense_arguments, defense_settings
from utils import speed
from utils.adaptive import JUDGE_SEED_OFFSET, defended_forward
from utils.attacks import budget_unit, run_attack
from utils.cli import ArgumentParser, UsageError, number_in, run
from utils.defenses import describe, make_defense
from utils.figures import image_grid, short
from utils.files import save_figure, save_image

def attack_through(model, images_u8, labels, defense, args, adaptive, on_step=None):
    """Adversarial 8-bit images: through the defense (adaptive) or against the bare model (plain, as in step 5)."""
    options = attack_options(args, on_step=on_step)
    if adaptive:
        options.update(forward=defended_forward(model, defense), eot=args.eot)
    return run_attack(model, args.method, images_u8, labels, **options)


def figure(rows):
    """rows: (name, image before the defense, prediction, image after, prediction)."""
    panels = []
    for name, before, before_label, after, after_label in rows:
        panels += [(before, f"{name}\npredicted: {short(before_label)}"),
                   (after, f"{name} after the defense\npredicted: {short(after_label)}")]
    return image_grid(panels, columns=2)


def main(args):
    torch.manual_seed(args.seed)
    if args.untargeted:
        raise UsageError("step 7 is a targeted attack: drop --untargeted")
    settings = defense_settings(args)
    name = describe(args.defense, **settings)
    device = get_device(args.device)
    speed.check_precision(args.precision, device)
    model = speed.prepare_model(model_from_args(args, device), args, 1, device)
    target = find_class("1" if args.target is None else args.target, model.classes)
    image = prepare_image(args.image, model)
    label = functools.partial(get_label, classes=model.classes)
    attacker_defense = make_defense(args.defense, seed=args.seed, **settings)
    judge_defense = make_defense(args.defense, seed=args.seed + JUDGE_SEED_OFFSET, **settings)
    print(f"Target class: {label(target)}")
    print(f"Defense: {name}; attack: {args.method} through it (BPDA, EOT {args.eot}), epsilon {args.epsilon:g}")

    out = Path(args.output_dir)
    [plain], _ = attack_through(model, [image], [target], attacker_defense, args, adaptive=False)
    [adaptive], [steps] = attack_through(model, [image], [target], attacker_defense, args, adaptive=True,
                                         on_step=print_loss_every(10, model))
    plain_path = save_image(plain, out / "plain.png")
    adaptive_path = save_image(adaptive, out / "adaptive.png")

    old = predict_images(model, [image])[0]
    plain_before, adaptive_before = predict_images(model, [read_back(plain_path, model), read_back(adaptive_path, model)])
    defended = [judge_defense(read_back(path, model)) for path in (plain_path, adaptive_path)]  # the truth
    plain_after, new = predict_images(model, defended)
    print(f"Old prediction: {label(old)}")
    print(f"New prediction: {label(new)}")
    print(f"Plain step-5 attack: {label(plain_before)} -> after the defense: {label(plain_after)}")
    print(f"Adaptive attack:     {label(adaptive_before)} -> after the defense: {label(new)} ({steps} {budget_unit(args.method)})")
    rows = [("plain attack (step 5)", plain, label(plain_before), defended[0], label(plain_after)),
            ("adaptive attack (step 7)", adaptive, label(adaptive_before), defended[1], label(new))]
    save_figure(figure(rows), out / "break_defense.png")
    if new != target:
        print(f"The adaptive attack did not get through: after the defense {adaptive_path} is {label(new)}; "
              f"try more --steps, a larger --epsilon or more --eot")
        return 1
    return 0


def get_args_parser():
    parser = ArgumentParser(description="Craft an adversarial image that survives a defense (BPDA + EOT).")
    parser.add_argument("image", help="path to the photo")
    add_common_arguments(parser, steps=100)
    add_attack_arguments(parser)
    parser.set_defaults(method="pgd")
    speed.add_speed_arguments(parser, compile=False)
    add_defense_arguments(parser)
    parser.add_argument("--eot", type=number_in(1, 1000, int, name="--eot"), default=1,
                        help="random draws of the defense averaged per step (default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
