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

Step 10's `--method smoothing` (its flags and rows) is smoothing_method.py's Smoothing; the page's line is
smoothing_page.py's page_certificate.
"""
import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils.cli import UsageError
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
