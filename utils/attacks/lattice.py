"""The 8-bit lattice inside an L2 or L1 ball: lattice_within rounds a perturbation to whole levels and pulls back
the fewest coordinates, in a fixed order, that bring the image inside the budget, so that the PNG an attack writes is
within epsilon exactly. A module of its own: it is the one place where an attack's real-valued answer meets the
saved image, with an exactness argument of its own (whole numbers, exact sums) that the projections do not need.

Also here, as the pull-back's order: fill_largest_first and crossing_value, a fill of coordinates in decreasing order
of a key until their weights reach a goal (FAB's L1 step is the same fill).
"""
from typing import NamedTuple

import torch

from utils.attacks.rows import chosen_rows, row_counts, whole_sums


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
    moved, aimed, needed = chosen_rows(steps, rows), chosen_rows(target, rows), needed[rows].view(-1, 1)
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
        moved = chosen_rows(steps, over)
        magnitude = moved.abs()
        excess = magnitude - chosen_rows(target, over).abs()
        # a coordinate at the original has gain 0, so wherever its key falls it changes no sum of the fill, and
        # taking it moves nothing: the same moves as keying it at -inf, without a torch.where
        # (projection.room_towards says why)
        gain = _gains(magnitude, norm)
        needed = chosen_rows(sizes, over) - limit
        fill = fill_largest_first(excess, gain, needed, whole=GAIN_BOUND[norm])
        take = fill.above.logical_or_(fill.tied & (fill.before < fill.left))
        # exact (projection.room_towards says why not torch.where)
        back = moved - moved.sign().mul_(take.to(moved.dtype))
        if len(back) == len(steps):
            steps = back
        else:
            steps[over] = back
        if bool(fill.reached.all()):
            return steps  # sizes are exact sums of whole numbers: the moves took at least what each image needed
        target = steps  # a further pass (float noise only) starts from here: no coordinate is rounded away any more
        sizes = lattice_sizes(steps, norm)


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
    taken = weights.mul(above.to(weights.dtype))  # weights >= 0; a float mask (rows.indicator says why)
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
        top, index = chosen_rows(keys, todo).topk(k, dim=1)
        summed = chosen_rows(weights, todo).gather(1, index).cumsum(dim=1, dtype=torch.float64)
        goal = needed[todo].view(-1, 1)
        reached = summed[:, -1] >= goal[:, 0]
        first = (summed >= goal).int().argmax(dim=1, keepdim=True)
        value[todo[reached]] = top.gather(1, first).view(-1)[reached].double()
        if k == width:
            break  # the rows left never reach it: -inf
        todo, k = todo[~reached], min(width, 2 * k)
    return value
