"""The certified L2 radius of a smoothed ImageNet model around a photo, in units a reader can picture.

    python bench/smoothing_photo.py [PHOTO ...] [--model efficientnet_lite0] [--sigma 0.12] [--n0 100] [--n 1000]
                                    [--alpha 0.001] [--batch-size 50] [--threads 1]

For each photo (default: matplotlib's Grace Hopper): Cohen et al.'s CERTIFY (utils/certify/smoothing.py) on the
smoothed model, and the radius said three ways: in [0, 1] pixel units (the L2 distance between two images), in levels
out of 255 per value were it spread evenly over all 3 x H x W values, and against the largest radius n samples can
certify at all (sigma * Phi^-1(alpha^(1/n))), which a small n makes the limit.
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from step_2_pretrained import load_model, prepare_image, to_tensor  # noqa: E402
from utils.certify.smoothing import ALPHA, N0, certify_image, largest_radius, levels_per_value  # noqa: E402
from utils.certify.smoothing_method import open_interval  # noqa: E402
from utils.cli import ArgumentParser, number_in, run  # noqa: E402
from utils.figures import short  # noqa: E402
from utils.samples import sample_paths  # noqa: E402


def main(args):
    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    cap = largest_radius(args.n, args.alpha, args.sigma)
    print(f"{model.name} smoothed at sigma {args.sigma:g} ([0, 1] pixel units), n0 {args.n0}, n {args.n}, "
          f"alpha {args.alpha:g} (no radius above {cap:.3f} can be certified with this n):")
    for photo in args.photos or [sample_paths()[0]]:
        image = prepare_image(photo, model)
        started = time.perf_counter()
        found = certify_image(model, to_tensor(image), args.sigma, args.n0, args.n, args.alpha, args.batch_size,
                              args.seed)
        seconds = time.perf_counter() - started
        name = short(model.classes[found.candidate], 40)
        if found.abstain:
            print(f"  {Path(photo).name}: abstains ({name} in {found.n_a} of {args.n} noisy copies, "
                  f"lower bound {found.p_lower:.3f}), {seconds:.0f} s")
            continue
        levels = levels_per_value(found.radius, image.shape)
        print(f"  {Path(photo).name}: {name} in {found.n_a} of {args.n} noisy copies (lower bound "
              f"{found.p_lower:.4f}): certified L2 radius {found.radius:.3f}, {levels:.3f} levels of 255 "
              f"per value spread evenly over {image.shape[2]}x{image.shape[0]}x{image.shape[1]}; {seconds:.0f} s")


def get_args_parser():
    parser = ArgumentParser(description="The certified L2 radius of a smoothed model around photos.")
    parser.add_argument("photos", nargs="*", help="photos (default: matplotlib's Grace Hopper)")
    parser.add_argument("--model", default="efficientnet_lite0", help="(default: %(default)s)")
    parser.add_argument("--sigma", type=number_in(0, 100, low_open=True, name="--sigma"), default=0.12)
    parser.add_argument("--n0", type=number_in(1, 10**9, int, name="--n0"), default=N0)
    parser.add_argument("--n", type=number_in(1, 10**9, int, name="--n"), default=1000)
    parser.add_argument("--alpha", type=open_interval(0, 0.5, "--alpha"), default=ALPHA)
    parser.add_argument("--batch-size", type=number_in(1, 10**6, int, name="--batch-size"), default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=number_in(1, 1024, int, name="--threads"), default=1)
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
