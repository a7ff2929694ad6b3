"""The threat models: sizes of perturbations, exact projections onto a ball intersected with the pixel box, and the
8-bit lattice inside the ball.

Units. "Linf": levels out of 255 (the budget is a whole number of levels once on the lattice). "L2" and "L1": the norm
of the perturbation of the whole (3, H, W) image in [0, 1] pixel units, AutoAttack's and RobustBench's convention.

Every projection here is exact (no bisection): each is the root of a monotone piecewise function of one scalar, found
by sorting its breakpoints once per image and reading the piece that holds the root.
"""
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
    room = torch.where(flat > 0, 1 - base, base)
    return flat.abs(), room


def project_l2(delta, original, epsilon):
    """The exact Euclidean projection of `delta` onto {d : ||d||_2 <= epsilon, 0 <= original + d <= 1}.

    KKT: d = clip(t * delta, -original, 1 - original) for the t in (0, 1] where ||d||_2 = epsilon (t = 1 when the
    clipped delta is inside already). ||d(t)||^2 is piecewise quadratic in t, with a breakpoint where each coordinate
    reaches its bound: sorted, the piece holding the root gives t in closed form."""
    magnitude, room = _split(delta, original)
    clipped = torch.minimum(magnitude, room)
    over = clipped.double().pow(2).sum(dim=1) > epsilon ** 2
    if not bool(over.any()):
        return delta.sign().mul_(clipped.view_as(delta))
    a, b = magnitude[over].double(), room[over].double()
    breaks = torch.where(a > 0, b / a.clamp_min(1e-300), torch.full_like(a, 2.0)).clamp_(max=2.0)
    breaks, order = breaks.sort(dim=1)
    a, b = a.gather(1, order), b.gather(1, order)
    saturated = torch.cumsum(b * b, dim=1) - b * b           # sum of b^2 over the coordinates before each breakpoint
    free = (a * a).flip(1).cumsum(1).flip(1)                  # sum of a^2 from each breakpoint on
    at_break = saturated + breaks * breaks * free             # ||d||^2 at each breakpoint (continuous in t)
    piece = (at_break >= epsilon ** 2).int().argmax(dim=1, keepdim=True)
    t = ((epsilon ** 2 - saturated.gather(1, piece)) / free.gather(1, piece).clamp_min(1e-300)).clamp_min(0).sqrt()
    result = clipped.clone()
    result[over] = torch.minimum(magnitude[over].double() * t, room[over].double()).to(result.dtype)
    return delta.sign().mul_(result.view_as(delta))


def project_l1(delta, original, epsilon):
    """The exact Euclidean projection of `delta` onto {d : ||d||_1 <= epsilon, 0 <= original + d <= 1}, the
    box-constrained L1 projection of Croce and Hein 2021 ("Mind the box: l1-APGD for sparse adversarial attacks on
    image classifiers", Lemma 1 and Algorithm 2).

    KKT: d_i = sign(delta_i) * clip(|delta_i| - lambda, 0, room_i) for the lambda >= 0 where ||d||_1 = epsilon
    (lambda = 0 when the clipped delta is inside already). ||d(lambda)||_1 is piecewise linear and decreasing in
    lambda; its slope drops by one where a coordinate leaves its bound (|delta_i| - room_i) and rises by one where it
    reaches zero (|delta_i|): the 2n breakpoints sorted, the piece that crosses epsilon gives lambda."""
    magnitude, room = _split(delta, original)
    clipped = torch.minimum(magnitude, room)
    total = clipped.double().sum(dim=1)
    over = total > epsilon
    if not bool(over.any()):
        return delta.sign().mul_(clipped.view_as(delta))
    a, b = magnitude[over].double(), room[over].double()
    moving = (a > 0).double()
    points = torch.cat([(a - b).clamp_min(0), a], dim=1)
    slopes = torch.cat([-moving, moving], dim=1)
    points, order = points.sort(dim=1)
    slope = slopes.gather(1, order).cumsum(dim=1)              # the slope just after each breakpoint
    rise = slope[:, :-1] * points.diff(dim=1)
    at_break = torch.cat([total[over].view(-1, 1), total[over].view(-1, 1) + rise.cumsum(dim=1)], dim=1)
    piece = (at_break <= epsilon).int().argmax(dim=1, keepdim=True).clamp_min(1)
    start = points.gather(1, piece - 1)
    lam = start + (at_break.gather(1, piece - 1) - epsilon) / (-slope.gather(1, piece - 1)).clamp_min(1e-300)
    result = clipped.clone()
    result[over] = (magnitude[over].double() - lam).clamp_min(0).minimum(room[over].double()).to(result.dtype)
    return delta.sign().mul_(result.view_as(delta))


def project(delta, original, epsilon, norm):
    """The projection onto the `norm` ball of radius `epsilon` ([0, 1] units) intersected with the pixel box."""
    if norm == "Linf":
        return delta.clamp(-epsilon, epsilon).add_(original).clamp_(0, 1).sub_(original)
    return (project_l2 if norm == "L2" else project_l1)(delta, original, epsilon)


def lattice_within(original_levels, delta, norm, budget):
    """The 8-bit image (B, C, H, W) in levels nearest original + delta whose perturbation's `norm` (L2 or L1, in
    levels) is at most `budget` levels: delta rounded to whole levels, then, in each image whose rounding pushed it
    over the budget, the coordinates rounded furthest away from the original (largest |rounded| - |delta * 255|)
    moved one level back towards it, the fewest such moves in that order that bring the image inside.

    Exact and deterministic: one stable sort per image that needs it, integer arithmetic in float64. Never over the
    budget: moving every coordinate that was rounded away back gives |steps_i| <= |delta_i * 255| for all i, which is
    inside whenever delta is (and the order continues over the other coordinates, down to the original itself, so an
    image is inside even when delta was over by float noise). On the lattice and in [0, 255] by construction: a
    move goes one whole level towards the original."""
    target = delta.detach().flatten(1).double() * 255
    base = original_levels.flatten(1).double()
    steps = (base + target.round()).clamp_(0, 255) - base
    limit = budget if norm == "L1" else budget ** 2
    while True:  # one pass suffices unless delta itself was over by float noise; each pass moves every image still over
        sizes = steps.abs().sum(dim=1) if norm == "L1" else steps.pow(2).sum(dim=1)
        over = sizes > limit
        if not bool(over.any()):
            break
        rows = over.nonzero().view(-1)
        moved = steps[rows]
        excess = moved.abs() - target[rows].abs()
        excess = torch.where(moved != 0, excess, torch.full_like(excess, float("-inf")))
        order = excess.argsort(dim=1, descending=True, stable=True)
        chosen = moved.gather(1, order)
        # what one level back towards the original saves: 1 in L1, |s|^2 - (|s| - 1)^2 in squared L2
        gain = (chosen != 0).double() if norm == "L1" else (2 * chosen.abs() - 1).clamp_min(0)
        needed = sizes[rows].view(-1, 1) - limit
        count = (gain.cumsum(dim=1) < needed).sum(dim=1, keepdim=True) + 1  # the fewest moves, in order, that suffice
        take = (torch.arange(moved.shape[1], device=moved.device).view(1, -1) < count).double()
        steps[rows] = moved - torch.zeros_like(moved).scatter_(1, order, take) * moved.sign()
        target = steps  # a further pass (float noise only) starts from here: no coordinate is rounded away any more
    return (base + steps).to(original_levels.dtype).view_as(original_levels)
