"""Step 9: adversarial training, the tutorial's missing chapter.

    python step_9_adversarial_training.py FOLDER [--labels FILE.csv] [--output outputs/robust/model.pt2]
                                         [--method pgd|fgsm-rs|noise|none|ibp|crown-ibp] [--norm Linf|L2] [--epsilon 32]
                                         [--steps 3] [--alpha LEVELS] [--sigma S]
                                         [--arch small-cnn|mlp] [--epochs 10] [--batch-size 64] [--lr 0.001]
                                         [--val-fraction 0.1] [--val-steps 10] [--image-size 32] [--seed 0]
                                         [--threads N] [--resume] [--keep-last]

Steps 6 and 7 showed that transforming the input (JPEG) only hides the gradient, and an attacker who knows the
transformation goes through it. Madry et al. 2018 ("Towards Deep Learning Models Resistant to Adversarial Attacks")
change the model instead: every training batch is replaced by its adversarial examples, so the network learns to
classify the worst image within epsilon of each training image.

Methods: `pgd` (Madry et al.: PGD with a random start, `--steps` sign steps of `--alpha` levels, by default
2.5 * epsilon / steps, the step size utils.attacks.PGD derives from the budget), `fgsm-rs` (Wong, Rice and Kolter
2020, "Fast is better than free": one FGSM step of 1.25 * epsilon from a uniform random start; about as cheap as
plain training), `ibp` and `crown-ibp` (certified training, Gowal et al. 2018 and Zhang et al. 2020: the loss
mixes the images' cross-entropy with that of the worst logits that interval bounds, and for crown-ibp CROWN's bound
on the margins from them, allow within epsilon; epsilon and the weights ramp over the first half of the epochs;
utils.certified_training's Ramp; held-out certified accuracy is printed after each epoch), `noise` (Gaussian data augmentation, as Cohen, Rosenfeld and Kolter 2019 train the base model of
randomized smoothing: every training batch gets N(0, sigma^2) noise, --sigma in [0, 1] pixel units, not clipped) or
`none` (plain training, the baseline). Epsilon is in levels out of 255, as everywhere else; the
attack sees the 8-bit image (utils.attacks), so the model trains on images a PNG can hold. With --norm L2 the
training attack and the validation PGD are PGD in L2 (normalized gradient steps, the exact projection onto the L2
ball and [0, 1]), and --epsilon and --alpha are in [0, 1] pixel units, the norm of the whole perturbation (PGD has no
L1 version: --norm L1 is refused). The checkpoint records the norm, so --resume refuses another.

Labels: an ImageFolder tree (FOLDER/<class>/image; class names are the subfolder names, in numeric order when they
are all numbers, else sorted) or --labels FILE.csv (columns image,label; the class names are the labels, sorted).
A held-out share (--val-fraction) is never trained on: clean accuracy and PGD accuracy (--val-steps steps at the
training epsilon) on it are printed after every epoch, with FGSM accuracy and the training images per second.

Catastrophic overfitting (Wong et al. 2020: fast adversarial training suddenly learns to mask its one-step attack,
held-out PGD accuracy collapsing while FGSM accuracy stays high) is watched for in fgsm-rs runs, detected at the end
of the epoch where it
happens and said in one line; the model written is then the epoch with the best held-out PGD accuracy (its weights
are kept in the checkpoint), unless --keep-last.

Writes OUTPUT (a torch.export program: 8-bit RGB scaled to [0, 1] in, logits out, normalization inside, any batch
size) and OUTPUT's classes file (NAME.classes.txt, one class name per line), which every step loads with
--model OUTPUT. A checkpoint (NAME.ckpt) is written after every epoch; --resume continues from it after a kill and
ends with the same bytes an uninterrupted run gives (same seed and --threads: the data order and the attacks' random
starts and noise are seeded per epoch and batch, not drawn from a shared stream).

This file is the training loop, main and the parser; the images and the split are utils/training_data.py's
(load_data), the architectures, the overfitting guard, the checkpoint and the checked export utils/training.py's;
certified training's loss utils/certified_training.py's.
"""
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from step_2_pretrained import Classifier, Preprocessing, get_device
from utils.attacks import make_attack
from utils.attacks import ATTACKS, NORMS
from utils.cli import ArgumentParser, UsageError, number_in, one_of, run
from utils.files import display_path, remove_killed_writes_of
from utils.flags import add_device_argument, add_threads_argument
from utils.models import classes_path
from utils.threat import check_epsilon
from utils.certified_training import CERTIFIED_METHODS, Ramp, certified_accuracy, certified_loss
from utils.training import (MLP, SMALL_CNN, best_epoch, build_net, catastrophic_overfitting, checkpoint_path, copy_state,
                            export_checked, resume_from, run_settings, save_epoch, watched_for_overfitting)
from utils.training_data import channel_statistics, load_data

METHODS = ("pgd", "fgsm-rs", "noise", "none") + CERTIFIED_METHODS
DEFAULT_EPSILON = 32.0  # levels out of 255, L-infinity
FGSM_RS_STEP = 1.25  # Wong et al. 2020: alpha = 1.25 epsilon from a uniform start in the ball


# ---- the model and the attack ---------------------------------------------------------------------------------

def make_model(data, args):
    """A fresh classifier (seeded initialization) normalizing by the training images' own statistics. Its memory
    format is fixed (no measuring which is faster: no clock may decide what a run computes)."""
    torch.manual_seed(args.seed)
    mean, std = channel_statistics(data.images[data.train])
    net = build_net(args.arch, len(data.classes), args.image_size)
    return Classifier(net, Preprocessing(args.image_size, mean, std), Path(args.output).stem,
                      memory_format=torch.contiguous_format)


def training_attack(model, args, seed):
    """The attack that makes a batch's training examples (None for plain training). Every sample runs all its steps
    (no early stop: the example should be the worst found, not the first misclassified one)."""
    if args.method in ("none", "noise") + CERTIFIED_METHODS:
        return None
    if args.method == "fgsm-rs":
        steps, alpha = 1, args.alpha or FGSM_RS_STEP * args.epsilon
    else:
        steps, alpha = args.steps, args.alpha
    return make_attack("pgd", model, epsilon=args.epsilon, steps=steps, alpha=alpha, targeted=False, early_stop=False,
                       random_start=True, seed=seed, norm=args.norm)


def batch_seed(args, epoch, index):
    """The seed of one batch's random start: a function of (seed, epoch, batch), so a resumed run draws the same."""
    return (args.seed * 1000 + epoch) * 100000 + index


def gaussian_noise(images, sigma, seed):
    """images + N(0, sigma^2) noise, drawn on the CPU from a generator seeded for this batch (the same draws on any
    device and after a resume), not clipped: Cohen et al. train on the noisy inputs the smoothed classifier sees."""
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return images + sigma * noise.to(images.device)


def as_pixels(images_u8):
    return images_u8.float().div(255)


# ---- one epoch ------------------------------------------------------------------------------------------------

def train_epoch(model, optimizer, data, epoch, args, device):
    """One pass over the training images in a seeded order; returns (mean loss, training images per second)."""
    shuffle = torch.Generator().manual_seed(args.seed * 1000 + epoch)
    order = data.train[torch.randperm(len(data.train), generator=shuffle)]
    batches = [order[start:start + args.batch_size] for start in range(0, len(order), args.batch_size)]
    started, total = time.perf_counter(), 0.0
    bar = tqdm(batches, desc=f"epoch {epoch}/{args.epochs}", unit="batch", leave=False, disable=None)
    for index, members in enumerate(bar):
        images, targets = as_pixels(data.images[members]).to(device), data.targets[members].to(device)
        attack = training_attack(model, args, batch_seed(args, epoch, index))
        if attack is not None:
            model.eval()
            images = attack(images, targets).adversarial
        elif args.method == "noise":
            images = gaussian_noise(images, args.sigma, batch_seed(args, epoch, index))
        model.train()
        if args.method in CERTIFIED_METHODS:
            ramp = Ramp.at(args.method, args.epsilon, (epoch - 1 + index / len(batches)) / ramp_epochs(args))
            loss = certified_loss(model, images, targets, ramp)
        else:
            loss = F.cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(members)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return total / len(order), len(order) / (time.perf_counter() - started)


def ramp_epochs(args):
    """Certified training ramps epsilon (and CROWN-IBP's weights) over the first half of the epochs."""
    return max(args.epochs / 2, 1)


@torch.no_grad()
def accuracy(model, images, targets):
    return (model(images).argmax(dim=1) == targets).float().mean().item()


def validate(model, data, args, device):
    """(clean accuracy, PGD accuracy, FGSM accuracy) on the held-out images: PGD with --val-steps steps and a random
    start at the training epsilon and norm, and in L-infinity FGSM (None each: nothing held out; FGSM's None in
    another norm)."""
    if len(data.val) == 0:
        return None, None, None
    model.eval()
    images, targets = as_pixels(data.images[data.val]).to(device), data.targets[data.val].to(device)
    attack = make_attack("pgd", model, epsilon=args.epsilon, steps=args.val_steps, targeted=False, random_start=True,
                         seed=args.seed, norm=args.norm)
    robust = 1 - attack(images, targets).success.float().mean().item()
    if args.norm != "Linf":  # FGSM, the overfitting guard's witness, is an L-infinity attack
        return accuracy(model, images, targets), robust, None
    fgsm = make_attack("fgsm", model, epsilon=args.epsilon, targeted=False, early_stop=False)
    return accuracy(model, images, targets), robust, 1 - fgsm(images, targets).success.float().mean().item()


def validate_certified(model, data, args, device):
    """Held-out certified accuracy at the training epsilon (CROWN-IBP's bound) for certified training, else None."""
    if args.method not in CERTIFIED_METHODS or len(data.val) == 0:
        return None
    model.eval()
    images, targets = as_pixels(data.images[data.val]).to(device), data.targets[data.val].to(device)
    return certified_accuracy(model, images, targets, args.epsilon)


# ---- main -----------------------------------------------------------------------------------------------------

def budget_text(norm, epsilon):
    """"32 levels" in L-infinity (the line every earlier run printed); "L2 1" in L2 and L1."""
    return f"{epsilon:g} levels" if norm == "Linf" else f"{norm} {epsilon:g}"


def report_epoch(row):
    val = "" if row["clean"] is None else \
        (f", held-out clean {row['clean']:.1%}, PGD-{row['val_steps']} at "
         f"{budget_text(row.get('norm', 'Linf'), row['epsilon'])} {row['robust']:.1%}")
    val += "" if row.get("fgsm") is None else f", FGSM {row['fgsm']:.1%}"
    val += "" if row.get("certified") is None else f", certified {row['certified']:.1%}"
    print(f"epoch {row['epoch']}: loss {row['loss']:.4f}, {row['images_per_second']:.0f} training images/s{val}",
          flush=True)


def check_threat(args):
    """The training budget in its norm, checked before anything is read or written: Linf levels in [0, 255] (the
    default 32), L2 and L1 an --epsilon given, at most the --image-size image's largest distance; the attack (PGD)
    must have the norm."""
    if args.epsilon is None:
        if args.norm != "Linf":
            raise UsageError(f"--norm {args.norm} needs --epsilon: the {args.norm} norm of the whole perturbation in "
                             "[0, 1] pixel units (e.g. 1.0 for the 32x32 digits in L2)")
        args.epsilon = DEFAULT_EPSILON
    if args.epsilon > 0:
        check_epsilon(args.epsilon, args.norm, (3, args.image_size, args.image_size))
    if args.method != "none" and args.norm not in ATTACKS["pgd"].norms:
        raise UsageError(f"--norm {args.norm}: the training attack, PGD, has no {args.norm} version (it has "
                         f"{', '.join(ATTACKS['pgd'].norms)})")
    if args.method in CERTIFIED_METHODS and args.norm != "Linf":
        raise UsageError(f"--method {args.method} trains against L-infinity bounds, not --norm {args.norm}")


def main(args):
    if Path(args.output).suffix != ".pt2":
        raise UsageError(f"--output {args.output}: the model is written as a torch.export program, name it NAME.pt2")
    if (args.method == "noise") != (args.sigma is not None):
        raise UsageError("--sigma goes with --method noise, and --method noise needs it (e.g. --sigma 0.25)")
    check_threat(args)
    checkpoint = checkpoint_path(args.output)
    remove_killed_writes_of([args.output, classes_path(args.output), checkpoint])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = get_device(args.device)
    data = load_data(args.folder, args.labels, args.image_size, args.val_fraction, args.seed, args.workers)
    model = make_model(data, args).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    settings = run_settings(vars(args))
    first, history, best = resume_from(model, optimizer, checkpoint, settings, args.resume)
    budget = f"sigma {args.sigma:g}" if args.method == "noise" else f"epsilon {budget_text(args.norm, args.epsilon)}"
    print(f"Training {args.arch} ({args.method}, {budget}) on {len(data.train)} images of "
          f"{len(data.classes)} classes, {len(data.val)} held out; {torch.get_num_threads()} thread(s), {device}")
    for epoch in range(first, args.epochs + 1):
        loss, speed = train_epoch(model, optimizer, data, epoch, args, device)
        clean, robust, fgsm = validate(model, data, args, device)
        history.append({"epoch": epoch, "loss": loss, "images_per_second": speed, "clean": clean, "robust": robust,
                        "fgsm": fgsm, "certified": validate_certified(model, data, args, device), "epsilon": args.epsilon, "norm": args.norm, "val_steps": args.val_steps,
                        "overfit": watched_for_overfitting(args.method)
                        and catastrophic_overfitting(history + [{"robust": robust, "fgsm": fgsm}])})
        report_epoch(history[-1])
        if best_epoch(history) == epoch:
            best = {"epoch": epoch, "model": copy_state(model)}
        if history[-1]["overfit"] and not any(row.get("overfit") for row in history[:-1]):  # said once
            print(f"epoch {epoch}: catastrophic overfitting (Wong et al. 2020): held-out PGD accuracy fell to "
                  f"{robust:.1%} while FGSM's is {fgsm:.1%}; the model written will be epoch {best['epoch']}'s, the "
                  f"best held-out PGD epoch (--keep-last writes the last)", flush=True)
        save_epoch(model, optimizer, epoch, history, settings, best, checkpoint)
    if any(row.get("overfit") for row in history) and not args.keep_last and best["epoch"] != history[-1]["epoch"]:
        model.load_state_dict(best["model"])
        kept = history[best["epoch"] - 1]["robust"]
        print(f"Writing epoch {best['epoch']}'s model (held-out PGD accuracy {kept:.1%}) instead of epoch "
              f"{history[-1]['epoch']}'s, after catastrophic overfitting")
    export_checked(model, args.output, data.classes, args.image_size, as_pixels(data.images[:16]).to(device))
    more = ", ..." if len(data.classes) > 10 else ""
    print(f"Wrote {display_path(args.output)} and {display_path(classes_path(args.output))} "
          f"({len(data.classes)} classes: {', '.join(data.classes[:10])}{more})")


def get_args_parser():
    parser = ArgumentParser(description="Train a classifier with adversarial training (PGD, FGSM with a random start) "
                                        "or plainly, and export it as a .pt2 program every step loads.")
    parser.add_argument("folder", help="an ImageFolder tree (one subfolder per class), or a folder with --labels")
    parser.add_argument("--labels", help="a CSV file with columns image,label (label: the class name)")
    parser.add_argument("--output", default="outputs/robust/model.pt2",
                        help="the .pt2 program to write; NAME.classes.txt and the checkpoint NAME.ckpt go beside it "
                             "(default: %(default)s)")
    parser.add_argument("--method", choices=METHODS, default="pgd", help="(default: %(default)s)")
    parser.add_argument("--epsilon", type=number_in(0, math.inf, name="--epsilon"), default=None,
                        help="the training budget: Linf in levels out of 255, in [0, 255]; L2 and L1 the norm of the "
                             f"whole perturbation in [0, 1] pixel units (default: {DEFAULT_EPSILON:g} levels in Linf)")
    parser.add_argument("--norm", type=one_of(NORMS, "norm"), default="Linf",
                        help="the threat model of the training attack and of the validation PGD (default: %(default)s)")
    parser.add_argument("--steps", type=number_in(1, 1000, int, name="--steps"), default=3,
                        help="PGD steps per training batch (pgd; fgsm-rs takes one) (default: %(default)s)")
    parser.add_argument("--alpha", type=number_in(0, 255, low_open=True, name="--alpha"), default=None,
                        help="the attack's step in levels (default: pgd 2.5 * epsilon / steps, fgsm-rs 1.25 * epsilon)")
    parser.add_argument("--sigma", type=number_in(0, 2, low_open=True, name="--sigma"), default=None,
                        help="noise: the Gaussian noise's standard deviation in [0, 1] pixel units (e.g. 0.25)")
    parser.add_argument("--arch", default=SMALL_CNN,
                        help=f"{SMALL_CNN}, {MLP} (fully connected, for step 10's exact verifier), a torchvision "
                             "classifier name or timm:NAME (default: %(default)s)")
    parser.add_argument("--epochs", type=number_in(1, 10000, int, name="--epochs"), default=10)
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=64)
    parser.add_argument("--lr", type=number_in(0, 10, low_open=True, name="--lr"), default=1e-3,
                        help="Adam's learning rate (default: %(default)s)")
    parser.add_argument("--val-fraction", type=number_in(0, 0.9, name="--val-fraction"), default=0.1,
                        help="share of the images held out for validation (default: %(default)s)")
    parser.add_argument("--val-steps", type=number_in(1, 1000, int, name="--val-steps"), default=10,
                        help="PGD steps of the per-epoch validation attack (default: %(default)s)")
    parser.add_argument("--image-size", type=number_in(8, 1024, int, name="--image-size"), default=32,
                        help="images are resized and centre-cropped to this square (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    add_threads_argument(parser, why="default: torch's; a resumed run needs the same number for the same bytes")
    parser.add_argument("--workers", type=number_in(0, 64, int, name="--workers"), default=0,
                        help="DataLoader processes decoding the images (default: %(default)s)")
    add_device_argument(parser)
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint beside --output")
    parser.add_argument("--keep-last", action="store_true",
                        help="write the last epoch's model even after catastrophic overfitting (default: the epoch "
                             "with the best held-out PGD accuracy)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
