"""The command-line flags the scripts share, declared once: the model, the device, the goal (--target or
--untargeted), the attack, the defense, and the speed settings. A script adds the groups it needs; its own flags stay
in its parser. Nothing here reads a parsed Namespace: the chapters turn their flags into the library's explicit
parameters (step_2_pretrained.py: model_from_args, chosen_target, attack_options, defense_settings,
prepared_model)."""
import argparse
import math

from utils import speed, threat
from utils.attacks import ATTACKS, NORMS
from utils.cli import UsageError, number_in, one_of
from utils.defenses import DEFENSES
from utils.models import DEFAULT_TARGET, OFFLINE_MODEL
from utils.models.load import DEFAULT_MODEL


# ---- the step's figure ----------------------------------------------------------------------------------------

def add_figure_argument(parser, figure):
    """--no-figure: the step skips its picture (`figure`, the file's name and what it shows, for the help)."""
    parser.add_argument("--no-figure", dest="figure", action="store_false",
                        help=f"do not draw the figure {figure} (drawn by default)")


# ---- the model and the device ---------------------------------------------------------------------------------

def add_model_arguments(parser, default=DEFAULT_MODEL):
    """--model, --classes and --input-size: the same in every script."""
    parser.add_argument("--model", default=default,
                        help=f"a torchvision ImageNet classifier name, {OFFLINE_MODEL} (works offline), a model file "
                             "(.pt2 torch.export program or .pt TorchScript), timm:NAME or "
                             "robustbench:DATASET/THREAT/NAME (default: %(default)s)")
    parser.add_argument("--classes", help="a text file of the model's class names, one per line (default: a model "
                                          "file's NAME.classes.txt beside it, else the model's own)")
    parser.add_argument("--input-size", type=number_in(8, 4096, int, name="--input-size"),
                        help="short side resized to N, centre crop N (default: the model's own; a model file: the "
                             "image as it is)")


def add_threads_argument(parser, default=None, why="default: torch's own choice"):
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=default,
                        help=f"torch CPU threads ({why})")


def add_labels_argument(parser):
    """--labels as steps 8 and 10 read them (utils.data.read_labels)."""
    parser.add_argument("--labels", help="true labels: imagenet-val (ILSVRC2012_val_NNNNNNNN.JPEG names) or a CSV "
                                         "file with columns image,label (index, WordNet ID or class name); "
                                         "default: the ImageFolder subfolders if any")


def add_photos_arguments(parser):
    """The photos an evaluation reads and the model it judges them with (steps 8 and 10): FOLDER, the model flags and
    --labels."""
    parser.add_argument("folder", help="a folder of photos, or an ImageFolder tree (one subfolder per class)")
    add_model_arguments(parser)
    add_labels_argument(parser)


def add_benchmark_arguments(parser, model, epsilon):
    """A benchmark on a labelled test folder (the digits): --model, --folder, --epsilon (L-infinity levels; None: the
    benchmark declares its own budgets) and --threads (one by default: steadier timings on a shared machine)."""
    parser.add_argument("--model", default=model, help="(default: %(default)s)")
    parser.add_argument("--folder", default="digits/test", help="an ImageFolder of test images (default: %(default)s)")
    if epsilon is not None:
        parser.add_argument("--epsilon", type=number_in(0, 255, low_open=True, name="--epsilon"), default=epsilon,
                            help="L-infinity budget in levels (default: %(default)s)")
    add_threads_argument(parser, default=1, why="default: %(default)s")


BENCHMARK_EPSILONS = {"Linf": 32.0, "L2": 2.0, "L1": 12.0}  # a benchmark's budget per norm on the digits


def norm_budgets(norms, epsilons):
    """(norm, epsilon) pairs of a benchmark's --norm and --epsilons: one budget per norm (None: BENCHMARK_EPSILONS),
    or any number of budgets for one norm; each checked as a budget of its norm."""
    epsilons = epsilons or [BENCHMARK_EPSILONS[norm] for norm in norms]
    if len(norms) == 1:  # one norm: a row per budget
        norms = norms * len(epsilons)
    if len(epsilons) != len(norms):
        raise UsageError(f"--epsilons gives {len(epsilons)} budgets for {len(norms)} norms (one per norm, or any "
                         "number for one norm)")
    for norm, epsilon in zip(norms, epsilons):
        threat.check_epsilon(epsilon, norm, name="--epsilons")
    return list(zip(norms, epsilons))


def add_device_argument(parser):
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when PyTorch sees a device, else the CPU (default: %(default)s)")


# ---- the goal -------------------------------------------------------------------------------------------------

def add_target_arguments(parser, target_help=None):
    parser.add_argument("--target", help=target_help or "class index or name to reach, among the model's classes "
                                                        f"(default: {DEFAULT_TARGET}, ImageNet's goldfish)")
    parser.add_argument("--untargeted", action="store_true", help="any class but the clean prediction")


# ---- the attack -----------------------------------------------------------------------------------------------

DEFAULT_EPSILON = 10.0  # levels out of 255, L-infinity: the tutorial's budget


def positive_number(name):
    """An argparse type: a finite number > 0 (its range for the norm is checked once the norm is known)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}")
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text}")
        return value
    parse.__name__ = name
    return parse


def add_norm_argument(parser):
    """--norm: the threat model the budget is measured in (default: a RobustBench model's own, else Linf)."""
    parser.add_argument("--norm", type=one_of(NORMS, "norm"), default=None,
                        help="threat model: Linf (epsilon in levels out of 255), L2 or L1 (epsilon the norm of the "
                             "whole perturbation in [0, 1] pixel units, as AutoAttack and RobustBench give it) "
                             "(default: a robustbench: model's own threat model, else Linf)")


def resolve_threat(model, norm, budget, default, flag="--epsilon"):
    """(norm, budget) from --norm (`norm`, None if not given), the budget given (`budget`: --epsilon's one number or
    --epsilons' list, None if not given) and a RobustBench `model`'s threat model (utils.threat.resolve), printing
    the one line that says when the model's defaults were taken; `default` is the L-infinity budget when none is
    given. The budget comes back as it was given: one number for --epsilon, a list for --epsilons."""
    single = flag == "--epsilon"
    given = None if budget is None else ([budget] if single else list(budget))
    norm, epsilons, note = threat.resolve(model, norm, given, [default] if single else list(default), flag)
    if note:
        print(note, flush=True)
    return norm, epsilons[0] if single else epsilons


def check_budget(budget, norm, shape, flag="--epsilon"):
    """The budget (one number or a list) within the largest distance an image of `shape` (C, H, W) can take in
    `norm`."""
    for value in budget if isinstance(budget, list) else [budget]:
        threat.check_epsilon(value, norm, tuple(shape), flag)


def add_common_arguments(parser, steps=30):
    """The flags of an attack on photos (steps 5 and 7): the goal, the budget and its norm, the model, the device,
    the seed and the output folder."""
    add_target_arguments(parser)
    parser.add_argument("--epsilon", type=positive_number("--epsilon"), default=None,
                        help="the budget: Linf in pixel levels out of 255, in (0, 255]; L2 and L1 the norm of the "
                             "whole perturbation in [0, 1] units, at most the image's largest distance "
                             f"(default: {DEFAULT_EPSILON:g} levels in Linf; a robustbench: model's own)")
    add_norm_argument(parser)
    parser.add_argument("--steps", type=number_in(1, 100000, int, name="--steps"), default=steps,
                        help="gradient steps, >= 1 (default: %(default)s)")
    add_model_arguments(parser)
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of random starts and of Square's draws (default: %(default)s)")
    parser.add_argument("--output-dir", default="outputs")


def add_attack_arguments(parser):
    """The attack flags shared by step 5, step 7 and the page."""
    parser.add_argument("--method", choices=sorted(ATTACKS), default="sgd",
                        help="sgd is the tutorial's; fgsm, pgd, mifgsm, cw, apgd (Auto-PGD), apgd-t (targeted-DLR "
                             "APGD over the top other classes), square (score-based, no gradients) "
                             "(default: %(default)s)")
    parser.add_argument("--alpha", type=number_in(0, 255, low_open=True, name="--alpha"),
                        help="step size: levels in Linf, [0, 1] units in L2 (pgd: 2.5*epsilon/steps, mifgsm: epsilon/steps, in Linf "
                             "at least 0.25 levels)")
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


# ---- the defense ----------------------------------------------------------------------------------------------

def add_defense_arguments(parser):
    """The defense flags shared by step 6, step 7 and the page."""
    parser.add_argument("--defense", default="jpeg", help=f"one of {', '.join(DEFENSES)} (default: %(default)s)")
    parser.add_argument("--quality", type=float, help="jpeg: quality 1..100 (default 75)")
    parser.add_argument("--bits", type=float, help="bits: bits per channel 1..8 (default 3)")
    parser.add_argument("--size", type=float, help="median: odd window size 3..15 (default 3)")
    parser.add_argument("--sigma", type=float, help="blur: Gaussian sigma in pixels, (0, 10] (default 1.0)")
    parser.add_argument("--scale", type=float, help="resize: down-scale factor, (0, 1] (default 0.5)")


def add_break_defense_arguments(parser):
    """Step 7's flags (an attack through a defense), which the page parses too: the same defaults and checks."""
    add_common_arguments(parser, steps=100)
    add_attack_arguments(parser)
    parser.set_defaults(method="pgd")
    add_speed_arguments(parser, compile=False)
    add_defense_arguments(parser)
    parser.add_argument("--eot", type=number_in(1, 1000, int, name="--eot"), default=1,
                        help="random draws of the defense averaged per step (default: %(default)s)")


# ---- speed ----------------------------------------------------------------------------------------------------

def add_speed_arguments(parser, compile=True):
    """--precision (steps 5, 7, 8, the benchmark), --memory-format, and --compile for long runs (step 8, benchmark)."""
    parser.add_argument("--precision", choices=list(speed.PRECISIONS), default="fp32",
                        help="arithmetic of the attack's gradients: bf16 or fp16 (CUDA only) under autocast; a success "
                             "counts only when an fp32 forward of the 8-bit image confirms it (default: %(default)s)")
    parser.add_argument("--memory-format", choices=["auto"] + list(speed.MEMORY_FORMATS), default="auto",
                        help="auto: channels_last for a network with 2-D convolutions on CPU or CUDA, contiguous otherwise; a "
                             "fixed rule, so the same run gives the same bytes (default: %(default)s)")
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the model: slow to start, worth it on long runs")
