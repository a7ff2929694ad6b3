"""Cross-check APGD and Square against the Adversarial Robustness Toolbox (ART) on the offline EfficientNet-Lite0 and
the sample photos: the same budget, the same photos, every result judged the same way, on its 8-bit image (each
attack's returned image rounded to whole levels and classified). Ours must fool at least as many photos.

Settings are small on purpose, so that the comparison can bite: with larger budgets both fool every photo.
- APGD, cross-entropy, targeted to goldfish, epsilon 1 level, 10 iterations, one start each (ART always starts at a
  random point of the ball, ours at the photo).
- Square, untargeted against the clean prediction, epsilon 2 levels, 50 queries per image (ART: the stripes query
  plus 49 iterations), p_init 0.05 for both.
Run with -s to see the counts.
"""
import numpy as np
import pytest
import torch

from utils.images import to_tensor
from utils.models import predict, prepare_image
from utils.attacks import make_attack
from utils.samples import sample_paths

art = pytest.importorskip("art")
from art.attacks.evasion import AutoProjectedGradientDescent, SquareAttack  # noqa: E402
from art.estimators.classification import PyTorchClassifier  # noqa: E402

pytestmark = pytest.mark.crosscheck  # a peer side by side: make test-fast leaves it out

GOLDFISH = 1
APGD_EPSILON, APGD_STEPS = 1, 10
SQUARE_EPSILON, SQUARE_QUERIES = 2, 50


def judge_8bit(model, images):
    """Top-1 classes of the 8-bit versions of a float batch (what a PNG of it would be classified as)."""
    return predict(model, torch.as_tensor(images).mul(255).round().clamp(0, 255).div(255)).argmax(dim=1)


def one_hot(labels):
    return np.eye(1000, dtype=np.float32)[labels.numpy()]


@pytest.fixture(scope="module")
def photos(offline_model):
    return to_tensor([prepare_image(path, offline_model) for path in sample_paths()])


@pytest.fixture(scope="module")
def art_model(offline_model):
    return PyTorchClassifier(offline_model, loss=torch.nn.CrossEntropyLoss(), input_shape=(3, 224, 224),
                             nb_classes=1000, clip_values=(0, 1))


def report(name, ours, theirs):
    print(f"\n{name}: ours fooled {int(ours.sum())}/{len(ours)} {ours.int().tolist()}, "
          f"ART {int(theirs.sum())}/{len(theirs)} {theirs.int().tolist()}")


@pytest.fixture(scope="module")
def apgd_runs(offline_model, art_model, photos):
    labels = torch.full((len(photos),), GOLDFISH)
    ours = make_attack("apgd", offline_model, epsilon=APGD_EPSILON, steps=APGD_STEPS, loss="ce")(photos, labels)
    np.random.seed(0)
    attack = AutoProjectedGradientDescent(art_model, eps=APGD_EPSILON / 255, eps_step=2 * APGD_EPSILON / 255,
                                          max_iter=APGD_STEPS, targeted=True, nb_random_init=1,
                                          loss_type="cross_entropy", verbose=False)  # ART starts at 2 * eps_step
    theirs = attack.generate(photos.numpy(), one_hot(labels))
    ours_fooled = judge_8bit(offline_model, ours.adversarial) == labels
    theirs_fooled = judge_8bit(offline_model, theirs) == labels
    report(f"APGD-CE targeted goldfish, epsilon {APGD_EPSILON}, {APGD_STEPS} iterations", ours_fooled, theirs_fooled)
    return ours, ours_fooled, theirs, theirs_fooled


@pytest.fixture(scope="module")
def square_runs(offline_model, art_model, photos):
    clean = predict(offline_model, photos).argmax(dim=1)
    ours = make_attack("square", offline_model, epsilon=SQUARE_EPSILON, queries=SQUARE_QUERIES, targeted=False,
                       p_init=0.05)(photos, clean)
    np.random.seed(0)
    attack = SquareAttack(art_model, eps=SQUARE_EPSILON / 255, max_iter=SQUARE_QUERIES - 1, p_init=0.05,
                          nb_restarts=1, verbose=False)
    theirs = attack.generate(photos.numpy(), one_hot(clean))
    ours_fooled = judge_8bit(offline_model, ours.adversarial) != clean
    theirs_fooled = judge_8bit(offline_model, theirs) != clean
    report(f"Square untargeted, epsilon {SQUARE_EPSILON}, {SQUARE_QUERIES} queries", ours_fooled, theirs_fooled)
    return ours, ours_fooled, theirs, theirs_fooled


def test_apgd_fools_at_least_as_many_as_arts(apgd_runs):
    ours, ours_fooled, _, theirs_fooled = apgd_runs
    assert int(ours_fooled.sum()) >= int(theirs_fooled.sum()), (ours_fooled.tolist(), theirs_fooled.tolist())
    assert torch.equal(ours_fooled, ours.success), "our reported success is the success of the 8-bit image"


def test_square_fools_at_least_as_many_as_arts(square_runs):
    ours, ours_fooled, _, theirs_fooled = square_runs
    assert int(ours_fooled.sum()) >= int(theirs_fooled.sum()), (ours_fooled.tolist(), theirs_fooled.tolist())
    assert torch.equal(ours_fooled, ours.success), "our reported success is the success of the 8-bit image"
    assert (ours.steps_used <= SQUARE_QUERIES).all()


def test_the_checks_have_teeth(apgd_runs, square_runs):
    """A comparison means something only where the peer does not fool every photo."""
    for name, (_, _, _, theirs_fooled) in (("apgd", apgd_runs), ("square", square_runs)):
        assert not theirs_fooled.all(), f"{name}: ART fools every photo; pick a smaller budget"


@pytest.mark.parametrize("runs, epsilon", [("apgd_runs", APGD_EPSILON), ("square_runs", SQUARE_EPSILON)])
def test_both_stay_within_the_budget(runs, epsilon, photos, request):
    ours, _, theirs, _ = request.getfixturevalue(runs)
    for name, adversarial in (("ours", ours.adversarial), ("ART", torch.as_tensor(theirs))):
        levels = (adversarial.mul(255).round() - photos.mul(255).round()).abs().max()
        assert levels <= epsilon, f"{name}: {levels} levels"
    assert torch.equal(ours.adversarial.mul(255).round().div(255), ours.adversarial), "ours on whole levels"
