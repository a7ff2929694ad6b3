"""Invariants every attack keeps, on a tiny model (milliseconds per step)."""
import inspect
import math
import re
import numpy as np
import pytest
import torch

from utils.images import to_tensor, to_uint8
from utils.models import predict
from tests.conftest import make_tiny_model
from utils.attacks import (APGD, ATTACKS, AttackResult, SGD, SquareDraws, apgd_checkpoints, dlr, make_attack,
                           perturbation_size, square_fraction, square_side)
from utils.attacks.square import move_mass, square_pattern

METHODS = sorted(ATTACKS)
TARGET = 1
# the tiny model's random logits are flat and its input gradients small: the tutorial's SGD step and CW's
# misclassification weight, tuned for ImageNet models, need scaling up here, and a random search needs more queries
# than a gradient attack needs steps
OWN = {"cw": {"c": 100.0}, "sgd": {"lr": 300.0}, "square": {"queries": 300}}


def attack(method, model, images, labels=None, ids=None, **options):
    labels = torch.full((len(images),), TARGET) if labels is None else labels
    options.setdefault("epsilon", 8)
    options.setdefault("steps", 10)
    options = {**OWN.get(method, {}), **options}
    return make_attack(method, model, **options)(images, labels, ids)


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


# FAB-T is built to measure untargeted robustness: targeted to one class of 1000 near-equal random logits, its single
# linearized boundary (target against the strongest other class) keeps meeting a new rival and does not get there,
# so its success of the 8-bit image is checked untargeted, in test_attack_norms.py
@pytest.mark.parametrize("method", [method for method in METHODS if method != "fab"])
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
    """An image alone, with its position in the run as its id, gets what it gets in the batch (Square draws per id)."""
    labels = torch.tensor([1, 2, 3, 4])
    batch = attack(method, tiny_model, tiny_images, labels=labels, epsilon=16, random_start=True, restarts=2)
    for i in range(len(tiny_images)):
        alone = attack(method, tiny_model, tiny_images[i:i + 1], labels=labels[i:i + 1], ids=[i], epsilon=16,
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


def test_restarts_keep_the_successes_and_retry_the_failures_from_new_starts(tiny_model, tiny_images):
    labels = torch.tensor([5, 6, 7, 8])
    once = attack("pgd", tiny_model, tiny_images, labels=labels, epsilon=8, steps=5, random_start=True)
    more = attack("pgd", tiny_model, tiny_images, labels=labels, epsilon=8, steps=5, random_start=True, restarts=4)
    kept, retried = once.success, ~once.success
    assert kept.any() and retried.any(), "the setting must leave both successes and failures to the first run"
    assert torch.equal(more.adversarial[kept], once.adversarial[kept]), "a success is not attacked again"
    assert (more.adversarial[retried] != once.adversarial[retried]).flatten(1).any(dim=1).all(), \
        "every failure is tried again from another random start"


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


# ---- APGD, APGD-T, Square -----------------------------------------------------------------------------------------

def test_default_step_has_a_floor_of_a_quarter_level(tiny_model):
    """Madry's 2.5 * epsilon / steps is kept where it is larger; below a quarter level it would starve on the lattice."""
    assert make_attack("pgd", tiny_model, epsilon=1, steps=100).alpha * 255 == pytest.approx(0.25)
    assert make_attack("mifgsm", tiny_model, epsilon=1, steps=100).alpha * 255 == pytest.approx(0.25)
    assert make_attack("pgd", tiny_model, epsilon=8, steps=10).alpha * 255 == pytest.approx(2.0)
    assert make_attack("mifgsm", tiny_model, epsilon=8, steps=10).alpha * 255 == pytest.approx(0.8)
    assert make_attack("pgd", tiny_model, epsilon=1, steps=100, alpha=0.1).alpha * 255 == pytest.approx(0.1)


def test_make_attack_routes_the_new_arguments(tiny_model):
    extra = dict(loss="dlr", target_classes=3, queries=7, epsilon=4, steps=10)
    assert make_attack("apgd", tiny_model, **extra).objective == "dlr"
    assert make_attack("apgd-t", tiny_model, **extra).target_classes == 3
    assert make_attack("square", tiny_model, **extra).queries == 7
    assert make_attack("square", tiny_model, epsilon=4, steps=12).queries == 12, "without --queries: the steps"
    assert make_attack("pgd", tiny_model, **extra).alpha * 255 == pytest.approx(1.0), "others drop what they don't take"


def test_apgd_checkpoints_are_the_papers():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06))
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(10) == [3, 5, 6, 7, 8, 9, 10]


def test_dlr_formulas():
    logits = torch.tensor([[5.0, 3.0, 2.0, 1.0, 0.0]])
    # untargeted, true class 0: (z_0 - max other) / (z_1st - z_3rd) = (5 - 3) / (5 - 2)
    assert dlr(logits, torch.tensor([0])).item() == pytest.approx(2 / 3)
    # targeted, true 0, target 3: (z_0 - z_3) / (z_1st - (z_3rd + z_4th) / 2) = (5 - 1) / (5 - 1.5)
    assert dlr(logits, torch.tensor([0]), torch.tensor([3])).item() == pytest.approx(4 / 3.5)


class FixedLossAPGD:
    """Drive APGD's update with chosen per-step losses and random gradients, as the shared loop would."""

    def __init__(self, model, steps=10, epsilon=8):
        self.attack = make_attack("apgd", model, epsilon=epsilon, steps=steps)
        self.attack.original = torch.full((1, 3, 8, 8), 0.5)
        self.state = self.attack.init_state(None)
        self.delta = torch.zeros(1, 3, 8, 8)
        self.generator = torch.Generator().manual_seed(0)

    def step(self, loss):
        grad = torch.randn(1, 3, 8, 8, generator=self.generator)
        before = self.delta
        self.delta = self.attack.project(self.attack.update(self.delta, grad, self.state, torch.tensor([loss])),
                                         self.attack.original)
        return before, grad

    def eta_levels(self):
        return self.state["eta"].item() * 255


def test_apgd_halves_its_step_when_the_loss_stalls_and_restarts_from_the_best(tiny_model):
    run = FixedLossAPGD(tiny_model)  # checkpoints at steps 3, 5, 6, ...
    run.step(1.0)
    assert run.eta_levels() == pytest.approx(16), "APGD starts at 2 * epsilon"
    best_delta, best_grad = run.step(0.5)  # the best point: step 1
    run.step(0.9)
    state_before = dict(run.state)
    _, _ = run.step(0.9)  # step 3 is a checkpoint: 1 improvement in 3 steps < 0.75 * 3
    assert run.eta_levels() == pytest.approx(8)
    # the step from the checkpoint was taken from the best point with the best point's gradient
    attack = run.attack
    z = attack.project(best_delta - 8 / 255 * best_grad.sign(), attack.original)
    expected = attack.project(best_delta + 0.75 * (z - best_delta) + 0.25 * (best_delta - state_before["previous"]),
                              attack.original)
    assert torch.allclose(run.delta, expected, atol=1e-7)


def test_apgd_keeps_its_step_while_the_loss_keeps_falling(tiny_model):
    run = FixedLossAPGD(tiny_model)
    for step in range(10):
        run.step(10.0 - step)
    assert run.eta_levels() == pytest.approx(16)


def test_apgd_halves_at_a_checkpoint_without_progress_even_when_it_did_not_oscillate(tiny_model):
    """The second condition: step not halved at the last checkpoint and the best loss unchanged since it."""
    run = FixedLossAPGD(tiny_model, steps=100)  # checkpoints 22, 41, ...
    losses = [5.0 - 0.1 * step for step in range(23)]  # keeps falling to the first checkpoint: no halving
    for loss in losses:
        run.step(loss)
    assert run.eta_levels() == pytest.approx(16)
    # then a saw-tooth above the best: the loss falls in 4 steps of 5 (no oscillation), but never beats the best
    later = [4.0 - 0.1 * (step % 5) for step in range(19)]
    falls = sum(b < a for a, b in zip([losses[-1]] + later, later))
    assert falls >= 0.75 * 19, "the first condition must not fire here"
    for loss in later:
        run.step(loss)
    assert run.eta_levels() == pytest.approx(8)


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_fools_the_tiny_model_both_ways(loss, tiny_model, tiny_images):
    clean = predict(tiny_model, tiny_images).argmax(dim=1)
    untargeted = attack("apgd", tiny_model, tiny_images, labels=clean, targeted=False, epsilon=8, loss=loss)
    assert untargeted.success.all()
    targeted = attack("apgd", tiny_model, tiny_images, epsilon=64, steps=20, loss=loss)
    assert targeted.success.any()
    saved = predict(tiny_model, to_tensor(to_uint8(targeted.adversarial))).argmax(dim=1)
    assert torch.equal(saved == TARGET, targeted.success)


def test_apgd_t_runs_towards_each_top_class_on_the_images_still_standing(tiny_model, tiny_images, monkeypatch):
    """Planted outcomes: image 0 falls to the 1st target, image 3 to the 2nd, image 1 to the 3rd, image 2 to none."""
    clean_logits = predict(tiny_model, tiny_images)
    true = clean_logits.argmax(dim=1)
    ranked = clean_logits.scatter(1, true.view(-1, 1), float("-inf")).topk(4, dim=1).indices
    falls_at = {0: 0, 3: 1, 1: 2}
    calls = []

    def planted_run(self, images, pairs, ids=None):
        which = [next(i for i in range(len(tiny_images)) if torch.equal(image, tiny_images[i])) for image in images]
        rank = len(calls)
        calls.append((which, pairs.clone()))
        success = torch.tensor([falls_at.get(i) == rank for i in which])
        predictions = torch.where(success, pairs[:, 1], pairs[:, 0])
        return AttackResult(images + rank / 255, success, torch.full((len(images),), 10 + rank), predictions)

    monkeypatch.setattr(APGD, "__call__", planted_run)
    result = attack("apgd-t", tiny_model, tiny_images, labels=true, targeted=False, target_classes=4)
    assert [which for which, _ in calls] == [[0, 1, 2, 3], [1, 2, 3], [1, 2], [2]], "only the images still standing"
    for rank, (which, pairs) in enumerate(calls):
        assert torch.equal(pairs[:, 0], true[which])
        assert torch.equal(pairs[:, 1], ranked[which, rank]), f"run {rank} targets the rank-{rank} other class"
    assert result.success.tolist() == [True, True, False, True]
    assert result.steps_used.tolist() == [10, 12, 13, 11], "each image keeps what its deciding (or last) run gave"
    assert torch.equal(result.adversarial[1], tiny_images[1] + 2 / 255)
    assert result.predictions.tolist() == [ranked[0, 0], ranked[1, 2], true[2], ranked[3, 1]]


def test_apgd_t_success_is_any_class_but_the_true_one_on_the_8bit_image(tiny_model, tiny_images):
    true = predict(tiny_model, tiny_images).argmax(dim=1)
    result = attack("apgd-t", tiny_model, tiny_images, labels=true, targeted=False, epsilon=1, steps=2)
    assert result.success.any()
    saved = predict(tiny_model, to_tensor(to_uint8(result.adversarial))).argmax(dim=1)
    assert torch.equal(saved != true, result.success)


def test_apgd_t_runs_the_later_targets_only_on_what_the_first_left_standing(tiny_model):
    images = torch.from_numpy(np.random.default_rng(1).integers(0, 256, size=(8, 3, 32, 32))).float() / 255
    true = predict(tiny_model, images).argmax(dim=1)
    one = attack("apgd-t", tiny_model, images, labels=true, targeted=False, epsilon=1, steps=2, target_classes=1)
    nine = attack("apgd-t", tiny_model, images, labels=true, targeted=False, epsilon=1, steps=2)
    fooled, standing = one.success, ~one.success
    assert fooled.any() and standing.any(), "the setting must leave both to the first target"
    assert torch.equal(nine.adversarial[fooled], one.adversarial[fooled]), "the first target's run is the same run"
    assert (nine.adversarial[standing] != one.adversarial[standing]).flatten(1).any(dim=1).all(), \
        "an image the first target left standing is attacked towards the next ones"


def test_apgd_t_targeted_is_one_run_towards_the_target(tiny_model, tiny_images):
    result = attack("apgd-t", tiny_model, tiny_images, epsilon=64, steps=20)
    assert result.success.any()
    saved = predict(tiny_model, to_tensor(to_uint8(result.adversarial))).argmax(dim=1)
    assert torch.equal(saved == TARGET, result.success)


class NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("backward was called")


class ForwardOnly(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(NoBackward.apply(x))


@pytest.fixture
def forward_only_model():
    model = make_tiny_model()
    model.net = ForwardOnly(model.net)
    return model


def test_square_never_calls_backward(forward_only_model, tiny_images):
    clean = predict(forward_only_model, tiny_images).argmax(dim=1)
    result = attack("square", forward_only_model, tiny_images, labels=clean, targeted=False, epsilon=8, queries=200)
    assert result.success.any()
    with pytest.raises(AssertionError, match="backward was called"):  # the model does catch a gradient attack
        attack("pgd", forward_only_model, tiny_images, labels=clean, targeted=False)


def test_square_reports_its_queries(tiny_model, tiny_images):
    clean = predict(tiny_model, tiny_images).argmax(dim=1)
    result = attack("square", tiny_model, tiny_images, labels=clean, targeted=False, epsilon=2, queries=50)
    assert ((result.steps_used >= 1) & (result.steps_used <= 50)).all()
    assert (result.steps_used[~result.success] == 50).all(), "a failure spends the whole budget"
    assert result.success.any() and not result.success.all(), "pick a budget where the check means something"
    saved = predict(tiny_model, to_tensor(to_uint8(result.adversarial))).argmax(dim=1)
    assert torch.equal(saved != clean, result.success)
    stripes_only = attack("square", tiny_model, tiny_images, labels=clean, targeted=False, epsilon=2, queries=1)
    assert (stripes_only.steps_used == 1).all()
    levels = (stripes_only.adversarial - tiny_images) * 255
    inside = (tiny_images * 255 >= 2) & (tiny_images * 255 <= 253)
    assert torch.equal(levels[inside].abs().round(), torch.full_like(levels[inside], 2)), "stripes of +-epsilon"
    # one sign per channel and column: vertical stripes
    highest = torch.where(inside, levels.sign(), -2.0).amax(dim=2)  # over rows, per image, channel and column
    lowest = torch.where(inside, levels.sign(), 2.0).amin(dim=2)
    assert ((highest == lowest) | ~inside.any(dim=2)).all()


def test_square_p_schedule_is_the_papers_rescaled():
    assert square_fraction(0.05, 0, 10000) == 0.05
    assert square_fraction(0.05, 10, 10000) == 0.05
    assert square_fraction(0.05, 11, 10000) == 0.025
    assert square_fraction(0.05, 9000, 10000) == pytest.approx(0.05 / 512)
    assert square_fraction(0.05, 1, 100) == pytest.approx(0.05 / 4), "query 1 of 100 is iteration 100 of 10000"


@pytest.mark.parametrize("queries", [300, 1000, 10000])
def test_square_schedule_and_side_are_the_references(queries):
    """Our share and side per iteration equal those of the reference implementation (pyautoattack's square.py, the
    Linf branch: p_selection with the schedule rescaled to n_queries, then s = round(sqrt(p * h * w)) in [1, h])."""
    square = pytest.importorskip("pyautoattack.square")
    reference = square.SquareAttack(lambda x: x, n_queries=queries, p_init=0.8, eps=2 / 255)
    for iteration in range(queries):
        p = reference.p_selection(iteration)
        assert square_fraction(0.8, iteration, queries) == p, iteration
        side = min(max(int(round(math.sqrt(p * 3 * 224 * 224 / 3))), 1), 224)
        assert square_side(0.8, iteration, queries, 224, 224) == side, iteration


def test_square_default_p_init_is_the_references(tiny_model, tiny_images):
    """Our default p_init is the one the reference's SquareAttack takes by default (read from its signature), and
    it is the one the attack draws with: the default attack's images equal those of an attack given the reference's
    value, and differ from those of another value."""
    square = pytest.importorskip("pyautoattack.square")
    reference = inspect.signature(square.SquareAttack).parameters["p_init"].default
    labels = predict(tiny_model, tiny_images).argmax(dim=1)
    options = dict(labels=labels, targeted=False, epsilon=2, queries=20, ids=[0, 1, 2, 3])
    default = attack("square", tiny_model, tiny_images, **options)
    assert not default.success.all(), "a failure runs every query: each query's square is drawn"
    given = attack("square", tiny_model, tiny_images, p_init=reference, **options)
    assert torch.equal(default.adversarial, given.adversarial) and torch.equal(default.steps_used, given.steps_used)
    other = attack("square", tiny_model, tiny_images, p_init=reference / 16, **options)
    assert not torch.equal(default.adversarial, other.adversarial), "p_init must change the squares drawn"


def test_square_image_draws_the_same_alone_or_in_any_batch(tiny_model, tiny_images):
    """What an image gets depends on its id, not on its batch: the same alone, in a batch, in another order."""
    labels = predict(tiny_model, tiny_images).argmax(dim=1)
    options = dict(labels=labels, targeted=False, epsilon=2, queries=40)
    batch = attack("square", tiny_model, tiny_images, ids=[10, 11, 12, 13], **options)
    assert not batch.success.all(), "a failure runs every query: the check means more"
    shuffled = attack("square", tiny_model, tiny_images[[2, 0]], **{**options, "labels": labels[[2, 0]]}, ids=[12, 10])
    for row, i in enumerate([2, 0]):
        assert torch.equal(shuffled.adversarial[row], batch.adversarial[i])
        assert shuffled.steps_used[row] == batch.steps_used[i]
    alone = attack("square", tiny_model, tiny_images[3:], **{**options, "labels": labels[3:]}, ids=[13])
    assert torch.equal(alone.adversarial[0], batch.adversarial[3])
    other_id = attack("square", tiny_model, tiny_images[3:], **{**options, "labels": labels[3:]}, ids=[14])
    assert not torch.equal(other_id.adversarial[0], batch.adversarial[3]), "another id, other draws"


def test_square_windows_differ_between_images_of_a_batch(tiny_model, tiny_images):
    """Four copies of one image in one batch: with draws shared by the batch they would end alike."""
    copies = tiny_images[:1].repeat(4, 1, 1, 1)
    labels = predict(tiny_model, copies).argmax(dim=1)
    stripes = attack("square", tiny_model, copies, labels=labels, targeted=False, epsilon=8, queries=1)
    after = attack("square", tiny_model, copies, labels=labels, targeted=False, epsilon=8, queries=2,
                   early_stop=False)
    moved = (after.adversarial != stripes.adversarial).any(dim=1)  # (4, H, W): the one window each image kept
    for i in range(4):
        for j in range(i):
            assert not torch.equal(stripes.adversarial[i], stripes.adversarial[j]), "stripes drawn per image"
            assert not (moved[i].any() and moved[j].any() and torch.equal(moved[i], moved[j])), "windows per image"
    assert moved.any(), "at least one image kept its first window (a larger one reads as more)"
    windows = SquareDraws(0, 0, torch.arange(4), 3, 8)
    tops, lefts, _ = windows.window(0)
    assert len(set(zip(tops.tolist(), lefts.tolist()))) == 4


def test_square_l2_moves_mass_as_the_references_masked_step():
    """The L2 query on two windows only equals the reference's step written over whole images with masks (pyautoattack's
    square.py, L2: the first window gets the pattern plus its own mass, rescaled per channel to the mass of both
    windows plus a share of what the whole lacks of epsilon; the second window is zeroed), overlapping windows
    included, up to float rounding."""
    generator = torch.Generator().manual_seed(3)
    batch, channels, height, width, side, epsilon = 6, 3, 12, 12, 5, 3.0
    delta = torch.randn(batch, channels, height, width, generator=generator)
    delta *= 0.8 * epsilon / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # inside: the whole lacks some epsilon
    corner = [torch.randint(0, height - side + 1, (batch,), generator=generator) for _ in range(4)]
    corner[0][:2], corner[1][:2] = 2, 3
    corner[2][:2], corner[3][:2] = corner[0][:2] + 1, corner[1][:2] + 2  # two pairs that overlap
    shape = torch.where(torch.rand(batch, 1, 1, generator=generator) > 0.5, square_pattern(side).t(), square_pattern(side))
    signs = torch.where(torch.rand(batch, channels, 1, 1, generator=generator) > 0.5, 1.0, -1.0)

    def mask(top, left):
        field = torch.zeros(batch, 1, height, width, dtype=torch.bool)
        for row in range(batch):
            field[row, :, top[row]:top[row] + side, left[row]:left[row] + side] = True
        return field
    first, second = mask(corner[0], corner[1]), mask(corner[2], corner[3])
    fresh = torch.zeros(batch, 1, height, width)
    for row in range(batch):
        fresh[row, :, corner[0][row]:corner[0][row] + side, corner[1][row]:corner[1][row] + side] = shape[row]
    in_first = (delta * first).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    in_both = (delta * (first | second)).pow(2).sum(dim=(2, 3), keepdim=True).sqrt()
    whole = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    moved = fresh * signs + delta * first / (in_first + 1e-12)
    moved = moved / (moved.pow(2).sum(dim=(2, 3), keepdim=True).sqrt() + 1e-12)
    moved = moved * ((epsilon ** 2 - whole ** 2).clamp_min(0) / channels + in_both ** 2).sqrt()
    expected = torch.where(first, moved, torch.where(second, 0.0, delta))
    ours = move_mass(delta.clone(), shape, signs, corner, side, epsilon)
    assert torch.allclose(ours, expected, atol=1e-6)
    assert torch.allclose(ours.flatten(1).norm(dim=1), torch.full((batch,), epsilon), rtol=1e-5)  # back at epsilon


def test_square_seed_changes_the_draws(tiny_model, tiny_images):
    labels = predict(tiny_model, tiny_images).argmax(dim=1)
    runs = [attack("square", tiny_model, tiny_images, labels=labels, targeted=False, epsilon=4, queries=10,
                   early_stop=False, seed=seed) for seed in (0, 1, 0)]
    assert torch.equal(runs[0].adversarial, runs[2].adversarial), "same seed, same images"
    for i in range(len(tiny_images)):
        assert not torch.equal(runs[0].adversarial[i], runs[1].adversarial[i]), f"image {i}: another seed, other draws"


@pytest.mark.parametrize("method", ["apgd", "apgd-t", "square"])
def test_a_budget_under_one_level_returns_the_input(method, tiny_model, tiny_images):
    clean = predict(tiny_model, tiny_images).argmax(dim=1)
    for targeted, labels in ((True, None), (False, clean)):
        result = attack(method, tiny_model, tiny_images, labels=labels, targeted=targeted, epsilon=0.6)
        assert torch.equal(result.adversarial, tiny_images)


# ---- steps 5 and 7 from the shell ---------------------------------------------------------------------------------

@pytest.mark.parametrize("script, flags, named", [
    ("step_5_perturb.py", ["--method", "apgd-t", "--target-classes", "0"], "--target-classes"),
    ("step_5_perturb.py", ["--method", "apgd-t", "--target-classes", "1000"], "--target-classes"),
    ("step_5_perturb.py", ["--method", "square", "--queries", "0"], "--queries"),
    ("step_5_perturb.py", ["--method", "square", "--queries", "many"], "--queries"),
    ("step_5_perturb.py", ["--method", "apgd", "--loss", "hinge"], "--loss"),
    ("step_5_perturb.py", ["--method", "apgd-x"], "--method"),
    ("step_7_break_defense.py", ["--method", "square", "--queries", "-3"], "--queries"),
])
def test_bad_attack_flags_are_one_line_exit_2(script, flags, named, tmp_path):
    from tests.conftest import GRACE_HOPPER, OFFLINE, run_in_process
    result = run_in_process(script, GRACE_HOPPER, "--model", OFFLINE, *flags, cwd=tmp_path)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr, result.stderr
    assert not (tmp_path / "outputs").exists()


def sample_photo(name):
    from utils.samples import sample_paths
    return next(path for path in sample_paths() if path.name == name)


def saved_class(path, model):
    from utils.models import predict_images, prepare_image
    return predict_images(model, [prepare_image(path, model)])[0]


def saved_linf(path, original_path, model):
    import numpy as np
    from PIL import Image
    from utils.models import prepare_image
    saved = np.asarray(Image.open(path).convert("RGB"), dtype=int)
    return int(np.abs(saved - prepare_image(original_path, model).astype(int)).max())


@pytest.mark.smoke
def test_step5_apgd_reaches_goldfish_on_a_sample_photo(tmp_path, offline_model):
    from tests.conftest import OFFLINE, run_script
    photo = sample_photo("chelsea.png")
    result = run_script("step_5_perturb.py", photo, "--method", "apgd", "--model", OFFLINE, "--epsilon", "4",
                        cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout.splitlines()
    assert out[0] == "Target class: goldfish, Carassius auratus"
    assert "New prediction: goldfish, Carassius auratus" in out
    saved = tmp_path / "outputs" / "adversarial.png"
    assert saved_class(saved, offline_model) == 1, "judged on the PNG read back"
    assert saved_linf(saved, photo, offline_model) <= 4


def test_step5_square_untargeted_reports_queries(tmp_path, offline_model):
    from tests.conftest import OFFLINE, run_script
    photo = sample_photo("astronaut.png")  # falls within a few queries at 4 levels; coffee.png holds out
    clean = saved_class(photo, offline_model)
    result = run_script("step_5_perturb.py", photo, "--method", "square", "--untargeted", "--queries", "40",
                        "--epsilon", "4", "--model", OFFLINE, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    used = [line for line in result.stdout.splitlines() if line.startswith("Queries used: ")]
    assert len(used) == 1 and 1 <= int(used[0].split()[2]) <= 40, result.stdout
    saved = tmp_path / "outputs" / "adversarial.png"
    assert saved_class(saved, offline_model) != clean, "judged on the PNG read back"
    assert saved_linf(saved, photo, offline_model) <= 4


@pytest.mark.smoke
def test_step7_counts_squares_budget_in_queries(tmp_path):
    """Square's `steps_used` are queries: step 7 says so, as step 5 does (budget_unit), instead of calling them steps."""
    from tests.conftest import OFFLINE, run_script
    result = run_script("step_7_break_defense.py", sample_photo("astronaut.png"), "--method", "square", "--queries",
                        "5", "--epsilon", "4", "--model", OFFLINE, cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    adaptive = next(line for line in result.stdout.splitlines() if line.startswith("Adaptive attack:"))
    assert re.search(r"\(\d+ queries\)$", adaptive), adaptive


@pytest.mark.parametrize("method", ["square", "pgd"])
def test_step5_gives_an_image_the_same_whatever_the_batch_size(method, tiny_model, tiny_images):
    """Step 5 passes each photo's position in its list as its id: --batch-size changes how the work is cut, not what
    Square draws for a photo."""
    from step_5_perturb import attack_images, get_args_parser
    images = to_uint8(tiny_images)
    labels = predict(tiny_model, tiny_images).argmax(dim=1).tolist()
    results = []
    for batch_size in (1, 3):
        args = get_args_parser().parse_args(["photos", "--method", method, "--untargeted", "--epsilon", "4",
                                             "--steps", "30", "--batch-size", str(batch_size), "--random-start"])
        results.append(attack_images(tiny_model, images, labels, args))
    (first, first_steps), (second, second_steps) = results
    assert all((a == b).all() for a, b in zip(first, second)) and first_steps == second_steps
