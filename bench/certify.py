"""What a proof costs: step 10's bounds (interval, CROWN, alpha-CROWN) and its exact verifier, seconds per image,
peak memory and how many images each proves, beside the attacks' answer on the same images and model (step 8's
default ensemble through utils.evaluation.robust_accuracy, and the reference AutoAttack).

    python bench/certify.py [--model outputs/certify-demo/mlp.pt2] [--folder digits/test] [--images 20]
                            [--epsilon 16] [--time-limit 60] [--device auto|cpu|cuda] [--threads 1]

Each method runs in a fresh process of its own, so its peak resident memory (the `ru_maxrss` the kernel keeps for
that process, the model and PyTorch included) is its own; on CUDA, the device memory it allocated at most instead.
Bounds: utils.certify's BoundsCertifier up to each --propagation; its columns give what it proves and the mean of the
images' smallest margin bounds (misclassified images left out). Exact: the ExactCertifier on the 8-bit lattice (an
attack, the bounds up to alpha-CROWN, branch and bound, then the MILP, within --time-limit per image), how many it
decided by each, and its sub-problems and programs. The truth lies between what the exact verifier proves
and what the attacks leave robust. The goal to reach for: the exact answer for no more time than AutoAttack takes.
"""
import multiprocessing
import resource
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
from utils.certify.propagation import METHODS  # noqa: E402
from utils.evaluation import robust_accuracy  # noqa: E402
from utils.flags import add_benchmark_arguments, add_device_argument  # noqa: E402
from utils.cli import ArgumentParser, UsageError, number_in, run  # noqa: E402
from utils.data import labelled_photos  # noqa: E402
from utils.evaluation.reference import reference_autoattack  # noqa: E402
from utils.speed import get_device  # noqa: E402

NAMES = {"interval": "interval", "crown": "CROWN", "alpha-crown": "alpha-CROWN"}


def the_images(args, model):
    paths, _, labels = labelled_photos(args.folder, model.classes, model.name)
    chosen = np.linspace(0, len(paths) - 1, min(args.images, len(paths))).round().astype(int)
    return [prepare_image(paths[i], model) for i in chosen], [labels[i] for i in chosen]


def timed(certifier, images, labels, epsilon):
    """(seconds per image, the rows) of one certifier over the images."""
    started, rows = time.perf_counter(), []
    for image, label in zip(images, labels):
        rows += certifier.certify(image, label, [epsilon])
    return (time.perf_counter() - started) / len(images), rows


def peak_memory_mib(device):
    if str(device) == "cuda":
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def in_own_process(model_path, kind, settings, images, labels, epsilon, device, threads):
    """(seconds per image, rows, peak memory) of one certifier, run in a fresh process (spawned, not forked: a fork
    of a process whose PyTorch threads have started can abort) that loads the model and reads its graph itself,
    outside the clock."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        return pool.apply(certify_alone, (model_path, kind, settings, images, labels, epsilon, device, threads))


def certify_alone(model_path, kind, settings, images, labels, epsilon, device, threads):
    torch.set_num_threads(threads)
    if str(device) == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model = load_model(model_path).to(device)
    certifier = kind(model, settings, device, image_shape=(3, *images[0].shape[:2]))
    seconds, rows = timed(certifier, images, labels, epsilon)
    return seconds, rows, peak_memory_mib(device)


def count(rows, verdict):
    return sum(row["verdict"] == verdict for row in rows)


def mean_bound(rows):
    values = [float(row["margin_bound"]) for row in rows if row["margin_bound"] != ""]
    return f"{np.mean(values):.3f}" if values else "-"


def main(args):
    if not Path(args.model).is_file():
        raise UsageError(f"{args.model}: no such model (make certify-demo trains it)")
    torch.set_num_threads(args.threads)
    device = get_device(args.device)
    model = load_model(args.model).to(device)
    images, labels = the_images(args, model)
    shape = (3, *images[0].shape[:2])
    started = time.perf_counter()
    relus = ExactCertifier(model, ExactSettings("Linf"), device, image_shape=shape).network.relus
    reading = time.perf_counter() - started
    print(f"{len(images)} images of {args.folder}, model {Path(args.model).name} ({relus} ReLUs), "
          f"epsilon {args.epsilon:g} levels, {args.threads} thread(s), {device}; reading the graph {reading:.1f} s:")
    print()
    print("| method | s per image | peak memory (MiB) | robust | not robust | unknown | misclassified | "
          "mean margin bound |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    alone = lambda kind, settings: in_own_process(args.model, kind, settings, images, labels, args.epsilon,
                                                  str(device), args.threads)
    for method in METHODS:
        seconds, rows, memory = alone(BoundsCertifier, BoundSettings("Linf", method))
        print(f"| bounds ({NAMES[method]}) | {seconds:.2f} | {memory:.0f} | {count(rows, 'robust')} | - | "
              f"{count(rows, 'unknown')} | {count(rows, 'misclassified')} | {mean_bound(rows)} |")
    exact_seconds, rows, memory = alone(ExactCertifier, ExactSettings("Linf", True, args.time_limit, 0))
    print(f"| exact (time limit {args.time_limit:g} s) | {exact_seconds:.2f} | {memory:.0f} | {count(rows, 'robust')} "
          f"| {count(rows, 'not robust')} | {count(rows, 'unknown')} | {count(rows, 'misclassified')} | - |")
    tensor = to_tensor(images).to(device)
    started = time.perf_counter()
    ours = robust_accuracy(model, (tensor * 255).round().to(torch.uint8), torch.tensor(labels), norm="Linf",
                           epsilon=args.epsilon, device=device)
    ours_seconds = (time.perf_counter() - started) / len(images)
    ours_robust = round(ours.robust_accuracy * len(images))
    ours_clean = round(ours.clean_accuracy * len(images))
    print(f"| step 8's ensemble (attacks) | {ours_seconds:.2f} | - | {ours_robust} (at most) | "
          f"{ours_clean - ours_robust} | - | {len(images) - ours_clean} | - |")
    started = time.perf_counter()
    reference, _ = reference_autoattack(model, tensor, torch.tensor(labels), args.epsilon)
    reference_seconds = (time.perf_counter() - started) / len(images)
    print(f"| reference AutoAttack (standard) | {reference_seconds:.2f} | - | {reference} (at most) | - | - | - | - |")
    print()
    decided = {way: sum(row["found_by"] == way for row in rows) for way in ("attack", "bounds", "bab", "milp")}
    print(f"exact: decided by an attack {decided['attack']}, the bounds {decided['bounds']}, branch and bound "
          f"{decided['bab']} ({sum(int(row['domains'] or 0) for row in rows)} sub-problems), the MILP "
          f"{decided['milp']}")
    print(f"the truth: between {count(rows, 'robust')} and {min(ours_robust, reference)} of {len(images)} robust")
    print(f"exact / AutoAttack: time x{exact_seconds / reference_seconds:.2f} (target: at most x1)")


def get_args_parser():
    parser = ArgumentParser(description="Seconds per image of step 10's exact verifier and bounds beside the "
                                        "reference AutoAttack's.")
    add_benchmark_arguments(parser, model="outputs/certify-demo/mlp.pt2", epsilon=16)
    add_device_argument(parser)
    parser.add_argument("--images", type=number_in(1, 100000, int, name="--images"), default=20,
                        help="images, spread evenly over the folder (default: %(default)s)")
    parser.add_argument("--time-limit", type=number_in(0, 1e6, low_open=True, name="--time-limit"), default=60.0,
                        help="the exact verifier's seconds per image (default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
