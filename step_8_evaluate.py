"""Step 8: evaluate attacks on a folder of photos: attack success with the sanity checks of Carlini et al. 2019
("On Evaluating Adversarial Robustness"), and with true labels, clean and robust accuracy as AutoAttack reports it.

    python step_8_evaluate.py FOLDER [--model resnet18] [--labels imagenet-val | --labels FILE.csv]
                                     [--methods fgsm,pgd,mifgsm] [--epsilons 1,2,4,8,16] [--steps 1,5,10,20,50]
                                     [--target goldfish | --untargeted] [--norm Linf|L2|L1]
                                     [--ensemble apgd,apgd-t,fab,square | standard | fast]
                                     [--queries 5000] [--target-classes 9] [--defenses jpeg,...] [--adaptive] [--eot 1]
                                     [--batch-size 16] [--workers 0] [--threads N] [--device auto|cpu|cuda]
                                     [--output-dir outputs/eval] [--resume] [--strict] [--seed 0]
                                     [--precision fp32|bf16|fp16] [--memory-format auto] [--compile]
                                     [--certify exact,bounds [--time-limit 60] [--continuous]]
    torchrun --nproc_per_node 2 step_8_evaluate.py FOLDER ...      (the same run, split across processes)

How it works, in the order of this file. The plan: with true labels (an ImageFolder tree, --labels imagenet-val or
--labels FILE.csv) the ensemble measures robust accuracy: a "clean" row per photo, then per epsilon the attacks of
--ensemble in order, each on the photos correctly classified when clean that every earlier attack failed to fool
(AutoAttack's flow). The grid (--methods, the default without labels or with --defenses) runs every method x epsilon x
steps, the sanity checks' extra runs (twice the largest steps; pgd unbounded at epsilon 255) and, with --defenses,
the attack judged through each defense (with --adaptive also BPDA(+EOT) through it). The loop: photos, in sorted order,
are cut into batches of --batch-size that a DataLoader (--workers) decodes one at a time; each batch runs every job
before the next is read, so memory stays flat however large the folder. Every adversarial image is saved as a PNG
under OUTPUT_DIR/images/ and judged on that file read back from disk (through the real defense, if any).

Threat models (--norm): Linf (the default; --epsilons in levels out of 255), L2 or L1 (--epsilons the norm of the
whole perturbation in [0, 1] units, as AutoAttack and RobustBench give it; a robustbench: model named with its threat
model defaults to it). The default ensemble is AutoAttack's standard version in that norm (APGD-CE, APGD-T towards 9
classes, FAB-T towards 9, Square with --queries; in L1 AutoAttack's L1 settings: APGD-CE with 5 restarts, APGD-T
towards 5), less any attack this library has no version of in the norm (Square in L1), which summary.md says.
--ensemble fast keeps APGD-CE and APGD-T towards 3 classes: the same worst case on the digits models at about a
quarter of the time, without the gradient-free check (utils/evaluation/plan.py says what it trades).
results.csv names the norm in every row, gives each PNG's size in it, and FAB's smallest adversarial distance; with
FAB in the ensemble, robust_vs_distance.png draws robust accuracy against epsilon from those distances. One norm per
output folder: --resume refuses rows of another norm, and rows made with another model (evaluation.json records a
digest of its weights), seed, --queries, --target-classes, --eot, --no-early-stop or --precision.

With --certify, step 10's certifiers (exact, bounds; L-infinity and L1) then run on the same photos and epsilons: the
attacks' robust accuracy is an upper bound, the share proved robust a lower one, and summary.md gives the interval
per epsilon (with a sixth sanity check: no photo is both proved robust and fooled), robust_accuracy.csv a
certified_accuracy column and robust_interval.png the band between them; the certifiers' rows are in
OUTPUT_DIR/certified/NAME/certified.csv.

This file is main and the parser; the plan is utils/evaluation/plan.py's (make_plan), the loop
utils/evaluation/engine.py's (run_evaluation). Under torchrun, batch k runs on rank k % world size. The results files
(results.csv, the shards, --resume) are utils/evaluation/results.py's; summary.md, robust_accuracy.csv and the
figures are utils/evaluation/report.py's, the sanity checks utils/evaluation/checks.py's.
Unreadable files are named on stderr, listed in summary.md and left out of every rate; --strict makes the first one
an error.

Reproducibility: the same inputs, seed, --batch-size, threads per process, --memory-format, --precision and device
give the same bytes, whatever the number of processes and however busy the machine (no clock decides a float);
another batch size, thread count, memory format or precision gives other floats on CPU, hence the same verdicts
except for images at the decision boundary.
"""
import functools
from pathlib import Path

import torch

from step_2_pretrained import chosen_target, find_class, get_device, prepared_model
from utils import speed
from utils.attacks import ATTACKS
from utils.cli import ArgumentParser, UsageError, listed, number_in, one_of, run
from utils.data import cut, find_photos
from utils.defenses import DEFENSES
from utils.evaluation import distributed
from utils.certify import CERTIFIERS
from utils.evaluation.engine import check_readable, run_evaluation
from utils.evaluation.interval import check_certify, interval_certifiers, make_certifiers
from utils.evaluation.plan import DEFAULT_METHODS, FAST_ENSEMBLE, FAST_TARGET_CLASSES, NAMED_ENSEMBLES, Settings, \
    check_attacks, make_plan, named_ensemble, standard_ensemble
from utils.flags import (add_device_argument, add_norm_argument, add_photos_arguments, add_speed_arguments,
                         add_threads_argument, check_budget, positive_number, resolve_threat)

DEFAULT_EPSILONS = (1.0, 2.0, 4.0, 8.0, 16.0)  # levels out of 255, L-infinity
DEFAULT_ENSEMBLE = tuple(standard_ensemble("Linf"))


# ---- inputs ---------------------------------------------------------------------------------------------------

def evaluated_model(args, device, model=None):
    """The model step 8 evaluates: step 2's prepared_model (--model loaded, or `model`, a network given in its place,
    made ready by --precision, --memory-format and --compile), refused if it takes images of any size."""
    model = prepared_model(args, device, args.batch_size, model)
    if model.preprocessing.crop_size is None:
        raise UsageError(f"{args.model} takes images as they are, and step 8 batches photos of any size: pass "
                         "--input-size N to resize and crop them all to N x N")
    return model


def settings_of(args, model, device, restarts=None):
    """The engine's settings from the command line (and `restarts`, --ensemble fast's); the memory format is the one
    the model runs in (the rule's for "auto"), which summary.md records."""
    return Settings(model=args.model, folder=args.folder, epsilons=tuple(args.epsilons), steps=tuple(args.steps),
                    queries=args.queries, target_classes=args.target_classes, restarts=restarts,
                    defenses=tuple(args.defenses),
                    adaptive=args.adaptive, eot=args.eot, seed=args.seed, early_stop=not args.no_early_stop,
                    precision=args.precision, memory_format=speed.memory_format_of(model, device),
                    batch_size=args.batch_size, workers=args.workers, resume=args.resume, norm=args.norm)


def main(args, model=None):
    """Step 8 on the command line's `args`. `model`: a Classifier to evaluate in place of loading --model (a
    benchmark's own network); it is made ready by the same flags."""
    context = distributed.start(get_device(args.device))
    try:
        torch.set_num_threads(distributed.thread_share(args.threads, context))
        torch.manual_seed(args.seed)
        args.norm, args.epsilons = resolve_threat(args.model, args.norm, args.epsilons, DEFAULT_EPSILONS, "--epsilons")
        args.epsilons = sorted(args.epsilons)
        restarts = None
        if isinstance(args.ensemble, str):  # --ensemble standard or fast
            args.ensemble, args.target_classes, restarts = named_ensemble(args.ensemble, args.norm,
                                                                          args.target_classes)
        check_attacks(args.ensemble, args.methods, args.norm)
        model = evaluated_model(args, context.device, model)  # first: the labels and the target name its classes
        check_budget(args.epsilons, args.norm, (3, model.preprocessing.crop_size, model.preprocessing.crop_size),
                     "--epsilons")
        photos = find_photos(args.folder, args.labels, functools.partial(find_class, classes=model.classes))
        plan = make_plan(photos.labels is not None, args.epsilons, args.steps, args.norm, model.classes,
                         methods=args.methods, ensemble=args.ensemble, target=chosen_target(args, default=None),
                         untargeted=args.untargeted, defenses=args.defenses, adaptive=args.adaptive,
                         queries=args.queries)
        check_certify(args.certify, photos.labels is not None, plan.ensemble, args.norm)
        certifiers = make_certifiers(args.certify, model, vars(args))  # a model it cannot read: refused before output
        if args.strict:
            check_readable(photos.paths, distributed.deal(cut(len(photos.paths), args.batch_size), context), context)
        result = run_evaluation(model, photos, plan, settings_of(args, model, context.device, restarts),
                                args.output_dir, context, certifiers)
        if context.is_main:
            print(result.summary.read_text())
            if result.attacked:
                print(f"Evaluated {result.readable} photos in {result.seconds:.2f} s "
                      f"({result.readable / result.seconds:.3f} photos/s), "
                      f"{context.world_size} process(es) x {torch.get_num_threads()} thread(s)")
            else:
                print(f"Nothing left to do: every job had finished on all {result.readable} photos (--resume); the "
                      "report was written again from results.csv")
            print(f"Wrote {result.reported} rows to {Path(args.output_dir) / 'results.csv'}, {result.summary} and the "
                  f"figures in {args.output_dir}")
    finally:
        distributed.stop(context)


# ---- command line ---------------------------------------------------------------------------------------------

def ensemble_list(text):
    """--ensemble: attack names in order (checked against utils.attacks once the plan is made), none, or the name of
    an ensemble (standard, fast: resolved once the norm is known)."""
    text = text.strip()
    if text in NAMED_ENSEMBLES:
        return text
    return [] if text == "none" else listed(str, "--ensemble")(text)


def get_args_parser():
    parser = ArgumentParser(description="Evaluate attacks (and defenses) on a folder of photos, with sanity checks "
                                        "and, given true labels, robust accuracy.")
    add_photos_arguments(parser)
    parser.add_argument("--methods", type=listed(one_of(ATTACKS, "method"), "--methods"), default=None,
                        help=f"the grid's attacks, from {', '.join(ATTACKS)} (default: "
                             f"{','.join(DEFAULT_METHODS['Linf'])}; L2: {','.join(DEFAULT_METHODS['L2'])}; L1: "
                             f"{','.join(DEFAULT_METHODS['L1'])}; with labels, no grid unless given)")
    parser.add_argument("--epsilons", type=listed(positive_number("--epsilons"), "--epsilons", True), default=None,
                        help="budgets in --norm's units: Linf levels out of 255, each in (0, 255]; L2 and L1 the norm "
                             "of the whole perturbation in [0, 1] units, at most the image's largest distance "
                             "(default: 1,2,4,8,16 levels in Linf; a robustbench: model's own)")
    add_norm_argument(parser)
    parser.add_argument("--steps", type=listed(number_in(1, 100000, int, name="--steps"), "--steps", True),
                        default="1,5,10,20,50", help="steps of the iterative methods, each >= 1 (default: %(default)s)")
    parser.add_argument("--target", help="class index or name the grid aims at (default without labels: 1, goldfish)")
    parser.add_argument("--untargeted", action="store_true", help="any class but the true one (default with labels)")
    parser.add_argument("--ensemble", type=ensemble_list, default=None,
                        help=f"attacks for robust accuracy, in order, or none, or standard (the default with labels: "
                             f"AutoAttack's standard version, {','.join(DEFAULT_ENSEMBLE)}, less the attacks without "
                             "a version in --norm; in L1 apgd with 5 restarts and apgd-t with 5 target classes), or "
                             f"fast ({','.join(FAST_ENSEMBLE)}: apgd with one restart, apgd-t towards "
                             f"{FAST_TARGET_CLASSES} classes unless --target-classes; about a quarter of the time, no "
                             "gradient-free check); its gradient "
                             "attacks run the largest --steps (AutoAttack's own runs 100: --steps 100)")
    parser.add_argument("--queries", type=number_in(1, 10 ** 6, int, name="--queries"), default=5000,
                        help="query budget of a gradient-free ensemble attack (square: per photo, the first query "
                             "included; windows from p_init 0.8 down, as in AutoAttack) (default: %(default)s, "
                             "AutoAttack's)")
    parser.add_argument("--target-classes", type=number_in(1, 999, int, name="--target-classes"), default=None,
                        help="classes apgd-t and fab run towards (default: AutoAttack's, 9; apgd-t in L1: 5)")
    parser.add_argument("--no-early-stop", action="store_true",
                        help="attack every image for all its steps (fixed work per image, for benchmarks)")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=16)
    parser.add_argument("--workers", type=number_in(0, 64, int, name="--workers"), default=0,
                        help="DataLoader processes decoding photos (default: %(default)s, in the main process)")
    add_threads_argument(parser, why="per process; default: the cores divided among this machine's processes")
    add_device_argument(parser)
    parser.add_argument("--output-dir", default="outputs/eval", help="(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the finished rows of an earlier run, do the rest")
    parser.add_argument("--strict", action="store_true", help="an unreadable file is an error (default: skipped)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--defenses", type=listed(one_of(DEFENSES, "defense"), "--defenses"), default=[],
                        help=f"also judge through these defenses (default parameters): {', '.join(DEFENSES)}")
    parser.add_argument("--adaptive", action="store_true", help="also attack through each defense (BPDA, EOT)")
    parser.add_argument("--eot", type=number_in(1, 1000, int, name="--eot"), default=1,
                        help="random draws of the defense averaged per adaptive step (default: %(default)s)")
    add_speed_arguments(parser, compile=True)
    certifiers = interval_certifiers()
    parser.add_argument("--certify", type=listed(one_of(certifiers, "certifier"), "--certify"), default=[],
                        help=f"after the attacks, prove robustness with step 10's certifiers ({', '.join(certifiers)}) "
                             "on the same photos and epsilons: robust accuracy as an interval")
    for name in certifiers:
        CERTIFIERS[name].add_arguments(parser)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
