"""The exact Euclidean projections onto an L2 or L1 ball intersected with the pixel box [0, 1], and the capped
solvers they rest on (solve_capped, which FAB's hyperplane step uses too). A module of their own: they are most of
the arithmetic of an L2 or L1 attack's step, and norms.project only dispatches to them.

Every projection here is exact (no bisection): each is the root of a monotone piecewise function of one scalar, in
closed form on the piece that holds it. The piece is found without sorting the whole image where the function allows
(Newton from below on a concave function ends on it; the sparse L1 answer needs only its largest coordinates sorted),
by sorting its breakpoints otherwise.
"""
import torch

from utils.attacks.rows import chosen_rows, indicator, row_counts, whole_sums


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
    a, b = chosen_rows(magnitude, over), chosen_rows(room, over)
    goal = torch.full((len(a),), float(epsilon) ** 2, dtype=torch.float64, device=a.device)
    rows, columns = (b < a).nonzero(as_tuple=True)
    a_few, b_few = a[rows, columns], b[rows, columns]
    # where a = 0 the ratio is nan (b = 0 too) or inf: no cap; u < 1, so every other cap is in [0, 1)
    caps = (b_few / a_few).square_().nan_to_num_(nan=4.0).clamp_(max=4.0)
    # the squares in delta's type, as `squared`'s, then exactly in float64
    saturated, slopes = (b_few * b_few).double(), (a_few * a_few).double()
    # squared = sum over the unclipped of a_i^2 + sum over the clipped of b_i^2
    free = chosen_rows(squared, over) - torch.zeros_like(goal).index_add_(0, rows, saturated)
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
    a, b, total = chosen_rows(magnitude, over), chosen_rows(room, over), total[over]
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
