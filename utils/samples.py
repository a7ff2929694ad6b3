"""The images every install already has offline, which the README, the tests and the page use: the photos matplotlib
and scikit-image ship with their packages (`sample_paths`; assets/sample_labels.csv gives some a true ImageNet
class), and scikit-learn's 1,797 handwritten digits as 32x32 RGB images with a fixed train/test split
(`write_digits`). `python -m tools.sample_images` writes them into folders.
"""
import csv
import importlib.util
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image

from utils.cli import UsageError
from utils.files import display_path, save_image

SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png")
SAMPLE_LABELS = Path(__file__).resolve().parent.parent / "assets" / "sample_labels.csv"
DIGIT_SIZE = 32            # pixels: big enough for a few conv layers, small enough to train on a CPU in minutes
DIGIT_TEST_FRACTION = 0.25
DIGIT_SPLIT_SEED = 0


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


def digit_image(grey_0_16):
    """An 8x8 digit (grey levels 0..16, 16 = ink) as a 32x32 8-bit RGB array: scaled to 0..255, upsampled bicubically
    (smooth strokes rather than 4x4 blocks), the same value in the three channels."""
    levels = np.round(np.asarray(grey_0_16, dtype=np.float64) * 255 / 16).astype(np.uint8)
    big = Image.fromarray(levels, "L").resize((DIGIT_SIZE, DIGIT_SIZE), Image.Resampling.BICUBIC)
    return np.asarray(big.convert("RGB"), dtype=np.uint8)


def digit_split(targets):
    """{"train": indices, "test": indices}: a stratified split (every digit in the same proportion in both), fixed by
    DIGIT_SPLIT_SEED so every run and every machine gets the same test images."""
    from sklearn.model_selection import train_test_split
    train, test = train_test_split(np.arange(len(targets)), test_size=DIGIT_TEST_FRACTION, stratify=targets,
                                   random_state=DIGIT_SPLIT_SEED)
    return {"train": sorted(train), "test": sorted(test)}


def first_per_class(indices, targets, count):
    """The first `count` indices of each class (all of them when count is None), in order."""
    if count is None:
        return list(indices)
    seen = {}
    for index in indices:
        seen.setdefault(targets[index], []).append(index)
    return sorted(index for members in seen.values() for index in members[:count])


def write_digits(out, test_per_class=None):
    """scikit-learn's handwritten digits as OUT/{train,test}/<digit>/NNNN.png (NNNN: the index in load_digits); with
    `test_per_class`, only the first that many test digits of each class (a smaller, still balanced, test set)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    splits = digit_split(digits.target)
    splits["test"] = first_per_class(splits["test"], digits.target, test_per_class)
    for split, indices in splits.items():
        for index in indices:
            save_image(digit_image(digits.images[index]), out / split / str(digits.target[index]) / f"{index:04d}.png")
        print(f"{split}: {len(indices)} digits -> {display_path(out / split)}")
    print(f"Wrote {sum(map(len, splits.values()))} digits ({DIGIT_SIZE}x{DIGIT_SIZE} RGB PNG, classes 0..9) to {display_path(out)}")
