"""What --ensemble fast trades: step 8's standard ensemble (AutoAttack's standard version: APGD-CE, APGD-T towards 9
classes, FAB-T, Square) against the fast one (APGD-CE, APGD-T towards 3 classes) on the same labelled images, model,
budgets and settings, through utils.evaluation.robust_accuracy (step 8's verdicts without its files), one after the
other in this process.

    python bench/fast_ensemble.py [--model outputs/robust-demo/adversarial.pt2] [--folder digits/test]
                                  [--norm Linf,L2,L1] [--epsilons 32,2,12] [--steps 50] [--queries 1000]
                                  [--batch-size 100] [--threads 1]

A row per norm and budget: the images each ensemble leaves robust (its worst case), how many more the fast one
leaves (0: the same answer; an image the standard one fools and the fast one does not counts against the fast one),
and each one's wall seconds with their ratio. Misclassified images count as not robust in both.
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_2_pretrained import load_model, prepare_image, to_tensor  # noqa: E402
from utils.attacks import NORMS  # noqa: E402
from utils.cli import ArgumentParser, UsageError, comma_list, listed, number_in, one_of, run  # noqa: E402
from utils.data import labelled_photos  # noqa: E402
from utils.evaluation import robust_accuracy  # noqa: E402
from utils.evaluation.report import markdown_table  # noqa: E402
from utils.flags import add_benchmark_arguments, norm_budgets, positive_number  # noqa: E402

ENSEMBLES = ("standard", "fast")


def labelled_images(folder, model):
    """The folder's images as uint8 (N, 3, H, W) and their labels from its ImageFolder subfolders."""
    paths, _, labels = labelled_photos(folder, model.classes, model.name)
    images = (to_tensor([prepare_image(path, model) for path in paths]) * 255).round().to(torch.uint8)
    return images, torch.tensor(labels)


def timed_run(model, images, labels, ensemble, norm, epsilon, args):
    """(images left robust, wall seconds) of one ensemble."""
    started = time.perf_counter()
    result = robust_accuracy(model, images, labels, norm=norm, epsilon=epsilon, attacks=ensemble, steps=args.steps,
                             queries=args.queries, batch_size=args.batch_size, seed=args.seed)
    return round(result.robust_accuracy * len(labels)), time.perf_counter() - started


def main(args):
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model (make robust-demo trains it)")
    pairs = norm_budgets(args.norm, args.epsilons)
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    images, labels = labelled_images(args.folder, model)
    rows = []
    for norm, epsilon in pairs:
        (standard, standard_s), (fast, fast_s) = (timed_run(model, images, labels, ensemble, norm, epsilon, args)
                                                  for ensemble in ENSEMBLES)
        rows.append((norm, f"{epsilon:g}", len(labels), standard, fast, f"{fast - standard:+d}", f"{standard_s:.2f}",
                     f"{fast_s:.2f}", f"x{fast_s / standard_s:.2f}"))
    print(f"{args.folder}, model {Path(args.model).name}, {args.steps} steps per gradient attack, Square's "
          f"{args.queries} queries, batches of {args.batch_size}, {torch.get_num_threads()} thread(s); epsilon in "
          "levels out of 255 (Linf), in [0, 1] pixel units (L2, L1):\n")
    print(markdown_table(("norm", "epsilon", "images", "standard: robust", "fast: robust", "fast - standard",
                          "standard (s)", "fast (s)", "fast / standard"), rows))


def get_args_parser():
    parser = ArgumentParser(description="Step 8's --ensemble fast against its standard ensemble: the same images, "
                                        "robust accuracy and wall time.")
    add_benchmark_arguments(parser, model="outputs/robust-demo/adversarial.pt2", epsilon=None)
    parser.add_argument("--norm", type=listed(one_of(NORMS, "norm"), "--norm"), default=["Linf", "L2", "L1"],
                        help="threat models, one row each, comma-separated (default: Linf,L2,L1)")
    parser.add_argument("--epsilons", type=comma_list(positive_number("--epsilons"), "--epsilons"), default=None,
                        help="one budget per norm, in its units, or several for one norm (default: Linf 32 levels, "
                             "L2 2, L1 12)")
    parser.add_argument("--steps", type=number_in(1, 100000, int, name="--steps"), default=50,
                        help="steps of each gradient attack (default: %(default)s, make robust-demo's)")
    parser.add_argument("--queries", type=number_in(1, 10 ** 6, int, name="--queries"), default=1000,
                        help="Square's queries per image (default: %(default)s, make robust-demo's)")
    parser.add_argument("--batch-size", type=number_in(1, 4096, int, name="--batch-size"), default=100)
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
