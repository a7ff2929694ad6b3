"""Step 7: break the defense. An attacker who knows about the JPEG step attacks *through* it.

    python step_7_break_defense.py IMAGE [--defense jpeg] [--target goldfish] [--epsilon 10] [--steps 100] [--eot 1]
                                         [--method pgd] [--norm Linf|L2|L1] [--model resnet18] [--output-dir outputs]
                                         [--precision fp32|bf16|fp16] [--no-figure]

The forward pass runs the real defense (the 8-bit image re-compressed, filtered, ...); the backward pass treats it as
the identity (BPDA, Athalye, Carlini and Wagner 2018, "Obfuscated Gradients Give a False Sense of Security"); with
--eot N each step averages N random draws of a randomized defense (Expectation over Transformation). Success is judged
only by the truth: the saved PNG read back from disk, put through the real defense, classified as the target.
Writes plain.png, adaptive.png and break_defense.png (the plain step-5 attack and the adaptive one, before and after
the defense, with their predictions; not with --no-figure). The experiment itself is utils.adaptive.break_defense, which the page calls too.
"""
import functools
from pathlib import Path

import torch

from step_2_pretrained import (attack_options, chosen_target, defense_settings, find_class, get_device, get_label,
                               predict_images, prepare_image, prepared_model)
from utils.adaptive import FILES, break_defense
from utils.attacks import budget_unit, perturbation_size
from utils.cli import ArgumentParser, UsageError, print_loss_every, run
from utils.defenses import describe
from utils.figures import defense_figure
from utils.files import remove_killed_writes_of, save_figure
from utils.flags import DEFAULT_EPSILON, add_break_defense_arguments, add_figure_argument, check_budget, resolve_threat
from utils.images import to_tensor
from utils.threat import UNITS, check_methods, size_text


def sizes(model, image, files, args):
    """"" in L-infinity (the line stays the tutorial's); in L2 or L1 each PNG's perturbation, read back, in the
    norm's units."""
    if args.norm == "Linf":
        return ""
    size = [perturbation_size(to_tensor([prepare_image(path, model)]), to_tensor([image]), args.norm).item()
            for path in files]
    return (f"; {args.norm} of the files: plain {size_text(size[0], args.norm)}, adaptive "
            f"{size_text(size[1], args.norm)}, budget {args.epsilon:g}")


def main(args):
    torch.manual_seed(args.seed)
    if args.untargeted:
        raise UsageError("step 7 is a targeted attack: drop --untargeted")
    args.norm, args.epsilon = resolve_threat(args.model, args.norm, args.epsilon, DEFAULT_EPSILON)
    check_methods([args.method], args.norm)
    settings = defense_settings(args)
    name = describe(args.defense, **settings)
    device = get_device(args.device)
    model = prepared_model(args, device, 1)
    target = find_class(chosen_target(args), model.classes)
    image = prepare_image(args.image, model)
    check_budget(args.epsilon, args.norm, (3, *image.shape[:2]))
    out = Path(args.output_dir)
    remove_killed_writes_of([out / name for name in (*FILES, "break_defense.png")])
    label = functools.partial(get_label, classes=model.classes)
    print(f"Target class: {label(target)}")
    budget = "" if args.norm == "Linf" else f" in {args.norm} ({UNITS[args.norm]})"
    print(f"Defense: {name}; attack: {args.method} through it (BPDA, EOT {args.eot}), epsilon {args.epsilon:g}{budget}")

    result = break_defense(model, image, target, args.method, attack_options(args), args.defense, settings,
                           out, eot=args.eot, on_adaptive_step=print_loss_every(10, model.classes))
    (plain_before, adaptive_before), (plain_after, new) = result.before, result.after
    print(f"Old prediction: {label(predict_images(model, [image])[0])}")
    print(f"New prediction: {label(new)}")
    print(f"Plain step-5 attack: {label(plain_before)} -> after the defense: {label(plain_after)}")
    print(f"Adaptive attack:     {label(adaptive_before)} -> after the defense: {label(new)} "
          f"({result.steps[1]} {budget_unit(args.method)}{sizes(model, image, result.files, args)})")
    rows = [("plain attack (step 5)", result.images[0], label(plain_before), result.defended[0], label(plain_after)),
            ("adaptive attack (step 7)", result.images[1], label(adaptive_before), result.defended[1], label(new))]
    if args.figure:
        save_figure(defense_figure(rows, name), out / "break_defense.png")
    if new != target:
        print(f"The adaptive attack did not get through: after the defense {result.files[1]} is {label(new)}; "
              f"try more --steps, a larger --epsilon or more --eot")
        return 1
    return 0


def get_args_parser():
    parser = ArgumentParser(description="Craft an adversarial image that survives a defense (BPDA + EOT).")
    parser.add_argument("image", help="path to the photo")
    add_break_defense_arguments(parser)
    add_figure_argument(parser, "break_defense.png (both attacks' images before and after the defense)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
