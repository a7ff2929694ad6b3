"""Randomized smoothing (utils/certify/smoothing.py): the bound and the radius, the noise's units and seeding, a linear
model whose true distance to the boundary is known, step 10's rows and flags, ART's implementation on the same model,
and an attack on the smoothed classifier inside the certified radius."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import brentq
from scipy.stats import binom, fisher_exact, norm
from torch import nn

from utils.models import Classifier, freeze, Preprocessing
from utils.certify import smoothing
from utils.certify.smoothing import (ABSTAIN, certify, certify_image, lower_confidence_bound, noise_batches, predict,
                                     sample_counts, smooth_adv)
from utils.certify.smoothing_method import Smoothing, SmoothingSettings
from utils.certify.smoothing_page import page_certificate
from utils.cli import ArgumentParser, UsageError

SIGMA = 0.25


def clopper_pearson_by_definition(n_a, n, alpha):
    """The one-sided lower bound from its definition: the p at which n_a or more successes have probability alpha."""
    return brentq(lambda p: binom.sf(n_a - 1, n, p) - alpha, 1e-12, 1 - 1e-12, xtol=1e-14)


# ---- the bound ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_a, n, alpha", [(1, 10, 0.05), (60, 100, 0.001), (990, 1000, 0.001), (51234, 100000, 0.001)])
def test_the_lower_bound_is_clopper_pearson(n_a, n, alpha):
    expected = clopper_pearson_by_definition(n_a, n, alpha)
    assert lower_confidence_bound(n_a, n, alpha) == pytest.approx(expected, abs=1e-9)


def test_the_bound_at_the_ends():
    assert lower_confidence_bound(0, 100, 0.001) == 0.0
    assert lower_confidence_bound(1000, 1000, 0.001) == pytest.approx(0.001 ** (1 / 1000))
    # the cap the README quotes: Cohen et al.'s n = 100,000, alpha = 0.001 certify at most about 3.8 sigma
    assert smoothing.largest_radius(100_000, 0.001, 1.0) == pytest.approx(3.8, abs=0.05)
    assert smoothing.largest_radius(1000, 0.001, 0.5) == pytest.approx(0.5 * norm.ppf(0.001 ** (1 / 1000)))


# ---- the noise ----------------------------------------------------------------------------------------------------

def all_noise(num, batch_size, key=(0, 1, 0)):
    batches = list(noise_batches((3, 4, 4), num, batch_size, key))
    assert all(len(batch) == batch_size for batch in batches[:-1]) and 0 < len(batches[-1]) <= batch_size
    return torch.cat(batches)


def test_the_noise_of_a_sample_depends_on_neither_the_batch_size_nor_the_count():
    reference = all_noise(250, 250)
    assert reference.shape == (250, 3, 4, 4)
    for batch_size in (1, 7, 99, 100, 101, 333):
        assert torch.equal(all_noise(250, batch_size), reference), batch_size
    assert torch.equal(all_noise(130, 64), reference[:130])
    assert not torch.equal(all_noise(250, 250, key=(0, 1, 1)), reference)  # another stream: other draws
    assert not torch.equal(all_noise(250, 250, key=(1, 1, 0)), reference)  # another seed: other draws


def test_the_noise_is_standard_normal():
    draws = all_noise(2000, 500).flatten().double()  # 96,000 draws
    assert abs(draws.mean().item()) < 0.02 and abs(draws.std().item() - 1) < 0.01


class Threshold(nn.Module):
    """Class 1 when the top-left red value is above t, else class 0: P(class 1) under the noise is
    Phi((x - t) / sigma) when the noise is N(0, sigma^2) in [0, 1] units and not clipped."""

    def __init__(self, t):
        super().__init__()
        self.register_buffer("t", torch.tensor(t))

    def forward(self, pixels):
        margin = pixels[:, 0, 0, 0] - self.t
        return torch.stack([-margin, margin], dim=1)


def test_the_noise_is_in_pixel_units_and_not_clipped():
    image = torch.full((3, 4, 4), 0.02)
    num = 4000
    counts = sample_counts(Threshold(-0.1), image, SIGMA, num, 512, (0, 0, 0))
    expected = norm.cdf((0.02 + 0.1) / SIGMA)  # 0.68; noise clipped to [0, 1] would give 1
    assert counts.sum() == num
    assert abs(counts[1] / num - expected) < 4.5 * np.sqrt(expected * (1 - expected) / num)


def test_same_seed_same_counts_at_any_batch_size(tiny_model):
    image = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    counts = sample_counts(tiny_model, image, SIGMA, 300, 300, (0, 5, 0))
    assert (counts > 0).sum() >= 2, "the test needs a model whose answer the noise changes"
    for batch_size in (1, 64, 1000):
        assert np.array_equal(sample_counts(tiny_model, image, SIGMA, 300, batch_size, (0, 5, 0)), counts)
    assert not np.array_equal(sample_counts(tiny_model, image, SIGMA, 300, 300, (1, 5, 0)), counts)
    first = certify(tiny_model, image, SIGMA, 50, 300, 0.001, 300, seed=3)
    assert certify(tiny_model, image, SIGMA, 50, 300, 0.001, 7, seed=3) == first
    assert certify(tiny_model, image.unsqueeze(0), SIGMA, 50, 300, 0.001, 64, seed=3) == first


# ---- a linear model: the smoothed classifier's true radius is the distance to the hyperplane --------------------

class Linear(nn.Module):
    """Two classes split by the hyperplane w.x + b = 0 on the flattened pixels."""

    def __init__(self, w, b):
        super().__init__()
        self.register_buffer("w", w)
        self.b = b

    def forward(self, pixels):
        score = pixels.flatten(1) @ self.w + self.b
        return torch.stack([-score, score], dim=1)


def test_on_a_linear_model_the_radius_is_sound_and_tight():
    """For a linear classifier the smoothed classifier is the same classifier, and Cohen et al.'s radius
    sigma * Phi^-1(p_A) is exactly the distance to the hyperplane: the certified radius (from a lower bound on p_A)
    is below it and, with n = 20,000, close to it."""
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=generator)
    model = Linear(w, 0.0)
    for distance in (0.05, 0.2, 0.4):
        image = (0.5 + distance * w / w.norm()).view(3, 4, 4)  # w.(0.5) is not 0: put b so the point is at distance
        model.b = -(0.5 * w.sum()).item()
        found = certify_image(model, image, SIGMA, 100, 20_000, 0.001, 5000, seed=1)
        assert found.candidate == 1 and not found.abstain
        assert found.radius == pytest.approx(SIGMA * norm.ppf(lower_confidence_bound(found.n_a, found.n, 0.001)))
        assert distance - 0.03 < found.radius < distance + 1e-6, (distance, found)
    on_the_boundary = torch.full((3, 4, 4), 0.5)
    found = certify_image(model, on_the_boundary, SIGMA, 100, 2000, 0.001, 2000)
    assert found.abstain and found.radius == 0.0 and found.p_lower <= 0.5
    assert certify(model, on_the_boundary, SIGMA, 100, 2000, 0.001, 2000)[0] == ABSTAIN
    assert predict(model, on_the_boundary, SIGMA, 2000, 0.001, 2000) == ABSTAIN
    assert predict(model, (0.5 + 0.2 * w / w.norm()).view(3, 4, 4), SIGMA, 2000, 0.001, 2000) == 1


# ---- step 10's certifier: rows and flags ----------------------------------------------------------------------------

def rows_of(model, images, labels, settings):
    certifier = Smoothing(model, settings, "cpu")
    return [row for image, label in zip(images, labels) for row in certifier.certify(image, label, [])]


def test_the_rows_radius_and_verdict_follow_from_their_own_counts(tiny_model):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    settings = SmoothingSettings(sigma=0.1, n0=20, n=200, alpha=0.001, batch_size=100, seed=0)
    first = rows_of(tiny_model, images, [None] * 6, settings)
    labels = [(row["prediction"] + index % 2) % 1000 for index, row in enumerate(first)]  # odd ones: another class
    rows = rows_of(tiny_model, images, labels, settings) + first
    assert {row["verdict"] for row in rows} == {"robust", "misclassified", "abstain"}
    for row, label in zip(rows, labels + [None] * 6):
        assert set(row) >= {"label", "epsilon", "verdict", "prediction", "seconds", "radius", "n_a", "n"}
        assert row["epsilon"] == "" and row["n"] == 200 and 0 <= row["n_a"] <= 200
        p_lower = lower_confidence_bound(row["n_a"], row["n"], settings.alpha)
        if row["verdict"] == "abstain":
            assert p_lower <= 0.5 and row["radius"] == ""
            continue
        assert p_lower > 0.5
        assert float(str(row["radius"])) == pytest.approx(settings.sigma * norm.ppf(p_lower), rel=1e-12)
        expected = "robust" if label is None or label == row["prediction"] else "misclassified"
        assert row["verdict"] == expected
    abstaining = rows_of(tiny_model, images[:2], [None] * 2,
                         SmoothingSettings(sigma=0.5, n0=20, n=3, alpha=0.001, batch_size=100, seed=0))
    assert [row["verdict"] for row in abstaining] == ["abstain"] * 2  # 3 samples prove nothing at alpha 0.001


def parser():
    made = ArgumentParser(prog="step_10_certify.py")
    Smoothing.add_arguments(made)
    return made


@pytest.mark.parametrize("argv, message", [
    (["--sigma", "0"], "--sigma must be in (0, 100], got 0"),
    (["--sigma", "-0.5"], "--sigma must be in (0, 100], got -0.5"),
    (["--sigma", "x"], "--sigma must be a number, got 'x'"),
    (["--n0", "0"], "--n0 must be in [1, 1000000000], got 0"),
    (["--n0", "1.5"], "--n0 must be an integer, got '1.5'"),
    (["--n", "-3"], "--n must be in [1, 1000000000], got -3"),
    (["--alpha", "0"], "--alpha must be in (0, 0.5), got 0"),
    (["--alpha", "0.5"], "--alpha must be in (0, 0.5), got 0.5"),
    (["--alpha", "nan"], "--alpha must be in (0, 0.5), got nan"),
])
def test_bad_settings_are_one_line_with_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as stopped:
        parser().parse_args(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error


def test_settings_need_sigma_and_share_an_existing_batch_size():
    with pytest.raises(UsageError, match="^method smoothing needs sigma "):  # step 10 says --sigma (test_certify)
        Smoothing.from_options(**vars(parser().parse_args([])))
    found = Smoothing.from_options(**vars(parser().parse_args(["--sigma", "0.25", "--n", "500"])))
    assert found == SmoothingSettings(0.25, 100, 500, 0.001, 1000, 0)
    shared = ArgumentParser()
    shared.add_argument("--batch-size", type=int, default=7)
    Smoothing.add_arguments(shared)  # step 10's own --batch-size stays
    assert shared.parse_args(["--sigma", "1"]).batch_size == 7
    with pytest.raises(UsageError, match="n must be a positive integer"):
        certify(Threshold(0.0), torch.zeros(3, 4, 4), 0.25, 10, 0, 0.001, 10)


# ---- the page -----------------------------------------------------------------------------------------------------

def test_the_page_line_gives_the_radius_and_the_attacks_l2_size(tiny_model):
    image = np.full((32, 32, 3), 128, np.uint8)
    adversarial = image.copy()
    adversarial[0, 0, 0] += 51  # an L2 change of 51/255 = 0.2
    line = page_certificate(tiny_model, image, adversarial, sigma=0.5, n0=20, n=100, batch_size=100)
    found = certify_image(tiny_model, torch.from_numpy(image).permute(2, 0, 1).float() / 255, 0.5, 20, 100, 0.001, 100)
    assert line.startswith("**Randomized smoothing** (sigma 0.5, n = 100 noisy copies, alpha 0.001")
    assert f"cannot certify more than {smoothing.largest_radius(100, 0.001, 0.5):.2f}" in line
    # 0.2 * 255 / sqrt(3 * 32 * 32) = 0.92 levels per value
    assert "the attack changed the photo by L2 0.20 (0.92 levels per value if spread evenly)" in line
    if found.abstain:
        assert "abstains" in line
    else:
        assert f"below {found.radius:.3f}" in line and tiny_model.classes[found.candidate] in line


# ---- a noise-trained digits model: ART, and an attack on the smoothed classifier ---------------------------------

@pytest.fixture(scope="module")
def digits_model():
    return noise_trained_digits()


def noise_trained_digits():
    """A small CNN trained with Gaussian noise (sigma 0.25) on the digits' train split, 4 epochs (about 10 s on one
    thread; about 92% clean test accuracy), and the first 2 test digits of each class as (N, 3, 32, 32) in [0, 1]."""
    from sklearn.datasets import load_digits
    from utils.samples import digit_image, digit_split
    from utils.training import SMALL_CNN, build_net
    torch.set_num_threads(1)
    digits = load_digits()
    split = digit_split(digits.target)

    def pixels(indices):
        return torch.from_numpy(np.stack([digit_image(digits.images[i]) for i in indices])).permute(0, 3, 1, 2) / 255

    images, targets = pixels(split["train"]).float(), torch.tensor(digits.target[split["train"]])
    torch.manual_seed(0)
    model = Classifier(build_net(SMALL_CNN, 10), Preprocessing(32, (0.3,) * 3, (0.4,) * 3), "digits",
                       memory_format=torch.contiguous_format, classes=[str(d) for d in range(10)])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(4):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            noisy = images[batch] + SIGMA * torch.randn(images[batch].shape, generator=generator)
            loss = F.cross_entropy(model(noisy), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    test = [i for digit in range(10) for i in [j for j in split["test"] if digits.target[j] == digit][:2]]
    return freeze(model), pixels(test).float(), torch.tensor(digits.target[test])


@pytest.mark.slow
def test_certify_agrees_with_art(digits_model, monkeypatch):
    """ART's PyTorchRandomizedSmoothing.certify on the same model, sigma, n0 and n. Its noise is NumPy's, so the
    counts differ by sampling alone: per image, both counts of the class are Binomial(n, p_A) with the same p_A, and
    Fisher's exact test of equal proportions must not reject at 0.001 / images (a correct pair of implementations
    fails this with probability below 0.001). The classes must agree where the count is a clear majority (above
    0.6 n: with n0 = 100 samples, picking another class is then vanishingly unlikely)."""
    from art.estimators.certification.randomized_smoothing import PyTorchRandomizedSmoothing
    model, images, labels = digits_model
    n0, n, alpha = 100, 500, 0.001
    art_counts = []

    def bound(self, count, total):  # ART reads statsmodels' Clopper-Pearson, which is not installed here
        art_counts.append(int(count))
        return clopper_pearson_by_definition(int(count), total, self.alpha) if count > 0 else 0.0

    monkeypatch.setattr(PyTorchRandomizedSmoothing, "_lower_confidence_bound", bound)
    art = PyTorchRandomizedSmoothing(model, nn.CrossEntropyLoss(), input_shape=(3, 32, 32), nb_classes=10,
                                     device_type="cpu", sample_size=n0, scale=SIGMA, alpha=alpha)
    np.random.seed(0)
    art_classes, art_radii = art.certify(images.numpy(), n=n, batch_size=500)
    ours = [certify_image(model, image, SIGMA, n0, n, alpha, 500, seed=0) for image in images]
    assert len(art_counts) == len(ours)
    for found, count, art_class, art_radius in zip(ours, art_counts, art_classes, art_radii):
        assert fisher_exact([[found.n_a, n - found.n_a], [count, n - count]]).pvalue > alpha / len(ours)
        if min(found.n_a, count) > 0.6 * n:
            assert art_class == found.candidate and art_radius > 0 and not found.abstain
    certified = [found.candidate == label and not found.abstain for found, label in zip(ours, labels.tolist())]
    art_certified = [c == label for c, label in zip(art_classes.tolist(), labels.tolist())]
    assert sum(certified) >= 0.7 * len(ours), "the noise-trained model should certify most test digits"
    assert abs(sum(certified) - sum(art_certified)) <= 2


@pytest.mark.slow
def test_an_attack_within_the_certified_radius_does_not_change_the_prediction(digits_model):
    """SmoothAdv (PGD through the noise, 16 draws a step) within each certified radius, then PREDICT on the result.
    A certificate fails with probability at most alpha and PREDICT errs with probability at most alpha, so the
    changed predictions are at most Binomial(images, 2 alpha): more than its 0.999 quantile fails the test (a sound
    certificate fails it with probability below 0.001; with 20 images that allows 1). The same attack at twice the
    radius must change at least 2 (it changed 5 of 20 when this test was written): a radius twice too large would
    fail this test."""
    model, images, labels = digits_model
    n0, n, alpha = 100, 1000, 0.001
    changed, broken_far, certified = 0, 0, 0
    for index, image in enumerate(images):
        found = certify_image(model, image, SIGMA, n0, n, alpha, 500, seed=0)
        if found.abstain:
            continue
        certified += 1
        inside = smooth_adv(model, image, found.candidate, found.radius * (1 - 1e-6), SIGMA, seed=index)
        assert (inside - image).norm() <= found.radius and 0 <= inside.min() and inside.max() <= 1
        changed += predict(model, inside, SIGMA, 500, alpha, 500, seed=1) not in (found.candidate, ABSTAIN)
        outside = smooth_adv(model, image, found.candidate, 2 * found.radius, SIGMA, seed=index)
        broken_far += predict(model, outside, SIGMA, 500, alpha, 500, seed=1) not in (found.candidate, ABSTAIN)
    assert certified >= 10
    assert changed <= binom.ppf(0.999, certified, 2 * alpha), (changed, certified)
    assert broken_far >= 2, (broken_far, certified)


# ---- the report -----------------------------------------------------------------------------------------------------

def test_certified_accuracy_counts_robust_rows_at_or_above_each_radius(tmp_path):
    from PIL import Image as PILImage

    from utils.certify.report_smoothing import (certified_accuracy_at, certified_accuracy_figure,
                                                certified_accuracy_table)
    from utils.files import save_figure
    rows = [{"verdict": "robust", "radius": "0.5"}, {"verdict": "robust", "radius": 0.2},
            {"verdict": "misclassified", "radius": "0.9"}, {"verdict": "abstain", "radius": ""}]
    assert certified_accuracy_at([0, 0.2, 0.3, 0.5, 0.6], rows) == [0.5, 0.5, 0.25, 0.25, 0.0]
    table = certified_accuracy_table([0, 0.5], {"a": rows})
    assert "| a | 50% (2/4) | 25% (1/4) |" in table
    figure = certified_accuracy_figure({"a": rows, "b": rows[:1]}, marks=[0.5], cap=0.8)
    path = save_figure(figure, tmp_path / "figure.png")
    assert PILImage.open(path).size[0] > 300
    with pytest.raises(ValueError):
        certified_accuracy_at([0], [])
