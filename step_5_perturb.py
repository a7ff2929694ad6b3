"""Step 5: learn a perturbation r, too small to see, that makes the model call the photo a goldfish.

    python step_5_perturb.py IMAGE [--target 1|goldfish] [--epsilon 10] [--steps 30]
                                   [--method sgd|fgsm|pgd|mifgsm|cw|apgd|apgd-t|square] [--loss ce|dlr]
                                   [--target-classes 9] [--queries N] [--model resnet18] [--seed 0]
                                   [--output-dir outputs] [--precision fp32|bf16|fp16]

One image: prints "Target class: ...", a "Loss: ... / Class: ..." line every 5 steps as the tutorial does (every 100
queries for square, which reports "Queries used" instead of "Steps used"), then "Old prediction" and "New prediction"
(on the saved PNG read back from disk), and writes adversarial_r.npy, adversarial.png and comparison.png into the
output dir. Several images or a folder: attacks them in batches (--batch-size) and writes NAME.png and NAME_r.npy per
input. Exit status 0 when every saved PNG is classified as the target (untargeted: as anything but its clean class), 1
when the attack did not get there.

The budget --epsilon is an L-infinity bound in pixel levels out of 255: the saved PNG differs from the resized and
cropped original by at most epsilon levels in every channel of every pixel.

Speed (utils/speed.py): the model runs in the memory format of a fixed rule (channels-last for 2-D convolutions on
CPU and CUDA; --memory-format overrides it), never chosen by a clock;
--precision bf16 (or fp16 on CUDA) computes the gradients under autocast, and a success still counts only when an fp32
forward of the 8-bit image confirms it.
"""
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from step_2_pretrained import (add_model_arguments, find_class, get_device, get_label, model_from_args, predict_images,
                               prepare_image, prepare_images, to_tensor)
from step_3_adversarial import perturbation_from_images, read_back
from utils import speed
from utils.attacks import ATTACKS, budget_unit, goal_reached, perturbation_size, run_attack
from utils.cli import ArgumentParser, UsageError, number_in, run
from utils.figures import comparison_figure
from utils.files import save_array, save_figure, save_image
from utils.images import list_images, output_names

def attack_options(args, **extra):
    """The attack's keyword arguments from the command line."""
    options = dict(epsilon=args.epsilon, steps=args.steps, alpha=args.alpha, targeted=not args.untargeted,
                   early_stop=not args.no_early_stop, random_start=args.random_start, restarts=args.restarts,
                   seed=args.seed, c=args.c, decay=args.decay, loss=args.loss, target_classes=args.target_classes,
                   queries=args.queries, precision=args.precision)
    options.update(extra)
    return options


def goal_labels(model, images, args):
    """What each image is attacked towards: the target class, or (untargeted) its own clean class to move away from."""
    if args.untargeted:
        return predict_images(model, images)
    return [find_class(args.target, model.classes)] * len(images)


def print_loss_every(period, model):
    def on_step(step, loss, logits):
        if step % period == 0:
            print(f"Loss: {loss.mean().item():.2f} / Class: {get_label(logits.argmax(dim=1)[0], model.classes)}", flush=True)
    return on_step


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


def describe_goal(model, image, args):
    if args.untargeted:
        return f"Untargeted: any class but {get_label(predict_images(model, image)[0], model.classes)}"
    return f"Target class: {get_label(find_class(args.target, model.classes), model.classes)}"


def attack_one(model, path, args):
    """The tutorial's story on one photo."""
    image = prepare_image(path, model)
    print(describe_goal(model, image, args))
    labels = goal_labels(model, [image], args)
    period = 100 if ATTACKS[args.method].gradient_free else 5  # a query is far cheaper than a gradient step
    [adversarial], [steps] = attack_images(model, [image], labels, args, on_step=print_loss_every(period, model))
    out = Path(args.output_dir)
    save_array(perturbation_from_images(adversarial, image, model), out / "adversarial_r.npy")
    saved = save_image(adversarial, out / "adversarial.png")
    old, new = predict_images(model, [image, read_back(saved, model)])
    old_label, new_label = get_label(old, model.classes), get_label(new, model.classes)
    save_figure(comparison_figure(image, adversarial, old_label, new_label), out / "comparison.png")
    linf, l2 = perturbation_size(to_tensor(adversarial), to_tensor(image))
    print(f"Old prediction: {old_label}")
    print(f"New prediction: {new_label}")
    print(f"{budget_unit(args.method).capitalize()} used: {steps} / L-inf: {linf.item():.0f} levels of 255 / L2: {l2.item():.3f}")
    if not goal_reached(new, labels[0], args.untargeted):
        print(f"The attack did not get there: {saved} is still classified as {new_label}; "
              f"try more --steps, a larger --epsilon or --method pgd")
        return 1
    return 0


def attack_many(model, paths, args):
    """Attack a set of photos in batches; one line per photo, judged on the PNG read back."""
    images = prepare_images(paths, model)
    labels = goal_labels(model, images, args)
    print(describe_goal(model, images[0], args) if not args.untargeted else "Untargeted: any class but each image's own")
    adversarial, steps_used = attack_images(model, images, labels, args)
    out, failures = Path(args.output_dir), 0
    for name, path, image, adv, label, steps in zip(output_names(paths), paths, images, adversarial, labels, steps_used):
        save_array(perturbation_from_images(adv, image, model), out / f"{name}_r.npy")
        saved = save_image(adv, out / f"{name}.png")
        old, new = predict_images(model, [image, read_back(saved, model)])
        ok = goal_reached(new, label, args.untargeted)
        failures += not ok
        linf = int(np.abs(adv.astype(int) - image.astype(int)).max())
        print(f"{path}: {get_label(old, model.classes)} -> {get_label(new, model.classes)} "
              f"({'fooled' if ok else 'NOT fooled'}, {steps} "
              f"{budget_unit(args.method)}, "
              f"L-inf {linf}) -> {saved}")
    print(f"Fooled {len(paths) - failures} of {len(paths)}")
    return 1 if failures else 0


def main(args):
    torch.manual_seed(args.seed)
    if args.untargeted and args.target is not None:
        raise UsageError("--target and --untargeted exclude each other")
    args.target = "1" if args.target is None else args.target
    device = get_device(args.device)
    speed.check_precision(args.precision, device)
    paths = list_images(args.images)
    model = speed.prepare_model(model_from_args(args, device), args, args.batch_size, device)
    if not args.untargeted:
        find_class(args.target, model.classes)  # an unknown target is reported before any work
    if len(paths) == 1 and not Path(args.images[0]).is_dir():
        return attack_one(model, paths[0], args)
    return attack_many(model, paths, args)


def add_attack_arguments(parser):
    """The attack flags shared by step 5, step 7 and step 8."""
    parser.add_argument("--method", choices=sorted(ATTACKS), default="sgd",
                        help="sgd is the tutorial's; fgsm, pgd, mifgsm, cw, apgd (Auto-PGD), apgd-t (targeted-DLR "
                             "APGD over the top other classes), square (score-based, no gradients) "
                             "(default: %(default)s)")
    parser.add_argument("--alpha", type=number_in(0, 255, low_open=True, name="--alpha"),
                        help="step size in levels (pgd: 2.5*epsilon/steps, mifgsm: epsilon/steps, both at least 0.25)")
    parser.add_argument("--loss", choices=["ce", "dlr"],
                        help="apgd: cross-entropy or Difference of Logits Ratio (default: ce)")
    parser.add_argument("--target-classes", type=number_in(1, 999, int, name="--target-classes"),
                        help="apgd-t, untargeted: how many of the top other classes it runs towards (default: 9)")
    parser.add_argument("--queries", type=number_in(1, 10**7, int, name="--queries"),
                        help="square: model queries per image, the first included (default: --steps)")
    parser.add_argument("--random-start", action="store_true", help="pgd: start at a random point of the ball")
    parser.add_argument("--restarts", type=number_in(1, 1000, int, name="--restarts"), default=1,
                        help="retry failed images from new random starts (default: %(default)s)")
    parser.add_argument("--c", type=number_in(0, 1e6, low_open=True, name="--c"), help="cw: weight of the misclassification term (default 1)")
    parser.add_argument("--decay", type=number_in(0, 1, name="--decay"), help="mifgsm: momentum decay (default 1.0)")
    parser.add_argument("--no-early-stop", action="store_true", help="run every step even after the image is fooled")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=16)


def add_common_arguments(parser, steps=30):
    parser.add_argument("--target", help="class index or name to reach, among the model's classes (default: 1, "
                                          "ImageNet's goldfish)")
    parser.add_argument("--untargeted", action="store_true", help="any class but the clean prediction")
    parser.add_argument("--epsilon", type=number_in(0, 255, low_open=True, name="--epsilon"), default=10,
                        help="L-infinity budget in pixel levels out of 255, in (0, 255] (default: %(default)s)")
    parser.add_argument("--steps", type=number_in(1, 100000, int, name="--steps"), default=steps,
                        help="gradient steps, >= 1 (default: %(default)s)")
    add_model_arguments(parser)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random starts and of Square's draws (default: %(default)s)")
    parser.add_argument("--output-dir", default="outputs")


def get_args_parser():
    parser = ArgumentParser(description="Learn an adversarial perturbation (the tutorial's step 5, and more attacks).")
    parser.add_argument("images", nargs="+", help="one photo (the tutorial's story), or several photos or folders")
    add_common_arguments(parser)
    add_attack_arguments(parser)
    speed.add_speed_arguments(parser, compile=False)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
