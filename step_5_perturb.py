"""Step 5: learn a perturbation r, too small to see, that makes the model call the photo a goldfish.

    python step_5_perturb.py IMAGE [--target 1|goldfish] [--epsilon 10] [--steps 30]
                                   [--method sgd|fgsm|pgd|mifgsm|cw|apgd|apgd-t|square] [--loss ce|dlr]
                                   [--target-classes 9] [--queries N] [--model resnet18] [--seed 0]
                                   [--norm Linf|L2|L1]
                                   [--output-dir outputs] [--precision fp32|bf16|fp16] [--no-figure]

One image: prints "Target class: ...", a "Loss: ... / Class: ..." line every 5 steps as the tutorial does (every 100
queries for square, which reports "Queries used" instead of "Steps used"), then "Old prediction" and "New prediction"
(on the saved PNG read back from disk), and writes adversarial_r.npy, adversarial.png and comparison.png (the
original, the adversarial image and the perturbation magnified, with both predictions; not with --no-figure) into the
output dir. Several images or a folder: attacks them in batches (--batch-size) and writes NAME.png and NAME_r.npy per
input. Exit status 0 when every saved PNG is classified as the target (untargeted: as anything but its clean class), 1
when the attack did not get there.

The budget --epsilon is, by default (--norm Linf), an L-infinity bound in pixel levels out of 255: the saved PNG
differs from the resized and cropped original by at most epsilon levels in every channel of every pixel. With
--norm L2 or L1 it bounds the L2 or L1 norm of the PNG's whole perturbation in [0, 1] pixel units (AutoAttack's
convention; at most the image's largest distance), and the output lines give that size too. A robustbench: model
named with its threat model defaults to that norm and RobustBench's epsilon, and says so.

Speed (utils/speed/): the model runs in the memory format of a fixed rule (channels-last for 2-D convolutions on
CPU and CUDA; --memory-format overrides it), never chosen by a clock;
--precision bf16 (or fp16 on CUDA) computes the gradients under autocast, and a success still counts only when an fp32
forward of the 8-bit image confirms it.
"""
from pathlib import Path

import torch
from tqdm import tqdm

from step_2_pretrained import (attack_options, chosen_target, find_class, get_device, get_label, predict_images,
                               prepare_image, prepare_images, prepared_model, to_tensor)
from step_3_adversarial import get_adversarial_example
from utils.attacks import ATTACKS, budget_unit, goal_reached, perturbation_size, run_attack
from utils.cli import ArgumentParser, print_loss_every, run
from utils.figures import comparison_figure
from utils.files import remove_killed_writes_of, save_array, save_figure, save_image
from utils.flags import (DEFAULT_EPSILON, add_attack_arguments, add_common_arguments, add_figure_argument,
                         add_speed_arguments, check_budget, resolve_threat)
from utils.threat import check_methods, size_text
from utils.images import list_images, output_names
from utils.perturbations import perturbation_from_images

def goal_labels(model, images, args):
    """What each image is attacked towards: the target class, or (untargeted) its own clean class to move away from."""
    if args.untargeted:
        return predict_images(model, images)
    return [find_class(args.target, model.classes)] * len(images)


def attack_images(model, images, labels, args, on_step=None):
    """Attack 8-bit images in batches; returns (adversarial 8-bit images, steps used). Each image's position in the
    list is its id, so an attack that draws per image (Square) gives it the same whatever --batch-size."""
    adversarial, steps_used = [], []
    batches = range(0, len(images), args.batch_size)
    for start in tqdm(batches, desc=f"{args.method} attack", unit="batch", disable=len(batches) < 2):
        stop = min(start + args.batch_size, len(images))
        batch_adversarial, batch_steps = run_attack(model, args.method, images[start:stop], labels[start:stop],
                                                    ids=range(start, stop), **attack_options(args, on_step=on_step))
        adversarial += batch_adversarial
        steps_used += batch_steps
    return adversarial, steps_used


def save_learned(model, image, adversarial, png, npy):
    """Write the learned r (the tutorial's format) and the PNG that step 3's x + r makes of it, the adversarial
    image itself: r is (adversarial - x) / std, so x + r lands back on the same levels."""
    r = perturbation_from_images(adversarial, image, model)
    save_array(r, npy)
    return save_image(get_adversarial_example(image, r, model), png)


def describe_goal(model, image, args):
    if args.untargeted:
        return f"Untargeted: any class but {get_label(predict_images(model, image)[0], model.classes)}"
    return f"Target class: {get_label(find_class(args.target, model.classes), model.classes)}"


def attack_one(model, path, args):
    """The tutorial's story on one photo."""
    image = prepare_image(path, model)
    check_budget(args.epsilon, args.norm, (3, *image.shape[:2]))
    print(describe_goal(model, image, args))
    labels = goal_labels(model, [image], args)
    period = 100 if ATTACKS[args.method].gradient_free else 5  # a query is far cheaper than a gradient step
    [adversarial], [steps] = attack_images(model, [image], labels, args, on_step=print_loss_every(period, model.classes))
    out = Path(args.output_dir)
    saved = save_learned(model, image, adversarial, out / "adversarial.png", out / "adversarial_r.npy")
    old, new = predict_images(model, [image, prepare_image(saved, model)])  # the file, read back
    old_label, new_label = get_label(old, model.classes), get_label(new, model.classes)
    if args.figure:
        save_figure(comparison_figure(image, adversarial, old_label, new_label), out / "comparison.png")
    linf, l2 = perturbation_size(to_tensor(adversarial), to_tensor(image))
    print(f"Old prediction: {old_label}")
    print(f"New prediction: {new_label}")
    print(f"{budget_unit(args.method).capitalize()} used: {steps} / L-inf: {size_text(linf.item(), 'Linf')} levels "
          f"of 255 / L2: {size_text(l2.item(), 'L2')}" + norm_size(adversarial, image, args))
    if not goal_reached(new, labels[0], args.untargeted):
        print(f"The attack did not get there: {saved} is still classified as {new_label}; "
              f"try more --steps, a larger --epsilon or --method pgd")
        return 1
    return 0


def norm_size(adversarial, image, args):
    """"" in L-infinity (its size is already on the line); in L2 the budget beside the L2 size; in L1 the PNG's
    perturbation in the norm's [0, 1] units and the budget."""
    if args.norm == "Linf":
        return ""
    if args.norm == "L2":  # already on the line: only the budget
        return f" of {args.epsilon:g}"
    size = perturbation_size(to_tensor(adversarial), to_tensor(image), args.norm).item()
    return f" / {args.norm}: {size_text(size, args.norm)} of {args.epsilon:g}"


def attack_many(model, paths, args):
    """Attack a set of photos in batches; one line per photo, judged on the PNG read back."""
    images = prepare_images(paths, model)
    for image in images:
        check_budget(args.epsilon, args.norm, (3, *image.shape[:2]))
    labels = goal_labels(model, images, args)
    print(describe_goal(model, images[0], args) if not args.untargeted else "Untargeted: any class but each image's own")
    adversarial, steps_used = attack_images(model, images, labels, args)
    out, failures = Path(args.output_dir), 0
    for name, path, image, adv, label, steps in zip(output_names(paths), paths, images, adversarial, labels, steps_used):
        saved = save_learned(model, image, adv, out / f"{name}.png", out / f"{name}_r.npy")
        old, new = predict_images(model, [image, prepare_image(saved, model)])  # the file, read back
        ok = goal_reached(new, label, args.untargeted)
        failures += not ok
        size = size_text(perturbation_size(to_tensor(adv), to_tensor(image), args.norm).item(), args.norm)
        size = f"L-inf {size}" if args.norm == "Linf" else f"{args.norm} {size} of {args.epsilon:g}"
        print(f"{path}: {get_label(old, model.classes)} -> {get_label(new, model.classes)} "
              f"({'fooled' if ok else 'NOT fooled'}, {steps} "
              f"{budget_unit(args.method)}, "
              f"{size}) -> {saved}")
    print(f"Fooled {len(paths) - failures} of {len(paths)}")
    return 1 if failures else 0


def main(args):
    torch.manual_seed(args.seed)
    args.target = chosen_target(args)
    args.norm, args.epsilon = resolve_threat(args.model, args.norm, args.epsilon, DEFAULT_EPSILON)
    check_methods([args.method], args.norm)
    device = get_device(args.device)
    paths = list_images(args.images)
    model = prepared_model(args, device, args.batch_size)
    if not args.untargeted:
        find_class(args.target, model.classes)  # an unknown target is reported before any work
    one = len(paths) == 1 and not Path(args.images[0]).is_dir()
    remove_killed_writes_of(output_files(paths, one, Path(args.output_dir)))
    return attack_one(model, paths[0], args) if one else attack_many(model, paths, args)


def output_files(paths, one, out):
    """What the run writes: the tutorial's three files for one photo, each photo's PNG and r for several."""
    if one:
        return [out / "adversarial.png", out / "adversarial_r.npy", out / "comparison.png"]
    return [out / f"{name}{end}" for name in output_names(paths) for end in (".png", "_r.npy")]


def get_args_parser():
    parser = ArgumentParser(description="Learn an adversarial perturbation (the tutorial's step 5, and more attacks).")
    parser.add_argument("images", nargs="+", help="one photo (the tutorial's story), or several photos or folders")
    add_common_arguments(parser)
    add_attack_arguments(parser)
    add_speed_arguments(parser, compile=False)
    add_figure_argument(parser, "comparison.png (one photo: original, adversarial, the perturbation magnified)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
