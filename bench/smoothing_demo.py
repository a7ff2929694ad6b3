"""Randomized smoothing on several models, side by side: certified accuracy against the L2 radius on the same images.

    python bench/smoothing_demo.py --folder digits/test --models A.pt2,B.pt2 --names "noise,PGD" --sigma 0.25
                                   [--n0 100] [--n 10000] [--alpha 0.001] [--radii 0,0.25,0.5,0.75,1]
                                   [--batch-size 1000] [--threads 1] [--output-dir outputs/smoothing-demo]

Each model is smoothed with the same sigma and certified (Cohen et al.'s CERTIFY, utils/certify/smoothing.py) on
every image of the ImageFolder (true labels from its subfolders), one row per image as step 10 writes them. Writes
OUTPUT_DIR/certified-NAME.csv per model, OUTPUT_DIR/certified_accuracy.md (the table) and
OUTPUT_DIR/certified_accuracy.png (the figure), and prints the table. With n samples no radius above
sigma * Phi^-1(alpha^(1/n)) can be certified: the script says that cap.
"""
import csv
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_2_pretrained import load_model, prepare_image  # noqa: E402
from utils.certify.report_smoothing import certified_accuracy_figure, certified_accuracy_table  # noqa: E402
from utils.certify.smoothing import ALPHA, N0, largest_radius  # noqa: E402
from utils.certify.smoothing_method import Smoothing, SmoothingSettings, open_interval  # noqa: E402
from utils.cli import ArgumentParser, UsageError, comma_list, listed, number_in, run  # noqa: E402
from utils.data import labelled_photos  # noqa: E402
from utils.figures import plt  # noqa: E402
from utils.files import atomic_path, display_path, save_figure, save_text  # noqa: E402

COLUMNS = ("image", "label", "epsilon", "verdict", "prediction", "seconds", "file", *Smoothing.columns)


def certify_folder(model, folder, settings):
    """One certified.csv row per image of `folder`."""
    certifier = Smoothing(model, settings, "cpu")
    paths, names, labels = labelled_photos(folder, model.classes, model.name)
    rows = []
    for path, name, label in zip(paths, names, labels):
        [row] = certifier.certify(prepare_image(path, model), label, [])
        rows.append({"image": name, **row})
    return rows


def write_rows(rows, path):
    with atomic_path(path) as temp:
        with open(temp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
    return path


def main(args):
    if len(args.names) != len(args.models):
        raise UsageError(f"--names gives {len(args.names)} names for {len(args.models)} models")
    torch.set_num_threads(args.threads)
    settings = SmoothingSettings(args.sigma, args.n0, args.n, args.alpha, args.batch_size, args.seed)
    out = Path(args.output_dir)
    curves = {}
    for model_name, name in zip(args.models, args.names):
        started = time.perf_counter()
        rows = certify_folder(load_model(model_name), args.folder, settings)
        write_rows(rows, out / f"certified-{Path(model_name).stem}.csv")
        curves[name] = rows
        print(f"{name} ({display_path(model_name)}): {len(rows)} images in {time.perf_counter() - started:.0f} s",
              flush=True)
    cap = largest_radius(args.n, args.alpha, args.sigma)
    table = certified_accuracy_table(args.radii, curves)
    note = (f"\nsigma {args.sigma:g}, n0 {args.n0}, n {args.n}, alpha {args.alpha:g}: no radius above {cap:.2f} "
            f"can be certified with n = {args.n}.\n")
    save_text(table + note, out / "certified_accuracy.md")
    figure = certified_accuracy_figure(curves, f"Certified accuracy, smoothed at sigma {args.sigma:g} "
                                               f"(n = {args.n}, alpha {args.alpha:g})", marks=args.radii, cap=cap)
    save_figure(figure, out / "certified_accuracy.png")
    plt.close(figure)
    print(table + note, end="")
    print(f"Wrote {display_path(out / 'certified_accuracy.md')} and {display_path(out / 'certified_accuracy.png')}")


def get_args_parser():
    parser = ArgumentParser(description="Certified accuracy against radius of several smoothed models on one folder.")
    parser.add_argument("--folder", default="digits/test", help="an ImageFolder of test images (default: %(default)s)")
    parser.add_argument("--models", type=comma_list(name="--models"), required=True, help="comma-separated models")
    parser.add_argument("--names", type=comma_list(name="--names"), required=True, help="their names in the table")
    parser.add_argument("--sigma", type=number_in(0, 100, low_open=True, name="--sigma"), required=True)
    parser.add_argument("--n0", type=number_in(1, 10**9, int, name="--n0"), default=N0)
    parser.add_argument("--n", type=number_in(1, 10**9, int, name="--n"), default=10_000)
    parser.add_argument("--alpha", type=open_interval(0, 0.5, "--alpha"), default=ALPHA)
    parser.add_argument("--radii", type=listed(number_in(0, 100, name="--radii"), "--radii", ascending=True),
                        default=[0.0, 0.25, 0.5, 0.75, 1.0], help="the table's radii (default: 0,0.25,0.5,0.75,1)")
    parser.add_argument("--batch-size", type=number_in(1, 10**6, int, name="--batch-size"), default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=1)
    parser.add_argument("--output-dir", default="outputs/smoothing-demo", help="(default: %(default)s)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
