"""Step 10: how sure can we be? Prove that no perturbation within the budget changes the class.

    python step_10_certify.py FOLDER --model M [--classes F] [--labels imagenet-val | FILE.csv]
                                     [--method exact|bounds] [--norm Linf|L1] [--epsilons 2,4,8]
                                     [--continuous] [--time-limit 60]
                                     [--propagation interval|crown|alpha-crown] [--alpha-iterations 20]
                                     [--output-dir outputs/certify] [--resume] [--device auto|cpu|cuda]
                                     [--threads N] [--seed 0]
    python step_10_certify.py FOLDER|PHOTO --model M --method smoothing --sigma S [--n0 100] [--n 100000]
                                     [--alpha 0.001] [--batch-size 1000] [--radii 0,0.25,0.5] ...

Every robust accuracy step 8 reports is an upper bound: the share of images that the attacks we ran could not fool.
A certificate is the lower bound. `exact` decides each image by mixed-integer linear programming (Tjeng, Xiao and
Tedrake 2019) for networks of linear, convolution, ReLU, max and average pooling, flatten and batch norm layers:
robust (proved), not robust (a counterexample saved under OUTPUT/counterexamples/, read back and checked),
unknown (the --time-limit ran out) or misclassified (wrong when clean): an attack first, then alpha-CROWN's bounds,
then the program for what they leave. `bounds` runs the bound propagation alone: robust or unknown, fast, for a
network of any size, reporting each image's interval, CROWN (Zhang et al. 2018) and alpha-CROWN (Xu et al. 2021)
margin bounds, each at least the one before (utils/certify/propagation.py: tensors, a convolution passed backward as
its transposed convolution; float64 on the CPU, float32 with an outward margin on --device cuda). Epsilon: L-infinity in levels out
of 255, L1 in [0, 1] pixel units summed over the image. The default verifies the 8-bit lattice, the images a PNG
can hold; --continuous the real-valued ball.

`smoothing` certifies any model step 2 loads, in L2 (Cohen, Rosenfeld and Kolter 2019): the smoothed classifier, the
class the model gives most often under Gaussian noise of --sigma, provably keeps its answer within the radius that
its Monte Carlo counts give (one row per image: radius, n_a, n; robust, misclassified or abstain). Its summary is the
certified accuracy against the radius (--radii, in [0, 1] pixel units: the L2 distance between two images).

Labels as step 8 reads them (an ImageFolder tree, --labels imagenet-val or FILE.csv; without labels each image's
clean prediction is the class to keep). Writes OUTPUT/certified.csv (image, label, epsilon, verdict, prediction,
seconds, the method's columns, file), OUTPUT/summary.md, OUTPUT/certified_accuracy.png and OUTPUT/certify.json (the
settings that decide a row, e.g. smoothing's sigma, n0, n, alpha and seed); --resume keeps the images an earlier run
finished, and refuses them when that run's certify.json differs.

Reproducibility: robust and not robust are facts about the model (a proof, and a counterexample checked on its PNG),
the same on any machine; which images end unknown depends on how far the solver got within --time-limit, a clock,
so a busier machine can leave more of them unknown (never a different proved verdict).
"""
import functools
import sys
from pathlib import Path

import torch

from step_2_pretrained import find_class, get_device, model_from_args, prepare_image
from utils.certify import CERTIFIERS
from utils.certify.report_smoothing import default_radii, write_smoothing_report
from utils.certify.smoothing import largest_radius, levels_per_value
from utils.certify.run import (certify_images, check_epsilons, csv_columns, finished_earlier, sort_certified,
                               write_certify_report)
from utils.cli import ArgumentParser, UsageError, listed, number_in, run
from utils.data import find_photos
from utils.flags import add_device_argument, add_photos_arguments, add_threads_argument
from utils.files import display_path

DEFAULT_EPSILONS = {"Linf": [2.0, 4.0, 8.0], "L1": [0.5, 1.0, 2.0]}
NORMS = ("Linf", "L1", "L2")


def check_norm(args):
    """The norm of --norm, or the method's own (its first) when none is given."""
    kind = CERTIFIERS[args.method]
    if args.norm is None:
        return kind.norms[0]
    if args.norm not in kind.norms:
        raise UsageError(f"--method {args.method} certifies {', '.join(kind.norms)}, not --norm {args.norm}")
    return args.norm


def chosen_epsilons(args):
    """The budgets to certify: --epsilons or the norm's default; a certifier with a radius per image takes none."""
    if not CERTIFIERS[args.method].uses_epsilons:
        if args.epsilons:
            raise UsageError(f"--method {args.method} finds a radius per image; --epsilons does not apply "
                             "(the summary's radii are --radii)")
        return []
    return check_epsilons(args.epsilons or DEFAULT_EPSILONS[args.norm], args.norm)


def make_certifier(args, model, image_shape):
    """The certifier of --method; the model's graph is read here, before anything is written."""
    kind = CERTIFIERS[args.method]
    return kind(model, kind.from_options(**vars(args)), args.device, image_shape=image_shape)


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.device = get_device(args.device)
    args.norm = check_norm(args)
    epsilons = chosen_epsilons(args)
    model = model_from_args(args, args.device)
    photos = find_photos(args.folder, args.labels, functools.partial(find_class, classes=model.classes))
    images = [prepare_image(path, model) for path in photos.paths]
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise UsageError(f"{args.folder}: the images have several sizes ({', '.join(map(str, sorted(shapes)))}); "
                         "pass --input-size N")
    height, width, _ = images[0].shape
    certifier = make_certifier(args, model, (3, height, width))
    out = Path(args.output_dir)
    done = finished_earlier(certifier, out, photos.names, epsilons, args.resume)
    print(f"Certifying {len(photos.names) - len(done)} of {len(photos.names)} images of {args.folder} with "
          f"{args.method} ({certifier.description}), {args.norm}"
          f"{', epsilons ' + ', '.join(f'{e:g}' for e in epsilons) if epsilons else ''}; "
          f"{torch.get_num_threads()} thread(s)", file=sys.stderr)
    certify_images(certifier, images, photos.labels, epsilons, photos.names, photos.stems, out, done, args.norm)
    rows = sort_certified(out, csv_columns(certifier), photos.names)
    if certifier.uses_epsilons:
        report_per_epsilon(args, rows, out, epsilons, model)
    else:
        report_per_radius(args, rows, out, certifier, model, (3, height, width))
    print(f"Wrote {display_path(out / 'certified.csv')}, {display_path(out / 'summary.md')} and "
          f"{display_path(out / 'certified_accuracy.png')}")


def report_per_epsilon(args, rows, out, epsilons, model):
    table = write_certify_report(rows, out, epsilons, args.method, args.norm, model.name, args.folder,
                                 lattice=not args.continuous)
    for row in table:
        print(f"epsilon {row['epsilon']:g}: certified accuracy {row['certified']:.1%} ({row['robust']} of "
              f"{row['images']}), not robust {row['not robust']}, unknown {row['unknown']}, misclassified "
              f"{row['misclassified']}")


EACH_IMAGE_UP_TO = 10  # images: a run on a few photos says each one's radius, a run on a test set its table


def report_per_radius(args, rows, out, certifier, model, shape):
    settings = certifier.config
    cap = largest_radius(settings.n, settings.alpha, settings.sigma)
    radii = args.radii or default_radii(settings.sigma)
    if len(rows) <= EACH_IMAGE_UP_TO:
        for row in rows:
            print(radius_line(row, model.classes, shape))
    for radius, share in zip(radii, write_smoothing_report(rows, out, radii, settings, cap, model.name,
                                                           args.folder)):
        print(f"radius {radius:g}: certified accuracy {share:.1%} ({round(share * len(rows))} of {len(rows)})")
    print(f"With n = {settings.n} samples at alpha {settings.alpha:g} no radius above {cap:.3f} can be certified.")


def radius_line(row, classes, shape):
    """One image's certificate in words: the class, the radius, and the radius spread evenly over its values."""
    if row["verdict"] == "abstain":
        return (f"{row['image']}: the smoothed model abstains (its top class in {row['n_a']} of {row['n']} noisy "
                "copies proves nothing)")
    radius = float(row["radius"])
    said = classes[int(row["prediction"])]
    return (f"{row['image']}: {row['verdict']}, {said} within L2 radius {radius:.3f} "
            f"({levels_per_value(radius, shape):.3f} levels out of 255 per value if spread evenly over its "
            f"{shape[0] * shape[1] * shape[2]:,} values)")


def get_args_parser():
    parser = ArgumentParser(description="Certify robustness: prove that no perturbation within the budget changes "
                                        "the class (exact MILP or bound propagation).")
    add_photos_arguments(parser)
    parser.add_argument("--method", choices=list(CERTIFIERS), default="exact", help="(default: %(default)s)")
    parser.add_argument("--norm", choices=NORMS, default=None,
                        help="(default: the method's: Linf for exact and bounds, L2 for smoothing)")
    parser.add_argument("--epsilons", type=listed(number_in(0, 1e6, name="--epsilons"), "--epsilons", ascending=True),
                        help="budgets: Linf in levels out of 255 (default: 2,4,8), L1 in [0, 1] pixel units summed "
                             "over the image (default: 0.5,1,2)")
    parser.add_argument("--radii", type=listed(number_in(0, 1e6, name="--radii"), "--radii", ascending=True),
                        help="smoothing: the L2 radii of the summary's table, [0, 1] pixel units "
                             "(default: 0 to 2 sigma by halves of sigma)")
    for kind in CERTIFIERS.values():
        kind.add_arguments(parser)
    parser.add_argument("--output-dir", default="outputs/certify", help="(default: %(default)s)")
    parser.add_argument("--resume", action="store_true", help="keep the images an earlier run finished")
    add_device_argument(parser)
    add_threads_argument(parser, why="default: torch's")
    parser.add_argument("--seed", type=int, default=0)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
