"""The threat models: sizes of perturbations, exact projections onto a ball intersected with the pixel box, and the
8-bit lattice inside the ball.

Units. "Linf": levels out of 255 (the budget is a whole number of levels once on the lattice). "L2" and "L1": the norm
of the perturbation of the whole (3, H, W) image in [0, 1] pixel units, AutoAttack's and RobustBench's convention.

Every projection here is exact (no bisection): each is the root of a monotone piecewise function of one scalar, in
closed form on the piece that holds it. The piece is found without sorting the whole image where the function allows
(Newton from below on a concave function ends on it; the sparse L1 answer needs only its largest coordinates sorted),
by sorting its breakpoints otherwise.
"""
import functools
from typing import NamedTuple

import torch

NORMS = ("Linf", "L2", "L1")


def check_norm(norm, offered=NORMS, method=None):
    """`norm` if it is one of `offered`, else ValueError naming the norms there are."""
    if norm not in offered:
        who = f"{method} has" if method else "norms are"
        raise ValueError(f"norm {norm!r}: {who} {', '.join(offered)}")
    return norm


def size(difference, norm):
    """Per sample (B,): the norm of `difference` (B, ...) flattened, in the norm's own pixel units (Linf as a [0, 1]
    fraction too: multiply by 255 for levels)."""
    flat = difference.flatten(1)
    if norm == "Linf":
        return flat.abs().amax(dim=1)
    return flat.norm(p=2 if norm == "L2" else 1, dim=1)


def steepest(grad, norm):
    """The unit step of steepest descent for `norm` (to be subtracted): sign(grad) in L-infinity, grad / ||grad||_2
    in L2 (Madry et al. 2018, torchattacks' PGDL2)."""
    if norm == "Linf":
        return grad.sign()
    return grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (grad.dim() - 1))


def _split(delta, original):
    """|delta| (B, n) and, per coordinate, how far it may go in its own direction inside [0, 1] (B, n)."""
    flat, base = delta.flatten(1), original.flatten(1)
    return flat.abs(), room_towards(upwards(flat), base)


def upwards(values):
    """1.0 where `values` > 0, else 0 (as a float of their type): sign then clamp, twice as fast on a CPU as a
    comparison and a bool's conversion to float."""
    return values.sign().clamp_min_(0)


def room_towards(up, base):
    """How far each coordinate of `base` in [0, 1] may go inside [0, 1]: 1 - base where `up` (a bool mask, or a fresh
    float tensor of 0s and 1s in base's type, which this consumes), else base. |up - base| gives those exact values:
    arithmetic, as below, because torch.where with a full-size mask runs a scalar loop on the CPU (about 4x a
    multiply: a tenth of an L2 attack's step on a small model)."""
    return up.to(base.dtype).sub_(base).abs_()


def indicator(compare, values, other):
    """compare(values, other) (torch.le, torch.gt, torch.eq, ...; `other` broadcast to values' shape) as 0.0 / 1.0 in
    values' float type, written straight into a float tensor: the form for sums and counts over rows (whole_sums(.., 1)
    counts exactly). On a CPU a bool tensor's own sum widens every element to int64, a bool's conversion to float is
    another pass, and a float tensor times a bool one takes a slow path; measured on a batch of 16 photos, a count this
    way takes 1.5 ms against 23 ms for a bool tensor's sum."""
    return compare(values, other, out=torch.empty(values.shape, dtype=values.dtype, device=values.device))


def row_counts(compare, values, other):
    """Per row of `values` (B, n), how many coordinates satisfy compare(values, other), exactly, as float64: an
    indicator summed by whole_sums."""
    return whole_sums(indicator(compare, values, other), 1)


def solve_capped(caps, slopes, saturated, goal, iterations=50):
    """Per row, the u >= 0 where phi(u) = sum_i (saturated_i if caps_i <= u else u * slopes_i) = goal, for a phi
    that is continuous (saturated_i = slopes_i * caps_i), increasing and concave (slopes >= 0), with phi(0) <= goal.

    Newton from below on the pieces: u_{k+1} solves the piece of u_k, sum of saturated_i over caps_i <= u_k plus
    u * (sum of the other slopes) = goal. The piece's line lies above the concave phi to its right, so u_k only
    grows and never passes the root; when an iteration saturates no new coordinate, u_k is on the root's piece and is
    the root, in closed form. A few iterations in practice (each a pass over the row, no sort); rows still moving after
    `iterations` are solved on their sorted breakpoints instead (the same answer)."""
    u = torch.zeros(len(caps), dtype=torch.float64, device=caps.device)
    count = None
    for _ in range(iterations):
        capped = indicator(torch.le, caps, u.to(caps.dtype).view(-1, 1))
        now = whole_sums(capped, 1)
        if count is not None and torch.equal(now, count):
            return u
        count = now
        # masks applied by multiplication (room_towards says why): exact, the values are finite and >= 0. A float64
        # copy then its sum: the same numbers as sum(dtype=torch.float64), a third faster on a CPU
        reached = saturated.mul(capped).double().sum(dim=1)
        free = slopes.mul(capped.neg_().add_(1)).double().sum(dim=1)
        u = ((goal - reached) / free.clamp_min(1e-300)).clamp_min(0)
    moving = row_counts(torch.le, caps, u.to(caps.dtype).view(-1, 1)) != count
    if bool(moving.any()):
        u = u.clone()
        u[moving] = _solve_capped_sorted(caps[moving].double(), slopes[moving].double(), saturated[moving].double(),
                                         goal[moving].double())
    return u


def _solve_capped_sorted(caps, slopes, saturated, goal):
    """solve_capped's root read off the sorted breakpoints: the piece where phi crosses goal, in closed form."""
    caps, order = caps.sort(dim=1)
    saturated, slopes = saturated.gather(1, order), slopes.gather(1, order)
    before = saturated.cumsum(dim=1) - saturated              # saturated sum over the breakpoints before each one
    after = slopes.flip(1).cumsum(dim=1).flip(1)               # slopes still free from each breakpoint on
    at_break = before + caps * after
    piece = (at_break >= goal.view(-1, 1)).int().argmax(dim=1, keepdim=True)
    return ((goal.view(-1, 1) - before.gather(1, piece)) / after.gather(1, piece).clamp_min(1e-300)).view(-1)


def project_l2(delta, original, epsilon):
    """The exact Euclidean projection of `delta` onto {d : ||d||_2 <= epsilon, 0 <= original + d <= 1}.

    KKT: d = clip(t * delta, -original, 1 - original) for the t in (0, 1] where ||d||_2 = epsilon (t = 1 when the
    clipped delta is inside already). In u = t^2, ||d||^2 = sum_i min(u a_i^2, b_i^2) (a = |delta|, b the room) is
    increasing, concave and piecewise linear: Newton from below on its pieces (`solve_capped`) finds its root exactly.
    The root is below 1, so only the coordinates the box clips at t = 1 (b_i < a_i: a few per image on most steps)
    can ever saturate; the others add u * a_i^2, and their sum is computed once. The pieces are searched over those
    few only (`solve_capped_few`)."""
    magnitude, room = _split(delta, original)
    clipped = torch.minimum(magnitude, room)
    squared = clipped.pow(2).sum(dim=1, dtype=torch.float64)
    over = squared > epsilon ** 2
    if not bool(over.any()):
        return delta.sign().mul_(clipped.view_as(delta))
    a, b = _rows(magnitude, over), _rows(room, over)
    goal = torch.full((len(a),), float(epsilon) ** 2, dtype=torch.float64, device=a.device)
    rows, columns = (b < a).nonzero(as_tuple=True)
    a_few, b_few = a[rows, columns], b[rows, columns]
    # where a = 0 the ratio is nan (b = 0 too) or inf: no cap; u < 1, so every other cap is in [0, 1)
    caps = (b_few / a_few).square_().nan_to_num_(nan=4.0).clamp_(max=4.0)
    # the squares in delta's type, as `squared`'s, then exactly in float64
    saturated, slopes = (b_few * b_few).double(), (a_few * a_few).double()
    # squared = sum over the unclipped of a_i^2 + sum over the clipped of b_i^2
    free = _rows(squared, over) - torch.zeros_like(goal).index_add_(0, rows, saturated)
    u = solve_capped_few(rows, caps, slopes, saturated, free.clamp_min_(0), goal)
    inside = torch.minimum(a.mul(u.sqrt().to(a.dtype).view(-1, 1)), b)
    if len(inside) == len(clipped):
        clipped = inside
    else:
        clipped[over] = inside
    return delta.sign().mul_(clipped.view_as(delta))


def solve_capped_few(rows, caps, slopes, saturated, free, goal, iterations=50):
    """solve_capped for rows given as a few coordinates that may saturate, the others' slopes summed in `free` (R,):
    per row r, the u >= 0 where free_r * u + sum over the coordinates of row r (rows, caps, slopes, saturated: (N,)
    each, in increasing row order) of (saturated_i if caps_i <= u else u * slopes_i) = goal_r. The same Newton from
    below, its sums accumulated per row in the coordinates' order (index_add_): a row's root does not depend on the
    other rows. Rows still moving after `iterations` go to the sorted breakpoints."""
    u = torch.zeros_like(goal)
    count = None
    for _ in range(iterations):
        capped = caps <= u.to(caps.dtype)[rows]
        now = torch.zeros(len(goal), dtype=torch.long, device=goal.device).index_add_(0, rows, capped.long())
        if count is not None and torch.equal(now, count):
            return u
        count = now
        reached = torch.zeros_like(goal).index_add_(0, rows, saturated * capped)
        slack = torch.zeros_like(goal).index_add_(0, rows, slopes * capped.logical_not_())
        u = ((goal - reached) / (free + slack).clamp_min(1e-300)).clamp_min(0)
    moving = torch.zeros_like(count).index_add_(0, rows, (caps <= u.to(caps.dtype)[rows]).long()) != count
    for row in moving.nonzero().view(-1).tolist():
        mine = rows == row
        # the never-saturating coordinates as one with that slope and no cap
        u[row] = _solve_capped_sorted(torch.cat([caps[mine].double(), caps.new_full((1,), 4.0).double()]).view(1, -1),
                                      torch.cat([slopes[mine], free[row].view(1)]).view(1, -1),
                                      torch.cat([saturated[mine], (4 * free[row]).view(1)]).view(1, -1),
                                      goal[row].view(1))[0]
    return u


def _rows(values, chosen):
    """values[chosen] (a copy), or `values` itself when every row is chosen (no copy of a large batch); `chosen` is
    a row mask, or increasing row indices."""
    every = bool(chosen.all()) if chosen.dtype == torch.bool else len(chosen) == len(values)
    return values if every else values[chosen]


def _l1_threshold(a, b, total, epsilon):
    """Per row, the lambda >= 0 where sum_i clip(a_i - lambda, 0, b_i) = epsilon (rows over epsilon at 0, `total`),
    read off the 2n sorted breakpoints of that piecewise-linear decreasing function."""
    moving = (a > 0).to(a.dtype)
    points = torch.cat([(a - b).clamp_min(0), a], dim=1)
    slopes = torch.cat([-moving, moving], dim=1)
    points, order = points.sort(dim=1)
    slope = slopes.gather(1, order).cumsum(dim=1)              # the slope just after each breakpoint
    rise = slope[:, :-1] * points.diff(dim=1)
    at_break = torch.cat([total.view(-1, 1), total.view(-1, 1) + rise.cumsum(dim=1)], dim=1)
    piece = (at_break <= epsilon).int().argmax(dim=1, keepdim=True).clamp_min(1)
    start = points.gather(1, piece - 1)
    lam = start + (at_break.gather(1, piece - 1) - epsilon) / (-slope.gather(1, piece - 1)).clamp_min(1e-300)
    return lam.view(-1)


def project_l1(delta, original, epsilon):
    """The exact Euclidean projection of `delta` onto {d : ||d||_1 <= epsilon, 0 <= original + d <= 1}, the
    box-constrained L1 projection of Croce and Hein 2021 ("Mind the box: l1-APGD for sparse adversarial attacks on
    image classifiers", Lemma 1 and Algorithm 2).

    KKT: d_i = sign(delta_i) * clip(|delta_i| - lambda, 0, room_i) for the lambda >= 0 where ||d||_1 = epsilon
    (lambda = 0 when the clipped delta is inside already). ||d(lambda)||_1 is piecewise linear and decreasing in
    lambda; its slope drops by one where a coordinate leaves its bound (|delta_i| - room_i) and rises by one where it
    reaches zero (|delta_i|): the breakpoints sorted, the piece that crosses epsilon gives lambda.
    The answer is sparse (every |delta_i| <= lambda ends at zero), so the piece is looked for among the k largest
    |delta_i| only, those above a lower bound of lambda: it is the answer when lambda is at least every |delta_i| left
    out (they are zero at it, as they would be in the whole problem); else k doubles, up to the whole row."""
    magnitude, room = _split(delta, original)
    clipped = torch.minimum(magnitude, room)
    total = clipped.double().sum(dim=1)
    over = total > epsilon
    if not bool(over.any()):
        return delta.sign().mul_(clipped.view_as(delta))
    # |delta| and the room in delta's type: a float64 copy of the whole rows is needed only where a row is solved
    # whole; float32 values compare with float64 ones exactly (both as float64)
    a, b, total = _rows(magnitude, over), _rows(room, over), total[over]
    width = a.shape[1]
    # lambda is at least (total - epsilon) / (nonzero coordinates): each term falls at slope at most 1. Those at or
    # under that bound end at zero, so the others are enough
    bound = (total - epsilon) / row_counts(torch.gt, a, 0).clamp_min(1)
    enough = int(row_counts(torch.gt, a, bound.view(-1, 1)).max())
    k = min(width, max(256, min(enough, width // 64)))
    result = torch.zeros(a.shape, dtype=clipped.dtype, device=a.device)
    todo = torch.arange(len(a), device=a.device)
    while len(todo):
        if 2 * k >= width:
            a_todo, b_todo = a[todo].double(), b[todo].double()
            lam = _l1_threshold(a_todo, b_todo, total[todo], epsilon).view(-1, 1)
            result[todo] = (a_todo - lam).clamp_min(0).minimum(b_todo).to(result.dtype)
            break
        top, index = a[todo].topk(k + 1, dim=1)
        part_a, part_b = top[:, :k].double(), b[todo].gather(1, index[:, :k]).double()
        part_total = torch.minimum(part_a, part_b).sum(dim=1)
        found = _l1_threshold(part_a, part_b, part_total, epsilon)
        # exact when the part alone is over epsilon and every coordinate left out is zero at its lambda: the answer
        # is then zero outside the part
        settled = (part_total > epsilon) & (found >= top[:, k])
        rows = todo[settled]
        values = (part_a[settled] - found[settled].view(-1, 1)).clamp_min(0).minimum(part_b[settled])
        result[rows] = result[rows].scatter_(1, index[settled, :k], values.to(result.dtype))
        todo, k = todo[~settled], 2 * k
    if len(result) == len(clipped):
        clipped = result
    else:
        clipped[over] = result
    return delta.sign().mul_(clipped.view_as(delta))


def project(delta, original, epsilon, norm):
    """The projection onto the `norm` ball of radius `epsilon` ([0, 1] units) intersected with the pixel box."""
    if norm == "Linf":
        return delta.clamp(-epsilon, epsilon).add_(original).clamp_(0, 1).sub_(original)
    return (project_l2 if norm == "L2" else project_l1)(delta, original, epsilon)


def lattice_within(original_levels, delta, norm, budget):
    """The 8-bit image (B, C, H, W) in levels nearest original + delta whose perturbation's `norm` (L2 or L1, in
    levels) is at most `budget` levels: delta rounded to whole levels, then, in each image whose rounding pushed it
    over the budget, the coordinates rounded furthest away from the original (largest |rounded| - |delta * 255|, ties
    in index order) moved one level back towards it, the fewest such moves in that order that bring the image inside.

    Exact and deterministic: in L2 the moves are read off the largest excesses only (`_pull_back_top`, a partial
    sort); in L1, and where that cannot settle them (a delta over the budget by more than one level per coordinate
    can take back, as float noise can leave it, or an excess at the cut shared past the partial sort), by
    fill_largest_first over whole rows, pass after pass; levels are whole numbers, exact in any float type, and their
    sums are exact (whole_sums).
    Never over the budget: moving every coordinate that was rounded away back gives |steps_i| <= |delta_i * 255| for
    all i, which is inside whenever delta is (and the order continues over the other coordinates, down to the
    original itself, so an image is inside even when delta was over by float noise). On the lattice and in [0, 255]
    by construction: a move goes one whole level towards the original."""
    # the nearest float to delta * 255: a float multiply rounds the exact product once, as a float64 one then
    # rounded back would (the product of a float and 255 is exact in float64)
    target = delta.detach().flatten(1).mul(255)
    base = original_levels.flatten(1).to(delta.dtype)
    levels = target.round().add_(base).clamp_(0, 255)
    steps = levels - base  # whole levels: exact in any float type
    limit = budget if norm == "L1" else budget ** 2
    sizes = lattice_sizes(steps, norm)
    over = sizes > limit
    # L1's moves all gain one level and its steps are even, so its excesses tie in large groups past any partial sort:
    # there the whole-row fill is the faster (on the digits model; no different on a photo)
    if bool(over.any()) and (norm == "L1" or not _pull_back_top(levels, steps, target, sizes - limit, over, norm)):
        levels = base + _pull_back_filling(steps, target, sizes, limit, norm)
    return levels.to(original_levels.dtype).view_as(original_levels)


def lattice_sizes(steps, norm):
    """Per row, the exact float64 L1 or squared L2 size of whole-level `steps` (B, n) in [-255, 255]."""
    return whole_sums(steps.abs(), 255) if norm == "L1" else whole_sums(steps.square(), 255 ** 2)


GAIN_BOUND = {"L1": 1, "L2": 2 * 255 - 1}  # the largest gain (_gains) of a step within [-255, 255]


def _gains(magnitude, norm):
    """What one level back towards the original saves, per coordinate of |steps|: 1 in L1, |s|^2 - (|s| - 1)^2 in
    squared L2 (whole numbers up to GAIN_BOUND), and 0 at the original (a move there moves nothing)."""
    if norm == "L1":
        return (magnitude > 0).to(magnitude.dtype)
    return magnitude.mul(2).sub_(1).clamp_min_(0)


def _pull_back_top(levels, steps, target, needed, over, norm):
    """lattice_within's moves in place on `levels` (B, n), read off each row's largest excesses (a partial sort that
    grows until their gains reach what each row needs): True when they settle every row over the budget, False
    (nothing changed) when one level back on every coordinate of a row cannot reach what it needs (the whole-row
    fill's further passes) or when the excess where the moves end continues past the partial sort.

    In decreasing order of excess, the moves end at the excess `value` where the gains first reach what the row
    needs: every larger excess moves, and of those at `value` the first in index order while the gains of those
    ahead of them are under what is left (fill_largest_first's rule). Gains are whole numbers: their sums are exact
    in any order."""
    rows = over.nonzero().view(-1)
    every = len(rows) == len(steps)
    moved, aimed, needed = _rows(steps, rows), _rows(target, rows), needed[rows].view(-1, 1)
    magnitude = moved.abs()
    excess = magnitude - aimed.abs()
    width = excess.shape[1]
    # k: twice what `needed` takes at the mean positive gain, estimated on every 16th coordinate (any k gives the
    # same moves; a larger one costs a longer partial sort, a smaller one another)
    sample = _gains(magnitude[:, ::16], norm)
    mean = sample.sum(dim=1, dtype=torch.float64) / (sample > 0).sum(dim=1).clamp_min(1)
    k = int(min(width, max(32, float((2 * needed.view(-1) / mean.clamp_min(1e-300)).max()))))
    while True:
        top, index = excess.topk(k, dim=1)
        gains = _gains(magnitude.gather(1, index), norm)
        summed = gains.cumsum(dim=1, dtype=torch.float64)
        if bool((summed[:, -1:] >= needed).all()):
            break
        if k == width:
            return False
        k = min(width, 2 * k)
    value = top.gather(1, (summed >= needed).int().argmax(dim=1, keepdim=True))
    if k < width and bool((top[:, -1:] == value).any()):
        return False  # coordinates at `value` may lie past the top k: a large tie (l1-APGD's even steps), whole rows
    above, tied = top > value, top == value
    left = needed - gains.mul(above).sum(dim=1, keepdim=True, dtype=torch.float64)
    order = torch.where(tied, index, width).argsort(dim=1)  # the tied positions first, in index order
    ordered = gains.mul(tied).gather(1, order)
    ahead = ordered.cumsum(dim=1, dtype=torch.float64).sub_(ordered)
    taken = above.logical_or_(torch.zeros_like(tied).scatter_(1, order, tied.gather(1, order) & (ahead < left)))
    # one level back towards the original: levels - sign(steps), at the positions taken (exact: whole numbers)
    back = moved.gather(1, index).sign_().mul_(taken)
    part = levels if every else levels[rows]
    part.scatter_(1, index, part.gather(1, index).sub_(back))
    if not every:
        levels[rows] = part
    return True


def _pull_back_filling(steps, target, sizes, limit, norm):
    """lattice_within's moves over whole rows (fill_largest_first): the steps (B, n) inside the budget."""
    while True:  # one pass suffices unless delta itself was over by float noise; each pass moves every image still over
        over = sizes > limit
        if not bool(over.any()):
            return steps
        moved = _rows(steps, over)
        magnitude = moved.abs()
        excess = magnitude - _rows(target, over).abs()
        # a coordinate at the original has gain 0, so wherever its key falls it changes no sum of the fill, and
        # taking it moves nothing: the same moves as keying it at -inf, without a torch.where (room_towards says why)
        gain = _gains(magnitude, norm)
        needed = _rows(sizes, over) - limit
        fill = fill_largest_first(excess, gain, needed, whole=GAIN_BOUND[norm])
        take = fill.above.logical_or_(fill.tied & (fill.before < fill.left))
        back = moved - moved.sign().mul_(take.to(moved.dtype))  # exact (room_towards says why not torch.where)
        if len(back) == len(steps):
            steps = back
        else:
            steps[over] = back
        if bool(fill.reached.all()):
            return steps  # sizes are exact sums of whole numbers: the moves took at least what each image needed
        target = steps  # a further pass (float noise only) starts from here: no coordinate is rounded away any more
        sizes = lattice_sizes(steps, norm)


def whole_sums(values, bound):
    """Per row, the exact float64 sum of `values` (B, n), whole numbers of magnitude at most `bound`: float32 sums of
    chunks small enough that no partial sum can leave the integers float32 holds exactly (2 ** 24), in any order,
    then a float64 sum of those. Several times faster on a CPU than a float64 sum of a float32 row, which converts
    every value first."""
    chunk = _chunk(values.shape[1], int(bound))
    return values.reshape(len(values), -1, chunk).sum(dim=2).sum(dim=1, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _chunk(width, bound):
    """The largest divisor of `width` whose chunk of values of magnitude `bound` sums under 2 ** 24."""
    most = max(1, min(width, 2 ** 24 // max(bound, 1)))
    return next(size for size in range(most, 0, -1) if width % size == 0)


class Fill(NamedTuple):
    """Which coordinates a fill in decreasing order of key takes (fill_largest_first)."""
    above: torch.Tensor    # (B, n) bool: keys over the crossing value, all taken whole
    tied: torch.Tensor     # (B, n) bool: keys at it, taken in index order while before < left
    before: torch.Tensor   # (B, n) float64, the tied weights ahead of each in index order (0-d zero: no row has two)
    left: torch.Tensor     # (B, 1) float64: what `above` leaves of the goal
    reached: torch.Tensor  # (B,) bool: the weights reach the goal at all (else everything is `above` or weightless)


def fill_largest_first(keys, weights, needed, whole=None):
    """Per row, the coordinates a fill takes in decreasing order of key, ties in index order, until their weights
    (>= 0) reach `needed` (B,): those above the crossing value (crossing_value) whole, then those at it while the
    tied weights ahead of them are under what is left. The ties' running sum is a pass over the row, skipped when no
    row has two (the common case with real-valued keys: the one tie takes what is left).
    `whole`: the weights are whole numbers of magnitude at most `whole`, whose sums whole_sums takes exactly in
    float32 chunks (the same numbers as float64 sums, faster)."""
    value = crossing_value(keys, weights, needed).to(keys.dtype).view(-1, 1)
    above, tied = keys > value, keys == value
    taken = weights.mul(above.to(weights.dtype))  # weights >= 0; a float mask (indicator says why)
    summed = taken.sum(dim=1, dtype=torch.float64) if whole is None else whole_sums(taken, whole)
    left = needed.view(-1, 1) - summed.view(-1, 1)
    if int(whole_sums(tied.to(keys.dtype), 1).max()) <= 1:
        before = torch.zeros((), dtype=torch.float64, device=keys.device)
    else:
        at = weights.mul(tied)
        before = at.cumsum(dim=1, dtype=torch.float64).sub_(at)
    return Fill(above, tied, before, left, value.view(-1) > float("-inf"))


def crossing_value(keys, weights, needed):
    """Per row, the key at which the weights (>= 0), summed in decreasing order of key, first reach `needed` (-inf
    where all of them do not): the same value whatever the order among equal keys. Read off the k largest keys only,
    k first twice what `needed` takes at the mean positive weight, doubling until their weights reach `needed` (or k
    is the whole row)."""
    width = keys.shape[1]
    value = torch.full((len(keys),), float("-inf"), dtype=torch.float64, device=keys.device)
    mean = weights.sum(dim=1, dtype=torch.float64) / row_counts(torch.gt, weights, 0).clamp_min(1)
    k = int(min(width, max(32, float((2 * needed / mean.clamp_min(1e-300)).max()))))
    todo = torch.arange(len(keys), device=keys.device)
    while len(todo):
        top, index = _rows(keys, todo).topk(k, dim=1)
        summed = _rows(weights, todo).gather(1, index).cumsum(dim=1, dtype=torch.float64)
        goal = needed[todo].view(-1, 1)
        reached = summed[:, -1] >= goal[:, 0]
        first = (summed >= goal).int().argmax(dim=1, keepdim=True)
        value[todo[reached]] = top.gather(1, first).view(-1)[reached].double()
        if k == width:
            break  # the rows left never reach it: -inf
        todo, k = todo[~reached], min(width, 2 * k)
    return value
