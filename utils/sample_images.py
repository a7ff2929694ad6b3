"""Copy a small folder of real photos that every install already has offline: the photos matplotlib and
scikit-image ship with their packages. The README's evaluation (step 8) runs on this folder; with --labelled, only
the photos that assets/sample_labels.csv gives a true ImageNet class (the README's robust accuracy runs on those).

    python utils/sample_images.py [--output-dir samples] [--labelled]
"""
import csv
import importlib.util
import shutil
import sys
from pathlib import Path

import matplotlib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from utils.cli import ArgumentParser, UsageError, run  # noqa: E402
from utils.files import atomic_path, display_path  # noqa: E402

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
SAMPLE_LABELS = Path(__file__).resolve().parent.parent / "assets" / "sample_labels.csv"


def skimage_data_folder():
    """scikit-image's shipped data folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("scikit-image is not installed (pip install scikit-image): its photos are part of the samples")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def sample_paths():
    """The sample photos: matplotlib's Grace Hopper, then scikit-image's colour photos."""
    paths = [Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]
    paths += [skimage_data_folder() / name for name in SKIMAGE_PHOTOS]
    missing = [display_path(path) for path in paths if not path.is_file()]
    if missing:
        raise UsageError(f"sample photos missing from this install: {', '.join(missing)}")
    return paths


def labelled_names():
    """The sample photos that have a fitting ImageNet class, as assets/sample_labels.csv lists them."""
    with open(SAMPLE_LABELS, newline="") as handle:
        return {row["image"] for row in csv.DictReader(handle)}


def main(args):
    out = Path(args.output_dir)
    paths = sample_paths()
    if args.labelled:
        paths = [path for path in paths if path.name in labelled_names()]
    for path in paths:
        with atomic_path(out / path.name) as temp:
            shutil.copyfile(path, temp)
        print(f"{display_path(path)} -> {display_path(out / path.name)}")
    print(f"Wrote {len(paths)} photos to {display_path(out)}")


def get_args_parser():
    parser = ArgumentParser(description="Copy the sample photos that matplotlib and scikit-image ship into a folder.")
    parser.add_argument("--output-dir", default="samples", help="folder to copy them into (default: %(default)s)")
    parser.add_argument("--labelled", action="store_true",
                        help=f"only the photos with a true class in {SAMPLE_LABELS.parent.name}/{SAMPLE_LABELS.name}")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
