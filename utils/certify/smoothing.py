"""Randomized smoothing: a certificate in L2 for any classifier.

Cohen, Rosenfeld and Kolter 2019, "Certified Adversarial Robustness via Randomized Smoothing". The smoothed classifier
g(x) answers the class that the base classifier f gives most often on x + N(0, sigma^2 I). If that class has
probability p_A >= p_lower > 1/2 under the noise, g answers it for every x' with ||x' - x||_2 < sigma * Phi^-1(p_lower)
(their Theorem 1, with the runner-up bounded by 1 - p_lower). The probability is estimated by Monte Carlo, so the
certificate holds with probability at least 1 - alpha over the noise drawn.

Units: pixels in [0, 1] (the model normalizes inside itself), so sigma and the radius are L2 distances between images
in [0, 1]; a radius r spread evenly over all d = 3 * H * W values is r * 255 / sqrt(d) levels out of 255 per value.
The noise is not clipped to [0, 1], as in Cohen et al.

Reproducible: the noise of sample k is drawn by the generator of its chunk (CHUNK samples), seeded from
(seed, image id, stream, chunk index), so the counts depend on the seed and the image, never on --batch-size (a batch
is cut from consecutive chunks) nor on the order of the images. The image id defaults to a hash of the image's
values, so an image gets the same noise in any run, shard or resume. Same seed, same device type, same counts.

- `sample_counts`: how often f gives each class on `num` noisy copies.
- `lower_confidence_bound`: the one-sided (1 - alpha) Clopper-Pearson lower bound on a binomial proportion.
- `certify`: Cohen et al.'s CERTIFY (n0 samples pick the class, n fresh ones bound its probability).
- `predict`: Cohen et al.'s PREDICT (the two-sided binomial test between the top two classes).
- `smooth_adv`: an L2 attack on the smoothed classifier (Salman et al. 2019), to test the certificate against.
- `Smoothing`: step 10's `--method smoothing`.
"""
import argparse
import math
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.certify.base import Certifier
from utils.cli import UsageError, number_in
from utils.images import to_tensor
# scipy is imported where it is used (utils/certify/__init__.py says why)

ABSTAIN = -1
CHUNK = 100               # samples per noise generator: fixed, so that no batch size changes the draws
PROGRESS_FROM = 10_000    # samples: fewer finish in moments, a bar would only flicker
SELECT, ESTIMATE, PREDICT = 0, 1, 2   # the noise streams: n0's selection, n's estimate and PREDICT never share draws
N0, N, ALPHA = 100, 100_000, 0.001    # Cohen et al.'s settings


# ---- the noise --------------------------------------------------------------------------------------------------

def image_key(image):
    """A fixed id for an image (a CRC-32 of its float32 values): the same image gets the same noise in any run."""
    return zlib.crc32(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())


def chunk_generator(key, chunk, device):
    """The generator of one chunk's draws, seeded from (key..., chunk) through NumPy's SeedSequence, whose mixing
    makes nearby keys give unrelated streams."""
    seed = int(np.random.SeedSequence([*key, chunk]).generate_state(1, np.uint64)[0])
    return torch.Generator(device=device).manual_seed(seed)


def noise_batches(shape, num, batch_size, key, device="cpu"):
    """Standard normal draws (N(0, 1), shape `shape` each) for samples 0..num-1, yielded in batches of `batch_size`
    (the last one smaller). Sample k is row k % CHUNK of chunk k // CHUNK, a chunk always drawn whole, so it does not
    depend on batch_size nor on num."""
    pieces, held = [], 0
    for chunk in range(math.ceil(num / CHUNK)):
        draws = torch.randn((CHUNK, *shape), generator=chunk_generator(key, chunk, device), device=device)
        draws = draws[:num - chunk * CHUNK]
        while len(draws):
            take = min(batch_size - held, len(draws))
            pieces.append(draws[:take])
            held, draws = held + take, draws[take:]
            if held == batch_size:
                yield pieces[0] if len(pieces) == 1 else torch.cat(pieces)
                pieces, held = [], 0
    if pieces:
        yield torch.cat(pieces)


def model_device(model):
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def as_image(image):
    """A (3, H, W) float tensor in [0, 1] from one (3, H, W) or (1, 3, H, W) tensor, or an 8-bit HxWx3 array."""
    if isinstance(image, np.ndarray):
        image = to_tensor(image)
    return image[0] if image.dim() == 4 else image


# ---- Monte Carlo --------------------------------------------------------------------------------------------------

@torch.inference_mode()
def sample_counts(model, image, sigma, num, batch_size, key, desc="noise samples"):
    """How often `model` gives each class on `num` copies of `image` with Gaussian noise N(0, sigma^2) added.

    model: pixels in [0, 1] -> logits (normalization inside), on its device. image: (3, H, W) in [0, 1].
    sigma > 0 ([0, 1] pixel units); num >= 1; batch_size >= 1 (copies per forward pass); key: a tuple of non-negative
    ints naming the noise stream (see noise_batches). Returns an int64 array of counts, one per class."""
    device = model_device(model)
    image = as_image(image).to(device)
    counts = None
    with tqdm(total=num, desc=desc, unit="sample", leave=False, disable=True if num < PROGRESS_FROM else None) as bar:
        for noise in noise_batches(image.shape, num, batch_size, key, device):
            logits = model(noise.mul_(sigma).add_(image))  # in place: each draw is used once
            found = torch.bincount(logits.argmax(dim=1), minlength=logits.shape[1])
            counts = found if counts is None else counts + found  # summed on the device: no sync per batch
            bar.update(len(noise))
    return counts.cpu().numpy().astype(np.int64)


def lower_confidence_bound(n_a, n, alpha):
    """The one-sided (1 - alpha) Clopper-Pearson lower confidence bound on p from n_a successes in n trials:
    the alpha quantile of Beta(n_a, n - n_a + 1) (0 when n_a = 0). 0 <= n_a <= n, 0 < alpha < 1."""
    from scipy.stats import beta
    return 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))


def radius_from_bound(p_lower, sigma):
    """Cohen et al.'s radius sigma * Phi^-1(p_lower), for p_lower > 1/2."""
    from scipy.stats import norm
    return float(sigma * norm.ppf(p_lower))


def largest_radius(n, alpha, sigma):
    """The largest radius n samples can certify: every sample the class, so p_lower = alpha^(1/n)."""
    return radius_from_bound(lower_confidence_bound(n, n, alpha), sigma)


@dataclass(frozen=True)
class Certificate:
    """CERTIFY's answer: `candidate`, the class the n0 samples picked; `n_a`, its count among the n fresh samples;
    `p_lower`, the lower bound on its probability; `radius` (0 on abstention); `abstain`, when p_lower <= 1/2."""
    candidate: int
    n_a: int
    n: int
    p_lower: float
    radius: float
    abstain: bool

    @property
    def prediction(self):
        return ABSTAIN if self.abstain else self.candidate


def check_settings(sigma, n0, n, alpha, batch_size):
    """UsageError naming the first setting out of range."""
    problems = [(not sigma > 0, f"sigma must be positive, got {sigma}"),
                (not (isinstance(n0, int) and n0 >= 1), f"n0 must be a positive integer, got {n0}"),
                (not (isinstance(n, int) and n >= 1), f"n must be a positive integer, got {n}"),
                (not 0 < alpha < 0.5, f"alpha must be in (0, 0.5), got {alpha}"),
                (not (isinstance(batch_size, int) and batch_size >= 1),
                 f"batch size must be a positive integer, got {batch_size}")]
    for bad, message in problems:
        if bad:
            raise UsageError(message)


def certify_image(model, image, sigma, n0, n, alpha, batch_size, seed=0, image_id=None):
    """Cohen et al.'s CERTIFY on one image, as a Certificate. See certify for the arguments."""
    check_settings(sigma, n0, n, alpha, batch_size)
    image = as_image(image)
    image_id = image_key(image) if image_id is None else image_id
    selection = sample_counts(model, image, sigma, n0, batch_size, (seed, image_id, SELECT), "selecting")
    candidate = int(selection.argmax())
    counts = sample_counts(model, image, sigma, n, batch_size, (seed, image_id, ESTIMATE), "certifying")
    n_a = int(counts[candidate])
    p_lower = lower_confidence_bound(n_a, n, alpha)
    abstain = p_lower <= 0.5
    return Certificate(candidate, n_a, n, p_lower, 0.0 if abstain else radius_from_bound(p_lower, sigma), abstain)


def certify(model, image, sigma, n0, n, alpha, batch_size, seed=0, image_id=None):
    """Cohen et al.'s CERTIFY: (class or ABSTAIN, radius, n_a).

    n0 noisy samples pick the candidate class (their most frequent); n fresh ones count it (n_a) and bound its
    probability below by the one-sided Clopper-Pearson bound p_lower at level 1 - alpha; the smoothed classifier is
    certified to answer the class for every input within L2 radius sigma * Phi^-1(p_lower) of `image`, with
    probability at least 1 - alpha over the noise; it abstains (ABSTAIN, 0.0) when p_lower <= 1/2.

    model: pixels in [0, 1] -> logits. image: (3, H, W) or (1, 3, H, W) in [0, 1], or an 8-bit HxWx3 array.
    sigma > 0, the noise's standard deviation ([0, 1] pixel units); n0 >= 1 and n >= 1 samples (Cohen et al.: 100 and
    100,000); 0 < alpha < 0.5 (0.001); batch_size >= 1; seed and image_id (default: a hash of the image) fix the
    noise. n caps the radius: at most sigma * Phi^-1(alpha^(1/n)) (largest_radius)."""
    found = certify_image(model, image, sigma, n0, n, alpha, batch_size, seed, image_id)
    return found.prediction, found.radius, found.n_a


def predict(model, image, sigma, n, alpha, batch_size, seed=0, image_id=None):
    """Cohen et al.'s PREDICT: the smoothed classifier's class, or ABSTAIN.

    n noisy samples; the top two classes' counts n_a > n_b go to a two-sided binomial test of p = 1/2
    (scipy.stats.binomtest); the top class is answered when its p-value is at most alpha, so the answer differs from
    the smoothed classifier's with probability at most alpha. Arguments as for certify (n >= 1, 0 < alpha < 0.5)."""
    check_settings(sigma, 1, n, alpha, batch_size)
    image = as_image(image)
    image_id = image_key(image) if image_id is None else image_id
    counts = sample_counts(model, image, sigma, n, batch_size, (seed, image_id, PREDICT), "predicting")
    top, runner_up = np.argsort(counts, kind="stable")[::-1][:2]
    n_a, n_b = int(counts[top]), int(counts[runner_up])
    from scipy.stats import binomtest
    return int(top) if binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha else ABSTAIN


# ---- an attack on the smoothed classifier -------------------------------------------------------------------------

def smooth_adv(model, image, label, radius, sigma, steps=20, draws=16, seed=0):
    """An L2 attack on the smoothed classifier: Salman et al. 2019 ("Provably Robust Deep Learning via Adversarially
    Trained Smoothed Classifiers"), SmoothAdv's PGD. Each of `steps` steps (>= 1) ascends the cross-entropy of the
    smoothed soft classifier, -log of the mean softmax over `draws` (>= 1) fresh noise draws N(0, sigma^2) (an
    expectation over transformation through the noise), by a normalized gradient step of 2.5 * radius / steps, then
    projects onto the L2 ball of `radius` (>= 0, [0, 1] pixel units) around `image` and onto [0, 1] (clipping a point
    of the ball into the box keeps it in the ball, since the image is in the box).

    image: (3, H, W) in [0, 1]; label: the class to move away from. Returns the adversarial (3, H, W)."""
    device = model_device(model)
    image = as_image(image).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    step = 2.5 * radius / steps
    adversarial = image.clone()
    target = torch.full((draws,), int(label), device=device)
    for _ in range(steps):
        adversarial.requires_grad_(True)
        noise = torch.randn((draws, *image.shape), generator=generator, device=device)
        probabilities = model(adversarial + sigma * noise).softmax(dim=1).mean(dim=0, keepdim=True)
        loss = F.nll_loss(probabilities.clamp_min(1e-12).log(), target[:1])
        gradient, = torch.autograd.grad(loss, adversarial)
        with torch.no_grad():
            adversarial = adversarial + step * gradient / gradient.norm().clamp_min(1e-12)
            delta = adversarial - image
            delta = delta * min(1.0, radius / max(delta.norm().item(), 1e-12))
            adversarial = (image + delta).clamp(0, 1)
    return adversarial.detach()


# ---- units a reader can picture -----------------------------------------------------------------------------------

def levels_per_value(radius, shape):
    """An L2 radius ([0, 1] units) spread evenly over every value of an image of `shape`: levels out of 255 each."""
    return radius * 255 / math.sqrt(math.prod(shape))


# ---- step 10's --method smoothing ---------------------------------------------------------------------------------

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
            raise UsageError("--method smoothing needs --sigma (the noise's standard deviation, e.g. 0.25)")
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


# ---- the page -----------------------------------------------------------------------------------------------------

PAGE_SIGMA, PAGE_N0, PAGE_N, PAGE_ALPHA = 0.12, 20, 200, 0.001  # a page answers in seconds, not hours


def page_certificate(model, image_u8, adversarial_u8, sigma=PAGE_SIGMA, n0=PAGE_N0, n=PAGE_N, alpha=PAGE_ALPHA,
                     batch_size=50, seed=0):
    """One markdown line for the page: the smoothed model's certified L2 radius around the photo (n noisy copies, so a
    small n caps the radius) beside the L2 size of the attack's change. image_u8, adversarial_u8: 8-bit HxWx3."""
    found = certify_image(model, to_tensor(image_u8), sigma, n0, n, alpha, batch_size, seed)
    change = float(np.linalg.norm((adversarial_u8.astype(np.float64) - image_u8.astype(np.float64)) / 255))
    shape = image_u8.shape
    cap = largest_radius(n, alpha, sigma)
    head = (f"**Randomized smoothing** (sigma {sigma:g}, n = {n} noisy copies, alpha {alpha:g}; a small n for a page: "
            f"it cannot certify more than {cap:.2f}): ")
    attack = (f"the attack changed the photo by L2 {change:.2f} "
              f"({levels_per_value(change, shape):.2f} levels per value if spread evenly).")
    if found.abstain:
        return head + (f"the smoothed model abstains (its top class in {found.n_a} of {n} copies proves nothing); "
                       + attack)
    name = model.classes[found.candidate] if hasattr(model, "classes") else str(found.candidate)
    return head + (f"it says {name} for any change of L2 size below {found.radius:.3f} "
                   f"({levels_per_value(found.radius, shape):.3f} levels per value if spread evenly); ") + attack
