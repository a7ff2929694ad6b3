"""Invariants every attack keeps, on a tiny model (milliseconds per step)."""
import pytest
import torch

from step_2_pretrained import predict, to_tensor, to_uint8
from tests.conftest import make_tiny_model
from utils.attacks import ATTACKS, SGD, make_attack, perturbation_size

METHODS = sorted(ATTACKS)
TARGET = 1
# the tiny model's random logits are flat and its input gradients small: the tutorial's SGD step and CW's
# misclassification weight, tuned for ImageNet models, need scaling up here, and a random search needs more queries
# than a gradient attack needs steps
OWN = {"cw": {"c": 100.0}, "sgd": {"lr": 300.0}, "square": {"queries": 300}}


def attack(method, model, images, labels=None, **options):
    labels = torch.full((len(images),), TARGET) if labels is None else labels
    options.setdefault("epsilon", 8)
    options.setdefault("steps", 10)
    options = {**OWN.get(method, {}), **options}
    return make_attack(method, model, **options)(images, labels)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("epsilon", [1, 2.5, 8, 40])
def test_budget_range_and_lattice(method, epsilon, tiny_model, tiny_images):
    result = attack(method, tiny_model, tiny_images, epsilon=epsilon, early_stop=False)
    levels = result.adversarial * 255
    assert torch.equal(levels, levels.round()), "the adversarial image must be on whole 8-bit levels"
    assert levels.min() >= 0 and levels.max() <= 255
    linf, _ = perturbation_size(result.adversarial, tiny_images)
    assert linf.max().item() <= int(epsilon)
    # the same after a round trip through 8-bit arrays, as the PNG will hold it
    saved = to_tensor(to_uint8(result.adversarial))
    assert torch.equal(saved, result.adversarial)


@pytest.mark.parametrize("method", METHODS)
def test_input_not_mutated(method, tiny_model, tiny_images):
    before = tiny_images.clone()
    attack(method, tiny_model, tiny_images, random_start=True)
    assert torch.equal(tiny_images, before)


@pytest.mark.parametrize("method", METHODS)
def test_epsilon_zero_returns_the_input(method, tiny_model, tiny_images):
    result = attack(method, tiny_model, tiny_images, epsilon=0, random_start=True)
    assert torch.equal(result.adversarial, tiny_images)


@pytest.mark.parametrize("method", METHODS)
def test_success_is_the_success_of_the_8bit_image(method, tiny_model, tiny_images):
    """Reported success must hold for the rounded image a PNG stores: rounding cannot undo it."""
    more = {"queries": 3000} if method == "square" else {}  # a random search towards one class of 1000
    result = attack(method, tiny_model, tiny_images, epsilon=64, steps=20, **more)
    assert result.success.any(), "a budget of 64 levels should fool a random tiny model at least once"
    saved = to_tensor(to_uint8(result.adversarial))
    predictions = predict(tiny_model, saved).argmax(dim=1)
    assert torch.equal(predictions == TARGET, result.success)
    assert torch.equal(predictions, result.predictions)


@pytest.mark.parametrize("method", ["pgd", "mifgsm", "sgd", "cw"])
def test_untargeted_moves_away_from_the_true_class(method, tiny_model, tiny_images):
    clean = predict(tiny_model, tiny_images).argmax(dim=1)
    result = attack(method, tiny_model, tiny_images, labels=clean, targeted=False, epsilon=32, steps=20)
    assert result.success.any()
    after = predict(tiny_model, result.adversarial).argmax(dim=1)
    assert torch.equal(after != clean, result.success)


@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_result(method, tiny_model, tiny_images):
    first = attack(method, tiny_model, tiny_images, random_start=True, restarts=2, seed=3)
    second = attack(method, make_tiny_model(), tiny_images, random_start=True, restarts=2, seed=3)
    assert torch.equal(first.adversarial, second.adversarial)
    assert torch.equal(first.steps_used, second.steps_used)


def test_random_start_depends_on_the_seed(tiny_model, tiny_images):
    first = attack("pgd", tiny_model, tiny_images, random_start=True, seed=1, steps=1, epsilon=16, early_stop=False)
    second = attack("pgd", tiny_model, tiny_images, random_start=True, seed=2, steps=1, epsilon=16, early_stop=False)
    assert not torch.equal(first.adversarial, second.adversarial)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_one_at_a_time(method, tiny_model, tiny_images):
    labels = torch.tensor([1, 2, 3, 4])
    batch = attack(method, tiny_model, tiny_images, labels=labels, epsilon=16, random_start=True, restarts=2)
    for i in range(len(tiny_images)):
        alone = attack(method, tiny_model, tiny_images[i:i + 1], labels=labels[i:i + 1], epsilon=16,
                       random_start=True, restarts=2)
        assert torch.equal(alone.adversarial[0], batch.adversarial[i])
        assert alone.success[0] == batch.success[i]
        assert alone.steps_used[0] == batch.steps_used[i]


def test_early_stop_stops_and_can_be_turned_off(tiny_model, tiny_images):
    early = attack("pgd", tiny_model, tiny_images, epsilon=64, steps=40)
    assert early.success.any()
    assert (early.steps_used[early.success] < 40).all()
    full = attack("pgd", tiny_model, tiny_images, epsilon=64, steps=40, early_stop=False)
    assert not torch.equal(early.adversarial, full.adversarial)


def test_fgsm_is_one_step(tiny_model, tiny_images):
    result = attack("fgsm", tiny_model, tiny_images, steps=50, early_stop=False)
    assert (result.steps_used <= 1).all()


def test_restarts_only_help(tiny_model, tiny_images):
    labels = torch.tensor([5, 6, 7, 8])
    once = attack("pgd", tiny_model, tiny_images, labels=labels, epsilon=4, steps=5, random_start=True)
    more = attack("pgd", tiny_model, tiny_images, labels=labels, epsilon=4, steps=5, random_start=True, restarts=4)
    assert (more.success.int() >= once.success.int()).all()


def test_sgd_step_is_the_tutorials_sgd_on_normalized_r(tiny_model):
    """Our SGD on pixels equals torch.optim.SGD(lr 0.1, momentum 0.1) on r = delta / std, as in the tutorial."""
    sgd = SGD(tiny_model)
    std = tiny_model.std
    torch.manual_seed(0)
    delta, grads = torch.rand(1, 3, 8, 8) * 0.01, [torch.randn(1, 3, 8, 8) for _ in range(3)]
    r = torch.nn.Parameter(delta / std)
    optimizer = torch.optim.SGD([r], lr=0.1, momentum=0.1)
    state = sgd.init_state(delta)
    for grad in grads:
        r.grad = grad * std  # dL/dr when dL/ddelta = grad
        optimizer.step()
        delta = sgd.update(delta, grad, state)
        assert torch.allclose(delta, r.detach() * std, atol=1e-7)


def test_cw_reports_a_smaller_l2_than_pgd_at_the_same_cap(tiny_model, tiny_images):
    pgd = attack("pgd", tiny_model, tiny_images, epsilon=32, steps=30)
    cw = attack("cw", tiny_model, tiny_images, epsilon=32, steps=200, early_stop=False)
    both = pgd.success & cw.success
    assert both.any()
    _, pgd_l2 = perturbation_size(pgd.adversarial, tiny_images)
    _, cw_l2 = perturbation_size(cw.adversarial, tiny_images)
    assert (cw_l2[both] < pgd_l2[both]).all()
