"""Copy a small folder of real photos that every install already has offline: the photos matplotlib and
scikit-image ship with their packages. The README's evaluation (step 8) runs on this folder; with --labelled, only
the photos that assets/sample_labels.csv gives a true ImageNet class (the README's robust accuracy runs on those).
With --digits DIR, scikit-learn's 1,797 handwritten digits instead, as an ImageFolder with a fixed train/test split
(step 9 trains on DIR/train, step 8 evaluates on DIR/test). The images themselves are utils/samples.py's.

    python -m tools.sample_images [--output-dir samples] [--labelled]
    python -m tools.sample_images --digits DIR [--test-per-class N]
"""
import shutil
from pathlib import Path

from utils.cli import ArgumentParser, number_in, run
from utils.files import atomic_path, display_path
from utils.samples import SAMPLE_LABELS, labelled_names, sample_paths, write_digits


def main(args):
    if args.digits:
        return write_digits(Path(args.digits), args.test_per_class)
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
    parser.add_argument("--digits", metavar="DIR",
                        help="instead: write scikit-learn's handwritten digits as an ImageFolder DIR/train, DIR/test")
    parser.add_argument("--test-per-class", type=number_in(1, 1000, int, name="--test-per-class"), default=None,
                        help="with --digits: keep only the first N test digits of each class (default: all 450)")
    return parser


if __name__ == "__main__":
    run(main, get_args_parser())
