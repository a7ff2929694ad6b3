"""Step 10's `--method smoothing`: randomized smoothing (utils/certify/smoothing.py) as a Certifier, with its flags
(--sigma, --n0, --n, --alpha, --batch-size) and one row per image."""
import argparse
import time
from dataclasses import dataclass

from utils.certify.base import Certifier
from utils.certify.smoothing import ALPHA, N, N0, certify_image, check_settings
from utils.cli import UsageError, number_in
from utils.images import to_tensor


@dataclass(frozen=True)
class SmoothingSettings:
    sigma: float
    n0: int
    n: int
    alpha: float
    batch_size: int
    seed: int


def open_interval(low, high, name):
    """An argparse type: a number strictly between low and high."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}")
        if not low < value < high:
            raise argparse.ArgumentTypeError(f"{name} must be in ({low:g}, {high:g}), got {text}")
        return value
    parse.__name__ = name
    return parse


def add_once(parser, *flags, **options):
    """Add an argument unless step 10 already has it (a shared flag such as --batch-size)."""
    try:
        parser.add_argument(*flags, **options)
    except argparse.ArgumentError as error:
        if "conflicting option" not in str(error):
            raise


class Smoothing(Certifier):
    """Randomized smoothing (Cohen et al. 2019) for any model: one row per image, L2, no epsilons. The verdict is
    `robust` when the smoothed classifier certifies the label (or, with no label, its own class) with `radius`,
    `misclassified` when it certifies another class, `abstain` when it cannot decide. `prediction` is the class the
    n0 samples picked (on abstention too, so that `n_a`, its count among the n samples, has a class)."""
    name = "smoothing"
    norms = ("L2",)
    uses_epsilons = False
    columns = ("radius", "n_a", "n")
    description = "randomized smoothing, Cohen et al. 2019"
    free_settings = ("batch_size",)  # the noise is drawn per image and sample, not per batch: the same counts

    @classmethod
    def add_arguments(cls, parser):
        add_once(parser, "--sigma", type=number_in(0, 100, low_open=True, name="--sigma"), default=None,
                 help="smoothing: the noise's standard deviation in [0, 1] pixel units (required)")
        add_once(parser, "--n0", type=number_in(1, 10**9, int, name="--n0"), default=N0,
                 help="smoothing: noise samples that pick the class (default: %(default)s)")
        add_once(parser, "--n", type=number_in(1, 10**9, int, name="--n"), default=N,
                 help="smoothing: noise samples that bound its probability (default: %(default)s)")
        add_once(parser, "--alpha", type=open_interval(0, 0.5, "--alpha"), default=ALPHA,
                 help="smoothing: the certificate fails with probability at most alpha, in (0, 0.5) "
                      "(default: %(default)s)")
        add_once(parser, "--batch-size", type=number_in(1, 10**6, int, name="--batch-size"), default=1000,
                 help="smoothing: noisy copies per forward pass; exact: branch and bound's sub-problems per pass "
                      "(at most what fits its memory block) (default: %(default)s)")

    @classmethod
    def from_options(cls, sigma=None, n0=N0, n=N, alpha=ALPHA, batch_size=1000, seed=0, **_):
        if sigma is None:
            raise UsageError("`method` smoothing needs `sigma` (the noise's standard deviation, e.g. 0.25)",
                             "method", "sigma")
        found = SmoothingSettings(sigma, n0, n, alpha, batch_size, seed)
        check_settings(found.sigma, found.n0, found.n, found.alpha, found.batch_size)
        return found

    def certify(self, image_u8, label, epsilons=()):
        settings = self.config  # the base class keeps a certifier's settings as config
        started = time.perf_counter()
        found = certify_image(self.model, to_tensor(image_u8), settings.sigma, settings.n0, settings.n, settings.alpha,
                              settings.batch_size, settings.seed)
        return [{"label": "" if label is None else int(label), "epsilon": "", "verdict": verdict(found, label),
                 "prediction": found.candidate, "seconds": round(time.perf_counter() - started, 3), "file": "",
                 "radius": "" if found.abstain else found.radius, "n_a": found.n_a, "n": found.n}]


def verdict(found, label):
    if found.abstain:
        return "abstain"
    return "robust" if label is None or found.candidate == int(label) else "misclassified"
