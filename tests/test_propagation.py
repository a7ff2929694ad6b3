"""The tensor bound propagation (utils.certify.propagation): sound at every point tried, on random small conv nets with
max and average pools; interval <= CROWN <= alpha-CROWN; the logits themselves at epsilon 0; CROWN over every neuron
equal to the NumPy CROWN of utils.certify.bounds (the dense reference it replaced); the training network's layers
(live parameters) equal to the graph's; float32 with its slack below float64; the same bounds whatever the block size;
a gradient through the bound that finite differences confirm."""
import numpy as np
import pytest
import torch
from torch import nn

from utils.certify import bounds as dense
from utils.certify import propagation
from utils.certify.network import evaluate, extract_layers
from utils.certify.propagation import Box, Net, layer_bounds, margin_bounds
from utils.cli import UsageError
from utils.models import Classifier, Preprocessing

SIDE = 8


def random_classifier(seed, pool="max"):
    torch.manual_seed(seed)
    pooling = nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), pooling, nn.Conv2d(4, 6, 3, padding=1, stride=2),
                        nn.ReLU(), nn.MaxPool2d(2, stride=1), nn.Flatten(), nn.Linear(6, 12), nn.ReLU(),
                        nn.Linear(12, 5))
    preprocessing = Preprocessing(SIDE, torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3]))
    return Classifier(net, preprocessing, f"random{seed}").eval()


def random_image(seed):
    return np.random.default_rng(seed).integers(0, 256, (SIDE, SIDE, 3)).astype(np.uint8)


def points_in(ball, count, seed):
    """Points of the ball: its corners (L-infinity) or sparse moves spending the budget (L1), on the lattice."""
    rng = np.random.default_rng(seed)
    n = len(ball.center)
    if ball.norm == "Linf":
        picks = rng.integers(0, 3, (count, n))
        points = np.where(picks == 0, ball.lower, np.where(picks == 1, ball.upper, ball.center))
        return np.clip(np.round(points * 255) / 255, ball.lower, ball.upper)
    out = []
    for _ in range(count):
        point, left = ball.center.copy(), ball.budget
        for index in rng.permutation(n)[:4]:
            move = min(left, rng.uniform(0, ball.budget))
            point[index] = np.clip(point[index] + rng.choice([-1, 1]) * move, 0, 1)
            left -= abs(point[index] - ball.center[index])
        out.append(point)
    return np.array(out)


CASES = [("Linf", 6.0), ("Linf", 20.0), ("L1", 0.3), ("L1", 1.5)]


@pytest.mark.parametrize("pool", ["max", "avg"])
@pytest.mark.parametrize("norm, epsilon", CASES)
def test_every_point_tried_is_within_the_bounds(norm, epsilon, pool):
    for seed in range(3):
        model = random_classifier(seed, pool)
        network = extract_layers(model, (3, SIDE, SIDE))
        net = Net.from_layers(network)
        ball = dense.make_ball(random_image(seed), norm, epsilon)
        box = Box.from_balls([ball])
        points = points_in(ball, 200, seed)
        label = int(np.argmax(evaluate(network, ball.center[None])[0]))
        for method in ("interval", "crown"):
            bounds = layer_bounds(net, box, method)
            values = torch.as_tensor(points)
            for layer, (lower, upper) in zip(net.layers, bounds[1:]):
                values = propagation.apply(layer, values)
                assert (values >= lower - 1e-9).all() and (values <= upper + 1e-9).all()
            logits = values.numpy()
            margins = logits[:, [label]] - logits
            for kind in (("interval",) if method == "interval" else ("crown", "alpha-crown")):
                floor = margin_bounds(net, box, [label], bounds, kind)[0].numpy()
                others = np.arange(len(floor)) != label
                assert (margins[:, others] >= floor[others] - 1e-9).all(), (kind, (margins - floor)[:, others].min())


@pytest.mark.parametrize("norm, epsilon", CASES)
def test_interval_crown_alpha_crown_each_at_least_the_one_before(norm, epsilon):
    tighter = 0
    for seed in range(4):
        net = Net.from_layers(extract_layers(random_classifier(seed), (3, SIDE, SIDE)))
        image = random_image(seed)
        box = Box.from_balls([dense.make_ball(image, norm, epsilon)])
        label = seed % 5
        found = [margin_bounds(net, box, [label], layer_bounds(net, box, "interval" if kind == "interval" else
                                                                "crown"), kind) for kind in propagation.METHODS]
        assert (found[0] <= found[1]).all() and (found[1] <= found[2]).all()
        tighter += int((found[2] > found[1] + 1e-6).any())
    assert tighter > 0, "alpha-CROWN never improved on CROWN: its optimization does nothing"


def test_at_epsilon_zero_the_bounds_are_the_logits():
    model = random_classifier(0)
    network = extract_layers(model, (3, SIDE, SIDE))
    net = Net.from_layers(network)
    image = random_image(0)
    ball = dense.make_ball(image, "Linf", 0)
    logits = evaluate(network, ball.center[None])[0]
    for method in ("interval", "crown"):
        lower, upper = layer_bounds(net, Box.from_balls([ball]), method)[-1]
        assert np.allclose(lower[0].numpy(), logits, atol=1e-9) and np.allclose(upper[0].numpy(), logits, atol=1e-9)
        margins = margin_bounds(net, Box.from_balls([ball]), [1], layer_bounds(net, Box.from_balls([ball]), method),
                                method)[0].numpy()
        assert np.allclose(np.delete(margins, 1), np.delete(logits[1] - logits, 1), atol=1e-9)


@pytest.mark.parametrize("norm, epsilon", CASES)
def test_crown_on_every_neuron_is_the_dense_numpy_crown(norm, epsilon):
    for seed in range(2):
        network = extract_layers(random_classifier(seed), (3, SIDE, SIDE))
        net = Net.from_layers(network)
        ball = dense.make_ball(random_image(seed), norm, epsilon)
        reference = dense.layer_bounds(network, ball, "crown")
        ours = layer_bounds(net, Box.from_balls([ball]), "crown", neurons="all")
        for (low, high), (our_low, our_high) in zip(reference, ours):
            assert np.allclose(low, our_low[0].numpy(), atol=1e-10) and np.allclose(high, our_high[0].numpy(),
                                                                                   atol=1e-10)
        assert np.allclose(dense.margin_bounds(network, ball, 2, reference),
                           margin_bounds(net, Box.from_balls([ball]), [2], ours, "crown")[0].numpy(), atol=1e-10)
        # the neurons that matter only: never looser on the margins than every neuron here
        needed = margin_bounds(net, Box.from_balls([ball]), [2], layer_bounds(net, Box.from_balls([ball])), "crown")
        assert np.allclose(needed[0].numpy(), dense.margin_bounds(network, ball, 2, reference), atol=1e-10)


def test_the_training_networks_layers_give_the_graphs_bounds():
    model = random_classifier(1)
    network = extract_layers(model, (3, SIDE, SIDE))
    from_graph = Net.from_layers(network)
    from_module = Net.from_module(model.net.double(), (3, SIDE, SIDE), model.mean.double().view(-1),
                                  model.std.double().view(-1))
    box = Box.from_balls([dense.make_ball(random_image(1), "Linf", 8)])
    for method in propagation.METHODS:
        kind = "interval" if method == "interval" else "crown"
        graph = margin_bounds(from_graph, box, [3], layer_bounds(from_graph, box, kind), method)
        module = margin_bounds(from_module, box, [3], layer_bounds(from_module, box, kind), method)
        assert torch.allclose(graph, module, atol=1e-8), method


def test_float32_bounds_with_their_slack_enclose_the_float64_ones():
    for seed in range(3):
        network = extract_layers(random_classifier(seed), (3, SIDE, SIDE))
        ball = dense.make_ball(random_image(seed), "Linf", 12)
        exact = layer_bounds(Net.from_layers(network), Box.from_balls([ball]), "crown")
        single = layer_bounds(Net.from_layers(network, torch.float32), Box.from_balls([ball], torch.float32), "crown")
        for (low, high), (low32, high32) in zip(exact[1:], single[1:]):
            assert (low32.double() <= low).all() and (high32.double() >= high).all()


def test_the_block_size_changes_no_bound(monkeypatch):
    network = extract_layers(random_classifier(2), (3, SIDE, SIDE))
    net = Net.from_layers(network)
    box = Box.from_balls([dense.make_ball(random_image(2), "L1", 1.0)])
    whole = layer_bounds(net, box, "crown", neurons="all")
    monkeypatch.setattr(propagation, "BLOCK", 200)  # a few rows a pass
    for (low, high), (low_cut, high_cut) in zip(whole, layer_bounds(net, box, "crown", neurons="all")):
        assert torch.allclose(low, low_cut, atol=1e-12) and torch.allclose(high, high_cut, atol=1e-12)


def test_a_batch_of_images_gives_each_images_own_bounds():
    net = Net.from_layers(extract_layers(random_classifier(0), (3, SIDE, SIDE)))
    balls = [dense.make_ball(random_image(seed), "Linf", 8) for seed in range(3)]
    together = margin_bounds(net, Box.from_balls(balls), [0, 1, 2], layer_bounds(net, Box.from_balls(balls)), "crown")
    for index, ball in enumerate(balls):
        alone = margin_bounds(net, Box.from_balls([ball]), [index], layer_bounds(net, Box.from_balls([ball])), "crown")
        assert torch.allclose(together[index], alone[0], atol=1e-10)


def test_the_bound_is_differentiable_in_the_weights():
    """CROWN-IBP's loss needs d(bound)/d(weights): the autograd gradient against central finite differences."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 6),
                        nn.ReLU(), nn.Linear(6, 3)).double()
    box = Box.from_balls([dense.make_ball(random_image(0)[:4, :4], "Linf", 30)])

    def bound():
        layers = Net.from_module(net, (3, 4, 4))
        return margin_bounds(layers, box, [1], layer_bounds(layers, box, "interval"), "crown")[0, [0, 2]].sum()

    weight = net[4].weight
    value = bound()
    (gradient,) = torch.autograd.grad(value, weight)
    step = 1e-6
    for index in [(0, 0), (2, 5), (5, 7)]:
        with torch.no_grad():
            weight[index] += step
            up = bound().item()
            weight[index] -= 2 * step
            down = bound().item()
            weight[index] += step
        assert abs((up - down) / (2 * step) - gradient[index].item()) < 1e-4 * (1 + abs(gradient[index].item()))


def test_a_layer_the_bounds_cannot_cover_is_refused_by_name():
    with pytest.raises(UsageError, match="Sigmoid"):
        Net.from_module(nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Sigmoid()), (3, 2, 2))


# ---- certified training (step 9's ibp and crown-ibp) ----------------------------------------------------------

def test_the_ramp_moves_epsilon_and_the_weights_over_its_length():
    from utils.certified_training import Ramp
    assert Ramp.at("crown-ibp", 8, 0.0) == Ramp(0.0, 1.0, 1.0)
    assert Ramp.at("crown-ibp", 8, 0.25) == Ramp(2.0, 0.75, 0.875)
    assert Ramp.at("crown-ibp", 8, 3.0) == Ramp(8.0, 0.0, 0.5)
    assert Ramp.at("ibp", 8, 0.5) == Ramp(4.0, 0.0, 0.75)


def test_the_certified_loss_gradient_is_the_finite_difference():
    from utils.certified_training import Ramp, certified_loss
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(3, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3))
    model = Classifier(net, Preprocessing(4, torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.3, 0.3, 0.3])),
                       "tiny").double()
    pixels, targets = torch.rand(3, 3, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2])
    ramp = Ramp.at("crown-ibp", 20, 0.5)
    weight = net[0].weight
    (gradient,) = torch.autograd.grad(certified_loss(model, pixels, targets, ramp), weight)
    step = 1e-6
    for index in [(0, 0, 1, 1), (1, 2, 0, 2)]:
        with torch.no_grad():
            weight[index] += step
            up = certified_loss(model, pixels, targets, ramp).item()
            weight[index] -= 2 * step
            down = certified_loss(model, pixels, targets, ramp).item()
            weight[index] += step
        assert abs((up - down) / (2 * step) - gradient[index].item()) < 1e-5 * (1 + abs(gradient[index].item()))


def test_an_image_certified_in_training_is_not_fooled_by_pgd():
    from utils.attacks import make_attack
    from utils.certified_training import certified_accuracy, margin_floor
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 3))
    model = Classifier(net, Preprocessing(4, torch.tensor([0.5] * 3), torch.tensor([0.5] * 3)), "tiny").eval()
    pixels = torch.randint(0, 256, (40, 3, 4, 4)).float() / 255
    targets = model(pixels).argmax(dim=1)
    floor = margin_floor(model, pixels, targets, 6, 1.0).scatter(1, targets[:, None], torch.inf).min(dim=1).values
    proved = floor > 0
    assert 0 < proved.sum() < len(pixels), "the test needs some images proved and some not"
    assert certified_accuracy(model, pixels, targets, 6) == pytest.approx(proved.float().mean().item())
    fooled = make_attack("pgd", model, epsilon=6, steps=30, targeted=False, random_start=True, seed=0)(
        pixels, targets).success
    assert not (fooled & proved).any()


def test_sparse_rows_give_the_dense_rows_bounds(monkeypatch):
    """CROWN by local patches (scipy CSR rows, float64 on the CPU) against the dense vjp rows, every neuron."""
    network = extract_layers(random_classifier(3), (3, SIDE, SIDE))
    net = Net.from_layers(network)
    box = Box.from_balls([dense.make_ball(random_image(3), "Linf", 10)])
    assert propagation.sparse_rows_apply(net.layers, box)
    sparse_bounds = layer_bounds(net, box, "crown", neurons="all")
    monkeypatch.setattr(propagation, "sparse_rows_apply", lambda layers, box: False)
    for (low, high), (dense_low, dense_high) in zip(sparse_bounds, layer_bounds(net, box, "crown", neurons="all")):
        assert torch.allclose(low, dense_low, atol=1e-11) and torch.allclose(high, dense_high, atol=1e-11)


@pytest.mark.parametrize("method", ["interval", "crown"])
def test_a_sub_problems_bounds_hold_on_its_points_and_lie_within_the_roots(method):
    """Branch and bound's refinement: with some unstable ReLUs split, every sampled point of the box that meets the
    splits stays within the recomputed bounds, which lie within the root's (cut at the splits); an unsplit layer
    before the first split keeps the root's bounds exactly."""
    checked = 0
    for seed in range(4):
        model = random_classifier(seed)
        network = extract_layers(model, (3, SIDE, SIDE))
        net = Net.from_layers(network)
        ball = dense.make_ball(random_image(seed), "Linf", 20.0)
        box = Box.from_balls([ball])
        root = layer_bounds(net, box, "crown")
        relus = [index for index, layer in enumerate(net.layers) if isinstance(layer, propagation.ReLU)]
        rng = np.random.default_rng(seed)
        splits = {}
        for index in relus:
            lower, upper = root[index]
            signs = torch.zeros(2, lower.shape[1], dtype=torch.float64)
            unstable = torch.nonzero((lower[0] < 0) & (upper[0] > 0))[:, 0]
            if index != relus[0] and len(unstable):  # the first ReLU layer unsplit: its bounds must stay the root's
                picked = unstable[torch.as_tensor(rng.permutation(len(unstable))[:1])]
                signs[0, picked], signs[1, picked] = 1.0, -1.0
            splits[index] = signs
        sub_box = box.repeat(torch.tensor([2]))
        refined = layer_bounds(net, sub_box, method, prior=root, splits=splits)
        assert torch.equal(refined[relus[0]][0], root[relus[0]][0].expand(2, -1))
        points = torch.as_tensor(points_in(ball, 1000, seed))
        values, inputs = points, []
        for layer in net.layers:
            inputs.append(values)
            values = propagation.apply(layer, values)
        inputs.append(values)
        for problem in range(2):
            meets = torch.ones(len(points), dtype=torch.bool)
            for index in relus:
                sign = splits[index][problem]
                meets &= ((inputs[index] * sign) >= 0).all(dim=1)
            for position, (lower, upper) in enumerate(refined[1:], start=1):
                low, high = root[position]
                assert (lower[problem] >= low[0] - 1e-12).all() and (upper[problem] <= high[0] + 1e-12).all()
                inside = inputs[position][meets]
                assert (inside >= lower[problem] - 1e-9).all() and (inside <= upper[problem] + 1e-9).all()
            checked += int(meets.sum())
    assert checked > 100, "too few sampled points met the splits to test the refined bounds"
