"""What a proof costs: step 10's exact verifier and bound propagation, seconds per image, beside the reference
AutoAttack's on the same images and model, with the size of the exact verifier's programs.

    python bench/certify.py [--model outputs/certify-demo/mlp.pt2] [--folder digits/test] [--images 20]
                            [--epsilon 16] [--time-limit 60] [--threads 1]

Exact: utils.certify's ExactCertifier on the 8-bit lattice (bounds, then an attack, then the MILP on HiGHS for the
images left), per image; its programs' binaries (the ReLUs and max pool inputs the bounds could not decide) and
constraints, over the images that reached the MILP. Bounds: CROWN alone. The reference: pyautoattack's standard
version on the same images, one call (its time divided by the images). All in this process, on --threads threads.
The goal to reach for: proving the exact answer costs no more than attacking with AutoAttack.
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_2_pretrained import load_model, prepare_image, to_tensor  # noqa: E402
from utils.certify.bounds_certifier import BoundSettings, BoundsCertifier  # noqa: E402
from utils.certify.exact import ExactCertifier, ExactSettings  # noqa: E402
from utils.flags import add_benchmark_arguments  # noqa: E402
from utils.cli import ArgumentParser, UsageError, number_in, run  # noqa: E402
from utils.data import list_photos  # noqa: E402
from utils.evaluation.reference import reference_autoattack  # noqa: E402


def the_images(args, model):
    paths, names = list_photos(args.folder)
    if not all("/" in name for name in names):
        raise UsageError(f"{args.folder}: needs true labels, an ImageFolder tree (one subfolder per class)")
    chosen = np.linspace(0, len(paths) - 1, min(args.images, len(paths))).round().astype(int)
    images = [prepare_image(paths[i], model) for i in chosen]
    labels = [model.classes.index(names[i].split("/")[0]) for i in chosen]
    return images, labels


def timed(certifier, images, labels, epsilon):
    """(seconds per image, the rows) of one certifier over the images."""
    started, rows = time.perf_counter(), []
    for image, label in zip(images, labels):
        rows += certifier.certify(image, label, [epsilon])
    return (time.perf_counter() - started) / len(images), rows


def count(rows, verdict):
    return sum(row["verdict"] == verdict for row in rows)


def main(args):
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model (make certify-demo trains it)")
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    images, labels = the_images(args, model)
    shape = (3, *images[0].shape[:2])
    started = time.perf_counter()
    exact = ExactCertifier(model, ExactSettings("Linf", True, args.time_limit, 0), image_shape=shape)
    bounds = BoundsCertifier(model, BoundSettings("Linf"), image_shape=shape)
    reading = time.perf_counter() - started
    exact_seconds, exact_rows = timed(exact, images, labels, args.epsilon)
    bound_seconds, bound_rows = timed(bounds, images, labels, args.epsilon)
    started = time.perf_counter()
    reference, _ = reference_autoattack(model, to_tensor(images), torch.tensor(labels), args.epsilon)
    reference_seconds = (time.perf_counter() - started) / len(images)
    milp = [row for row in exact_rows if row["found_by"] == "milp" or row["verdict"] == "unknown"]
    relus = exact.network.relus
    print(f"{len(images)} images of {args.folder}, model {Path(args.model).name} ({relus} ReLUs), epsilon "
          f"{args.epsilon:g} levels, {args.threads} thread(s); reading the graph {reading:.1f} s:")
    print(f"  exact (MILP, time limit {args.time_limit:g} s): {exact_seconds:7.2f} s per image; robust "
          f"{count(exact_rows, 'robust')}, not robust {count(exact_rows, 'not robust')}, unknown "
          f"{count(exact_rows, 'unknown')}, misclassified {count(exact_rows, 'misclassified')}; decided by the bounds "
          f"{sum(row['found_by'] == 'bounds' for row in exact_rows)}, an attack "
          f"{sum(row['found_by'] == 'attack' for row in exact_rows)}, the MILP "
          f"{sum(row['found_by'] == 'milp' for row in exact_rows)}")
    if milp:
        print(f"    MILP size over the {len(milp)} images that reached it: binaries mean "
              f"{np.mean([row['binaries'] for row in milp]):.0f} (max {max(row['binaries'] for row in milp)}), "
              f"constraints mean {np.mean([row['constraints'] for row in milp]):.0f}; seconds there mean "
              f"{np.mean([row['seconds'] for row in milp]):.1f}")
    print(f"  bounds (CROWN):                   {bound_seconds:7.2f} s per image; robust {count(bound_rows, 'robust')}")
    print(f"  reference AutoAttack (standard):  {reference_seconds:7.2f} s per image; robust {reference}")
    print(f"  exact / AutoAttack: time x{exact_seconds / reference_seconds:.2f} (target: at most x1)")


def get_args_parser():
    parser = ArgumentParser(description="Seconds per image of step 10's exact verifier and bounds beside the "
                                        "reference AutoAttack's.")
    add_benchmark_arguments(parser, model="outputs/certify-demo/mlp.pt2", epsilon=16)
    parser.add_argument("--images", type=number_in(1, 100000, int, name="--images"), default=20,
                        help="images, spread evenly over the folder (default: %(default)s)")
    parser.add_argument("--time-limit", type=number_in(0, 1e6, low_open=True, name="--time-limit"), default=60.0,
                        help="the exact verifier's seconds per image (default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
