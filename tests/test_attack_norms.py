"""The threat models of utils.attacks: L2 and L1 beside L-infinity.

- the exact projections onto the L2 and L1 balls intersected with [0, 1], against a convex solver on small vectors;
- the 8-bit lattice inside the ball on random cases: never over epsilon, whole levels, in [0, 255];
- FAB's projection onto a hyperplane inside the box, against a linear/convex solver;
- every attack in every norm it offers, judged on the PNG written and read back: within epsilon in its norm, pixels in
  range, the input unchanged, the same seed the same bytes; a norm a method lacks is refused in one line.
"""
import numpy as np
import pytest
import torch
from PIL import Image
from scipy.optimize import linprog, minimize

from utils.attacks import (ATTACKS, NORMS, Attack, hyperplane_step, lattice, make_attack, norms, perturbation_size,
                           projection)
from utils.attacks.projection import solve_capped_few
from utils.attacks.rows import whole_sums
from utils.cli import UsageError
from utils.files import save_image

EPSILONS = {"Linf": 8, "L2": 0.5, "L1": 6.0}
CASES = [(method, norm) for method, attack in ATTACKS.items() for norm in attack.norms]


def solve_projection(v, x, epsilon, norm):
    """argmin ||d - v||^2 over ||d||_norm <= epsilon, -x <= d <= 1 - x, by SLSQP on a smooth formulation (L1 with
    d = p - q, p, q >= 0)."""
    n = len(v)
    if norm == "L2":
        result = minimize(lambda d: ((d - v) ** 2).sum(), np.zeros(n), jac=lambda d: 2 * (d - v), method="SLSQP",
                          bounds=list(zip(-x, 1 - x)),
                          constraints=[{"type": "ineq", "fun": lambda d: epsilon ** 2 - (d ** 2).sum(),
                                        "jac": lambda d: -2 * d}], options=dict(ftol=1e-15, maxiter=1000))
        return result.x
    objective = lambda pq: ((pq[:n] - pq[n:] - v) ** 2).sum()  # noqa: E731
    gradient = lambda pq: np.concatenate([2 * (pq[:n] - pq[n:] - v), -2 * (pq[:n] - pq[n:] - v)])  # noqa: E731
    result = minimize(objective, np.zeros(2 * n), jac=gradient, method="SLSQP",
                      bounds=[(0, 1 - xi) for xi in x] + [(0, xi) for xi in x],
                      constraints=[{"type": "ineq", "fun": lambda pq: epsilon - pq.sum(), "jac": lambda pq: -np.ones(2 * n)}],
                      options=dict(ftol=1e-15, maxiter=1000))
    return result.x[:n] - result.x[n:]


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_the_ball_and_box_projection_is_exact(norm):
    rng = np.random.default_rng(1)
    project = projection.project_l2 if norm == "L2" else projection.project_l1
    for trial in range(40):
        n = int(rng.integers(2, 9))
        x, v = rng.random(n), rng.normal(size=n) * rng.choice([0.2, 1.0, 3.0])
        epsilon = float(rng.uniform(0.05, 1.5))
        ours = project(torch.tensor(v).view(1, -1), torch.tensor(x).view(1, -1), epsilon).numpy()[0]
        reference = solve_projection(v, x, epsilon, norm)
        assert np.abs(ours - reference).max() < 1e-6, (trial, ours, reference)
        assert norms.size(torch.tensor(ours).view(1, -1), norm).item() <= epsilon * (1 + 1e-9)
        assert (x + ours >= -1e-12).all() and (x + ours <= 1 + 1e-12).all()


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_a_point_inside_is_its_own_projection(norm):
    x = torch.rand(3, 3, 4, 4)
    v = (torch.rand(3, 3, 4, 4) - x) * 0.01
    assert torch.allclose(norms.project(v.clone(), x, 10.0, norm), v)


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_the_lattice_stays_inside_the_ball(norm):
    generator = torch.Generator().manual_seed(0)
    for trial in range(60):
        shape = (4, 3, 5, 5)
        original = torch.randint(0, 256, shape, generator=generator).double()
        epsilon = float(torch.rand(1, generator=generator)) * (2.0 if norm == "L2" else 12.0) + 0.01
        delta = norms.project((torch.rand(shape, generator=generator) - 0.5) * 0.4, original / 255, epsilon, norm)
        image = lattice.lattice_within(original, delta, norm, epsilon * 255)
        assert torch.equal(image, image.round()), "whole levels"
        assert image.min() >= 0 and image.max() <= 255
        steps = (image - original).flatten(1)
        sizes = steps.abs().sum(dim=1) if norm == "L1" else steps.pow(2).sum(dim=1).sqrt()
        assert (sizes <= epsilon * 255 * (1 + 1e-12)).all(), (trial, sizes, epsilon * 255)
        # each level differs from plain rounding by at most one, and only towards the original
        plain = (original + (delta * 255).round()).clamp(0, 255)
        assert ((image - plain).abs() <= 1).all() and ((image - original).abs() <= (plain - original).abs()).all()


def test_the_lattice_rounds_plainly_when_that_is_inside():
    original = torch.full((1, 3, 4, 4), 100.0)
    delta = torch.full((1, 3, 4, 4), 0.4 / 255)  # rounds to 0 everywhere
    assert torch.equal(lattice.lattice_within(original, delta, "L2", 1.0), original)


def test_the_lattice_pulls_back_a_rounding_that_goes_over():
    # 48 coordinates at 0.6 levels: L1 28.8 inside a budget of 30, but rounded up it would be 48
    original = torch.full((1, 3, 4, 4), 100.0)
    image = lattice.lattice_within(original, torch.full((1, 3, 4, 4), 0.6 / 255), "L1", 30.0)
    assert (image - original).abs().sum() == 30


# ---- the fast paths (no full sort) on rows as long as an image's, against rules written out plainly ----------------

def bisect(function, low, high, goal, decreasing=False):
    """Per row, the root of a monotone `function` (rows) = goal between low and high, by 200 halvings."""
    for _ in range(200):
        middle = (low + high) / 2
        below = (function(middle) > goal) if decreasing else (function(middle) < goal)
        low, high = torch.where(below, middle, low), torch.where(below, high, middle)
    return (low + high) / 2


def large_cases(generator, rows=6, shape=(3, 40, 40)):
    """Rows of 4,800 coordinates: images with saturated regions (where the box binds) and deltas dense, sparse and
    on a coarse grid (many equal values), at several scales."""
    original = torch.randint(0, 256, (rows, *shape), generator=generator).double() / 255
    original[:2, :, :10] = 0
    original[2:4, :, 10:20] = 1
    for scale in (0.002, 0.02, 0.2):
        delta = torch.randn((rows, *shape), generator=generator, dtype=torch.float64) * scale
        yield original, delta
        yield original, delta * (torch.rand(delta.shape, generator=generator) < 0.03)
        yield original, (delta / scale * 4).round() * scale / 4


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_large_rows_are_projected_exactly(norm):
    generator = torch.Generator().manual_seed(3)
    for original, delta in large_cases(generator):
        epsilon = 0.5 if norm == "L2" else 6.0
        ours = norms.project(delta.clone(), original, epsilon, norm).flatten(1)
        magnitude = delta.flatten(1).abs()
        room = torch.where(delta.flatten(1) > 0, 1 - original.flatten(1), original.flatten(1))
        if norm == "L2":  # d = min(t |delta|, room), t in [0, 1] where ||d|| = epsilon
            size = lambda t: torch.minimum(magnitude * t.view(-1, 1), room).pow(2).sum(dim=1).sqrt()  # noqa: E731
            t = bisect(size, torch.zeros(len(room), dtype=torch.float64), torch.ones(len(room), dtype=torch.float64),
                       epsilon)
            expected = torch.minimum(magnitude * torch.where(size(torch.ones_like(t)) > epsilon, t, 1).view(-1, 1), room)
        else:  # d = clip(|delta| - lambda, 0, room), lambda >= 0 where ||d||_1 = epsilon
            size = lambda lam: (magnitude - lam.view(-1, 1)).clamp(min=0).minimum(room).sum(dim=1)  # noqa: E731
            zero = torch.zeros(len(room), dtype=torch.float64)
            lam = bisect(size, zero, magnitude.amax(dim=1), epsilon, decreasing=True)
            expected = (magnitude - torch.where(size(zero) > epsilon, lam, 0).view(-1, 1)).clamp(min=0).minimum(room)
        assert torch.allclose(ours.abs(), expected, atol=1e-9), norm
        assert (norms.size(ours, norm) <= epsilon * (1 + 1e-9)).all()


def lattice_by_sorting(original_levels, delta, norm, budget):
    """The lattice rule written out with one stable sort of each whole row: coordinates in decreasing order of
    excess (ties in index order), the fewest moves back in that order; delta * 255 taken to the nearest float of
    delta's type."""
    target = (delta.flatten(1).double() * 255).to(delta.dtype).double()
    base = original_levels.flatten(1)
    steps = (base + target.round()).clamp(0, 255) - base
    limit = budget if norm == "L1" else budget ** 2
    for row in range(len(steps)):
        while True:
            s = steps[row]
            size = s.abs().sum() if norm == "L1" else s.pow(2).sum()
            if size <= limit:
                break
            excess = torch.where(s != 0, s.abs() - target[row].abs(), torch.tensor(float("-inf"), dtype=s.dtype))
            order = excess.argsort(descending=True, stable=True)
            gain = (s != 0).to(s.dtype) if norm == "L1" else (2 * s.abs() - 1).clamp(min=0)
            count = int((gain[order].cumsum(0) < size - limit).sum()) + 1
            s[order[:count]] -= s[order[:count]].sign()
            target[row] = s
    return base + steps


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_the_lattice_of_large_rows_is_the_rule(norm):
    generator = torch.Generator().manual_seed(4)
    for original, delta in large_cases(generator):
        epsilon = 0.5 if norm == "L2" else 6.0
        delta = norms.project(delta, original, epsilon, norm).float()
        levels = (original * 255).round().float()
        ours = lattice.lattice_within(levels, delta, norm, epsilon * 255).flatten(1)
        expected = lattice_by_sorting(levels.double(), delta, norm, epsilon * 255)
        assert torch.equal(ours.double(), expected), norm


@pytest.mark.parametrize("norm", ["L2", "L1"])
def test_the_lattice_is_the_rule_on_both_of_its_paths(norm, monkeypatch):
    """lattice_within reads its L2 moves off a partial sort of the largest excesses (ties at the cut included:
    coarse deltas have many), and fills whole rows in L1 and where one level back on every coordinate cannot reach
    the budget (a delta far over it: the fill's further passes): the rule either way, on float32 deltas as the
    attacks give them, each path taken."""
    filled = []
    whole_row = lattice._pull_back_filling
    monkeypatch.setattr(lattice, "_pull_back_filling", lambda *args: filled.append(1) or whole_row(*args))
    generator = torch.Generator().manual_seed(9)
    for original, delta in large_cases(generator):
        epsilon = 0.5 if norm == "L2" else 6.0
        delta = norms.project(delta, original, epsilon, norm).float()
        levels = (original * 255).round().float()
        for scale in (1.0, 1.02, 4.0):  # inside the ball, just over it, far over it
            before = len(filled)
            ours = lattice.lattice_within(levels, delta * scale, norm, epsilon * 255).flatten(1)
            expected = lattice_by_sorting(levels.double(), delta * scale, norm, epsilon * 255)
            assert torch.equal(ours.double(), expected), (norm, scale)
            if norm == "L2" and scale < 4.0:
                assert len(filled) == before, "the partial sort settles a delta inside or near the ball"
    assert filled, "a delta far over the ball is filled over whole rows (and every L1 delta)"


@pytest.mark.parametrize("width", [4800, 4801, 150528])
def test_whole_sums_are_exact_at_their_bound(width):
    """Chunks in float32 up to the bound's worst case (every value at the bound, one sign), a prime width (chunks of
    one), and mixed signs: the same as a float64 sum, exactly."""
    generator = torch.Generator().manual_seed(10)
    for bound in (255, 255 ** 2):
        at_bound = torch.full((2, width), float(bound))
        mixed = torch.randint(-bound, bound + 1, (3, width), generator=generator).float()
        for values in (at_bound, mixed):
            assert torch.equal(whole_sums(values, bound), values.double().sum(dim=1)), (bound, width)


def test_solve_capped_on_a_few_coordinates_is_solve_capped():
    """The L2 projection's Newton on the coordinates that may saturate (the others summed into one slope) finds the
    root the whole-row Newton finds, with the sorted fallback too, and a row's root does not depend on the others."""
    generator = torch.Generator().manual_seed(11)
    rows, n = 5, 3000
    slopes = torch.rand(rows, n, generator=generator, dtype=torch.float64)
    caps = torch.rand(rows, n, generator=generator, dtype=torch.float64).pow(4)
    few = torch.rand(rows, n, generator=generator) < torch.tensor([0.0, 0.001, 0.01, 0.3, 1.0]).view(-1, 1)
    caps = torch.where(few, caps, 4.0)  # the others never saturate below the root
    goal = (slopes * caps.clamp(max=1)).sum(dim=1) * torch.rand(rows, generator=generator, dtype=torch.float64)
    expected = projection.solve_capped(caps, slopes, slopes * caps, goal)
    row, column = few.nonzero(as_tuple=True)
    free = (slopes * ~few).sum(dim=1)
    for iterations in (50, 1):
        ours = solve_capped_few(row, caps[row, column], slopes[row, column], (slopes * caps)[row, column], free,
                                goal, iterations=iterations)
        assert torch.allclose(ours, expected, rtol=1e-12, atol=0), iterations
    together = solve_capped_few(row, caps[row, column], slopes[row, column], (slopes * caps)[row, column], free,
                                goal)
    alone = [solve_capped_few(row[row == r] * 0, caps[r][few[r]], slopes[r][few[r]], (slopes * caps)[r][few[r]],
                              free[r:r + 1], goal[r:r + 1]) for r in range(rows)]
    assert torch.equal(torch.cat(alone), together)


@pytest.mark.parametrize("norm", NORMS)
def test_fabs_step_on_large_rows_is_the_rule(norm):
    generator = torch.Generator().manual_seed(5)
    n = 4800
    point = torch.rand(6, n, generator=generator, dtype=torch.float64)
    point[:2, :1000] = 0
    normal = torch.randn(6, n, generator=generator, dtype=torch.float64)
    normal[2:4] = (normal[2:4] * 2).round() / 2  # many equal weights: ties in the L1 order
    offset = torch.randn(6, generator=generator, dtype=torch.float64) * 5
    ours = hyperplane_step(point, normal, offset, norm)
    weight = normal.abs()
    room = torch.where(torch.sign(offset).view(-1, 1) * normal > 0, 1 - point, point)
    if norm == "L1":  # fill in decreasing order of weight, ties in index order
        expected = torch.zeros_like(room)
        for row in range(len(room)):
            left = offset[row].abs()
            for i in weight[row].argsort(descending=True, stable=True).tolist():
                if left <= 0:
                    break
                expected[row, i] = min(room[row, i], left / weight[row, i])
                left -= weight[row, i] * expected[row, i]
    else:  # m_i = min(t, room_i) (Linf) or min(t |normal_i|, room_i) (L2), sum |normal_i| m_i = |offset|
        scale = torch.ones_like(weight) if norm == "Linf" else weight
        filled = lambda t: (weight * torch.minimum(t.view(-1, 1) * scale, room)).sum(dim=1)  # noqa: E731
        t = bisect(filled, torch.zeros(6, dtype=torch.float64), torch.full((6,), 1e6, dtype=torch.float64),
                   offset.abs())
        expected = torch.minimum(t.view(-1, 1) * scale, room) * (weight > 0)  # a zero weight need not move
    assert torch.allclose(ours.abs(), expected, atol=1e-9), norm


def test_solve_capped_without_its_iterations_sorts_to_the_same_root():
    generator = torch.Generator().manual_seed(6)
    slopes = torch.rand(5, 3000, generator=generator, dtype=torch.float64)
    caps = torch.rand(5, 3000, generator=generator, dtype=torch.float64).pow(4)
    goal = (slopes * caps).sum(dim=1) * torch.rand(5, generator=generator, dtype=torch.float64)
    newton = projection.solve_capped(caps, slopes, slopes * caps, goal)
    sorted_ = projection.solve_capped(caps, slopes, slopes * caps, goal, iterations=1)  # stops moving only by sorting
    assert torch.allclose(newton, sorted_, rtol=1e-12)
    assert torch.allclose(torch.where(caps <= newton.view(-1, 1), slopes * caps, newton.view(-1, 1) * slopes).sum(1),
                          goal, rtol=1e-10)


def test_the_room_inside_the_box_is_exact_at_its_edges():
    """room_towards replaces torch.where(up, 1 - base, base) by arithmetic: the same floats, 0 and 1 included."""
    generator = torch.Generator().manual_seed(8)
    base = torch.cat([torch.tensor([[0.0, 1.0, 1e-8, 1 - 2 ** -24, 0.5]]),
                      torch.rand(1, 995, generator=generator)], dim=1).repeat(2, 1)
    up = torch.rand(base.shape, generator=generator) > 0.5
    up[0, :5], up[1, :5] = True, False
    room = projection.room_towards(up, base)
    assert torch.equal(room, torch.where(up, 1 - base, base)) and not torch.signbit(room).any()
    # the float form the projections pass (projection.upwards), from values with zeros of both signs and tiny ones
    values = torch.where(up, torch.rand(base.shape, generator=generator) + 1e-30, -torch.rand(base.shape, generator=generator))
    values[:, 5:9] = torch.tensor([0.0, -0.0, 1e-45, -1e-45])
    room = projection.room_towards(projection.upwards(values), base)
    assert torch.equal(room, torch.where(values > 0, 1 - base, base)) and not torch.signbit(room).any()


def test_the_crossing_value_is_the_sorted_one():
    generator = torch.Generator().manual_seed(7)
    keys = (torch.randn(4, 5000, generator=generator, dtype=torch.float64) * 4).round()  # many ties
    weights = torch.rand(4, 5000, generator=generator, dtype=torch.float64)
    needed = torch.tensor([0.5, 30.0, 2000.0, 1e9], dtype=torch.float64)  # one cut in the first 256, one past all
    ours = lattice.crossing_value(keys, weights, needed)
    for row in range(4):
        order = keys[row].argsort(descending=True, stable=True)
        summed = weights[row][order].cumsum(0)
        expected = keys[row][order][int((summed < needed[row]).sum())] if summed[-1] >= needed[row] else float("-inf")
        assert ours[row] == expected, row


@pytest.mark.parametrize("ties", [False, True], ids=["one key at the cut: no running sum", "many ties"])
def test_the_fill_takes_the_largest_keys_first_ties_in_index_order(ties):
    """What lattice_within moves back and FAB's L1 step fills: the rule written out with one stable sort per row (a
    coordinate is taken while the weights ahead of it in that order are under what is needed), in both of the
    helper's paths."""
    generator = torch.Generator().manual_seed(8)
    keys = torch.randn(4, 3000, generator=generator, dtype=torch.float64)
    if ties:
        keys = (keys * 4).round()
    weights = torch.rand(4, 3000, generator=generator, dtype=torch.float64)
    needed = torch.tensor([0.5, 30.0, 600.0, 1e9], dtype=torch.float64)  # the last one is never reached
    fill = lattice.fill_largest_first(keys, weights, needed)
    assert (fill.before.dim() == 0) == (not ties), "the running sum only where a row has two keys at its cut"
    taken = fill.above | (fill.tied & (fill.before < fill.left))
    for row in range(4):
        order = keys[row].argsort(descending=True, stable=True)
        ahead = weights[row][order].cumsum(0) - weights[row][order]
        expected = torch.zeros(3000, dtype=torch.bool)
        expected[order] = ahead < needed[row]
        assert torch.equal(taken[row], expected), row
        assert bool(fill.reached[row]) == bool(weights[row].sum() >= needed[row]), row


@pytest.mark.parametrize("norm", NORMS)
def test_fabs_hyperplane_projection_is_the_smallest_step(norm):
    rng = np.random.default_rng(2)
    for trial in range(25):
        n = int(rng.integers(2, 7))
        point, normal = rng.random(n), rng.normal(size=n)
        offset = float(rng.normal()) * 0.3
        step = hyperplane_step(torch.tensor(point).view(1, -1), torch.tensor(normal).view(1, -1),
                               torch.tensor([offset], dtype=torch.float64), norm).numpy()[0]
        assert (point + step >= -1e-12).all() and (point + step <= 1 + 1e-12).all()
        reach = np.where(np.sign(offset) * normal > 0, 1 - point, point) @ np.abs(normal)
        if reach < abs(offset):
            continue  # unreachable inside the box: FAB goes as far as it can
        assert abs(normal @ step - offset) < 1e-8
        ours = norms.size(torch.tensor(step).view(1, -1), norm).item()
        assert ours <= minimal_step(point, normal, offset, norm) + 1e-6, (trial, norm)


def minimal_step(point, normal, offset, norm):
    """min ||d|| s.t. normal . d = offset, 0 <= point + d <= 1: a linear program for L1 and L-infinity (d = p - q,
    plus the bound t for L-infinity), SLSQP for L2."""
    n = len(point)
    box = [(0, 1 - x) for x in point] + [(0, x) for x in point]
    if norm == "L2":
        result = minimize(lambda d: (d ** 2).sum(), np.zeros(n), method="SLSQP", bounds=list(zip(-point, 1 - point)),
                          constraints=[{"type": "eq", "fun": lambda d: normal @ d - offset}],
                          options=dict(ftol=1e-15, maxiter=1000))
        return float(np.sqrt((result.x ** 2).sum()))
    if norm == "L1":
        result = linprog(np.ones(2 * n), A_eq=[np.concatenate([normal, -normal])], b_eq=[offset], bounds=box)
        return float(result.fun)
    # variables p, q, t: minimize t with p_i + q_i <= t
    a_ub = np.hstack([np.eye(n), np.eye(n), -np.ones((n, 1))])
    result = linprog(np.r_[np.zeros(2 * n), 1], A_ub=a_ub, b_ub=np.zeros(n),
                     A_eq=[np.r_[normal, -normal, 0]], b_eq=[offset], bounds=box + [(0, None)])
    return float(result.fun)


def read_back(adversarial, tmp_path):
    """Each image saved as a PNG and read back, as float levels (B, 3, H, W)."""
    images = []
    for index, image in enumerate(adversarial):
        path = tmp_path / f"{index}.png"
        save_image((image.permute(1, 2, 0) * 255).round().byte().numpy(), path)
        images.append(torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).double())
    return torch.stack(images)


def run(method, norm, model, images, seed=0, targeted=False, **options):
    labels = model(images).argmax(dim=1) if not targeted else torch.tensor([1, 2, 3, 4])
    options = {**dict(epsilon=EPSILONS[norm], steps=8, seed=seed, random_start=True, queries=30), **options}
    return make_attack(method, model, norm=norm, targeted=targeted, **options)(images, labels)


@pytest.mark.parametrize("method, norm", CASES)
def test_the_saved_png_is_within_epsilon(method, norm, tiny_model, tiny_images, tmp_path):
    before = tiny_images.clone()
    result = run(method, norm, tiny_model, tiny_images)
    assert torch.equal(tiny_images, before), "the input is not modified"
    saved = read_back(result.adversarial, tmp_path)
    assert saved.min() >= 0 and saved.max() <= 255
    levels = result.adversarial.double() * 255
    assert (levels - levels.round()).abs().max() < 1e-4, "on whole levels"
    assert torch.equal(saved, levels.round()), "the returned image is exactly the file"
    sizes = norms.size(saved - (tiny_images.double() * 255).round(), norm)
    limit = EPSILONS[norm] if norm == "Linf" else EPSILONS[norm] * 255
    assert (sizes <= limit * (1 + 1e-12)).all(), (sizes, limit)
    assert torch.equal(perturbation_size(saved / 255, tiny_images.double(), norm),
                       sizes if norm == "Linf" else sizes / 255)


@pytest.mark.parametrize("method, norm", [case for case in CASES if case[1] != "Linf"] + [("fab", "Linf")])
def test_same_seed_same_bytes(method, norm, tiny_model, tiny_images):
    first, second = (run(method, norm, tiny_model, tiny_images, seed=3) for _ in range(2))
    assert torch.equal(first.adversarial, second.adversarial)
    assert torch.equal(first.steps_used, second.steps_used)


@pytest.mark.parametrize("method, norm", [case for case in CASES if case[1] != "Linf"] + [("fab", "Linf")])
def test_success_is_the_success_of_the_8bit_image(method, norm, tiny_model, tiny_images):
    labels = tiny_model(tiny_images).argmax(dim=1)
    result = run(method, norm, tiny_model, tiny_images)
    assert result.success.any(), "a random tiny model falls to every attack somewhere"
    assert torch.equal(tiny_model(result.adversarial).argmax(dim=1) != labels, result.success)


@pytest.mark.parametrize("method, norm", [("pgd", "L2"), ("apgd", "L2"), ("apgd", "L1"), ("fab", "L2")])
def test_targeted_in_every_norm(method, norm, tiny_model, tiny_images):
    result = run(method, norm, tiny_model, tiny_images, targeted=True, steps=20)
    assert torch.equal(tiny_model(result.adversarial).argmax(dim=1) == torch.tensor([1, 2, 3, 4]), result.success)


@pytest.mark.parametrize("method", [name for name, attack in ATTACKS.items() if attack.norms != NORMS])
def test_a_norm_the_method_lacks_is_refused_in_one_line_naming_its_norms(method, tiny_model):
    missing = next(norm for norm in NORMS if norm not in ATTACKS[method].norms)
    with pytest.raises(UsageError) as error:
        make_attack(method, tiny_model, norm=missing, epsilon=1)
    message = str(error.value)
    assert "\n" not in message and missing in message and all(n in message for n in ATTACKS[method].norms)


def test_an_unknown_norm_is_refused(tiny_model):
    with pytest.raises(UsageError):
        make_attack("pgd", tiny_model, norm="L3", epsilon=1)


def test_fab_reports_the_smallest_adversarial_distance(tiny_model, tiny_images, tmp_path):
    labels = tiny_model(tiny_images).argmax(dim=1)
    for norm in NORMS:
        result = make_attack("fab", tiny_model, norm=norm, epsilon=EPSILONS[norm], steps=10, targeted=False,
                             early_stop=False)(tiny_images, labels)
        assert result.distance is not None and result.distance.shape == (len(tiny_images),)
        sizes = perturbation_size(result.adversarial, tiny_images, norm)
        fooled = result.success
        # a fooled image is the smallest found: its size is the distance reported (float32 of the same number)
        assert torch.allclose(sizes[fooled].float(), result.distance[fooled]), norm
        assert (result.distance[~fooled] > EPSILONS[norm]).all() or not (~fooled).any()


def test_perturbation_size_keeps_its_old_pair():
    original = torch.zeros(1, 3, 2, 2)
    adversarial = original.clone()
    adversarial[0, 0, 0, 0], adversarial[0, 1, 0, 0] = 3 / 255, 4 / 255
    linf, l2 = perturbation_size(adversarial, original)
    assert linf.item() == 4 and abs(l2.item() - 5 / 255) < 1e-7
    assert perturbation_size(adversarial, original, "L1").item() == pytest.approx(7 / 255)


def test_l1_apgds_stages_judge_their_last_iterate(tiny_model, tiny_images):
    """l1-APGD's growing epsilon runs three stages; the first two only find the next one's start, their best point.
    As in the reference (each of its stages judges all its iterates), a stage's last iterate is judged too, without a
    gradient, and can be that best point: one forward per gradient step, one without a gradient at the end of each
    stage, the returned image's included, no more. A stage's best loss is the least of all it judged."""
    calls, losses = [], []

    def counted(images):
        calls.append(torch.is_grad_enabled())
        logits = tiny_model(images)
        losses.append(-torch.nn.functional.cross_entropy(logits.detach(), labels, reduction="none"))
        return logits

    labels = tiny_model(tiny_images).argmax(dim=1)
    make_attack("apgd", tiny_model, norm="L1", epsilon=6.0, steps=10, targeted=False, early_stop=False,
                forward=counted)(tiny_images, labels)
    assert calls == [True] * 3 + [False] + [True] * 3 + [False] + [True] * 4 + [False], calls
    # the first stage alone (3 steps at 3 * epsilon from the Gaussian start): its best is the least of its 4 losses
    attack = make_attack("apgd", tiny_model, norm="L1", epsilon=6.0, steps=10, targeted=False, forward=counted)
    attack.set_budget(18.0, 3)
    attack.early_stop, attack.from_start = False, True
    calls.clear(), losses.clear()
    start = torch.randn(tiny_images.shape[1:], generator=torch.Generator().manual_seed(0)).expand_as(tiny_images)
    Attack.run(attack, tiny_images, labels, 0, None, start=start, final=False)  # the shared loop: a stage
    judged = torch.stack(losses)
    assert len(judged) == 4
    assert (judged[-1] < judged[:-1].amin(dim=0)).any(), "some image's best is its last iterate: the check means more"
    assert torch.equal(attack.state["best_loss"], judged.amin(dim=0))


def test_l1_apgds_every_stage_takes_its_share_from_its_start(tiny_model, tiny_images):
    """Each growing-epsilon stage, the first too (from the Gaussian start projected onto the 3 * epsilon ball), starts
    as the reference's does from any x_init: its first step moves the largest-gradient share sparsity / 1.5 of the
    coordinates, and its last sparsity is the start's (not 0.2 and every coordinate, the rule from no start)."""
    labels = tiny_model(tiny_images).argmax(dim=1)
    attack = make_attack("apgd", tiny_model, norm="L1", epsilon=6.0, steps=10, targeted=False, early_stop=False)
    seen, init_state = [], attack.init_state
    attack.init_state = lambda delta: seen.append(attack.from_start) or init_state(delta)  # noqa: E731
    attack(tiny_images, labels)
    assert seen == [True, True, True]
    assert not attack.from_start, "a run from no start (growing_epsilon off, or restarts) takes the share 0.2"
    features = tiny_images[0].numel()
    delta = torch.zeros_like(tiny_images)
    delta.flatten(1)[:, :300] = 0.01  # a start 300 coordinates sparse
    grad = torch.randn(tiny_images.shape, generator=torch.Generator().manual_seed(1))
    for from_start, share in ((True, 300 / features / 1.5), (False, 0.2)):
        attack.from_start = from_start
        state = attack.init_state(delta)
        moved = attack.sparse_update(delta, grad, state, torch.zeros(len(delta)))
        last = torch.full((4,), 300.0 if from_start else features, dtype=torch.float64)
        assert torch.equal(state["last_sparsity"], last)
        expected = features - int((1 - share) * features)
        assert ((moved - delta).flatten(1) != 0).sum(dim=1).tolist() == [expected] * 4


@pytest.mark.parametrize("random_start", [False, True], ids=["from the input", "from a random start"])
def test_fab_judges_nothing_twice_and_reports_the_returned_images_predictions(random_start, tiny_model, tiny_images):
    """FAB-T's forwards: one to rank its targets, one per gradient step, one to judge its last point; from the input
    it judges nothing again at the end (the verdicts it returns were made when its images were found), from a random
    start one more forward judges the inputs it returns. Either way each prediction is a fresh forward's of the image
    returned."""
    calls = []
    counted = lambda images: calls.append(torch.is_grad_enabled()) or tiny_model(images)  # noqa: E731
    labels = tiny_model(tiny_images).argmax(dim=1)
    result = make_attack("fab", tiny_model, norm="L2", epsilon=EPSILONS["L2"] / 4, steps=10, targeted=False,
                         early_stop=False, target_classes=1, random_start=random_start,
                         forward=counted)(tiny_images, labels)
    assert not result.success.all(), "some inputs are returned: the budget is small enough"
    assert (calls.count(True), calls.count(False)) == (10, 2 + random_start), calls
    assert torch.equal(result.predictions, tiny_model(result.adversarial).argmax(dim=1))
    assert torch.equal(result.success, result.predictions != labels)


def test_apgd_l1s_quantile_is_the_sorted_one():
    from utils.attacks.apgd import quantile_values
    values = torch.rand(6, 3000, generator=torch.Generator().manual_seed(8))
    ordered = values.sort(dim=1).values
    # ranks anywhere (one kthvalue per distinct rank), then all among each row's largest (one partial sort)
    for rank in (torch.tensor([0, 2999, 1500, 1500, 7, 2400]), torch.tensor([2999, 2998, 2990, 2990, 2800, 2745])):
        assert torch.equal(quantile_values(values, rank), ordered.gather(1, rank.view(-1, 1)).view(-1))
