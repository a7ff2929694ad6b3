"""Complete verification by branch and bound over ReLU splits, with beta-CROWN's bounds (Wang, Zhang, Xu, Lin, Jana,
Hsieh and Kolter 2021, "Beta-CROWN: Efficient Bound Propagation with Per-neuron Split Constraints").

A sub-problem is the input set with some unstable ReLUs fixed: active (z >= 0, so relu(z) = z) or inactive (z <= 0,
relu(z) = 0). Its margins are bounded by alpha-CROWN with the split neurons' relaxations made exact and each split
constraint s_j z_j >= 0 added to the bound with a multiplier beta_j >= 0 (utils.certify.propagation's optimized_bound);
its intermediate bounds are recomputed below the splits, within the root's (which hold on the whole set): the split
neurons' bounds cut at zero, then the later layers' bounds from those tighter relaxations (CROWN's on small networks,
interval bounds on large ones: `refinement`). A sub-problem whose every margin bound is above zero is proved; the rest
are split again on the neuron of largest score (BaBSR's, Bunel et al. 2020: the share of the bound the neuron's upper
relaxation costs, |coefficient| x u l / (u - l) for a negative coefficient at its output), many sub-problems a pass.
Each bound's minimizing input, rounded to the 8-bit lattice, is tried on the model itself (L-infinity: a corner of the
box): a counterexample ends the search.

`branch_and_bound(net, bounds, box, label, ...)` -> Outcome("robust" | "not robust" | "unknown", the counterexample
levels or None, the smallest margin bound left, the sub-problems bounded).
"""
import heapq
import time
from dataclasses import dataclass

import numpy as np
import torch

from utils.certify.propagation import BLOCK, Net, ReLU, layer_bounds, margin_rows, optimized_bound, relu_relaxation, \
    widest

ITERATIONS = 10  # alpha/beta steps per sub-problem
LR = 0.1
REFINE_RELUS = 2048


@dataclass
class Outcome:
    verdict: str
    candidate: np.ndarray | None  # a counterexample's flat pixels in [0, 1]
    bound: float
    domains: int


@dataclass(order=True)
class Domain:
    bound: float
    order: int
    splits: dict  # {ReLU layer index: (width,) int8 signs}


def refinement(net):
    """CROWN's intermediate bounds for each sub-problem on networks of at most REFINE_RELUS ReLUs, where they cost
    about one margin bound; interval bounds (from the root's, cut at the splits) on larger ones, where CROWN for
    every sub-problem's unstable neurons would cost a root's bounds per sub-problem."""
    relus = sum(layer.out_size for layer in net.layers if isinstance(layer, ReLU))
    return "crown" if relus <= REFINE_RELUS else "interval"


def row_of(rows, worst):
    """Each sub-problem's row `worst` of rows (B, R, width): (B, width)."""
    return rows.gather(1, worst[:, None, None].expand(-1, 1, rows.shape[2]))[:, 0]


def scores(net, bounds, record, worst):
    """(B, width) per ReLU layer: BaBSR's score of each unstable, unsplit neuron for the row `worst` of each
    sub-problem (-inf for the others)."""
    out = {}
    for index, layer in enumerate(net.layers):
        if not isinstance(layer, ReLU):
            continue
        lower, upper = bounds[index]
        _, _, intercept, unstable = relu_relaxation(lower, upper)
        rows = row_of(record[index], worst)
        score = rows.clamp(max=0).abs() * intercept
        out[index] = torch.where(unstable, score, torch.full_like(score, -torch.inf))
    return out


def choose_splits(net, bounds, record, worst):
    """(ReLU layer index, neuron) to split in each sub-problem, or None where none is left unstable."""
    per_layer = scores(net, bounds, record, worst)
    best = torch.stack([values.max(dim=1).values for values in per_layer.values()], dim=1)  # (B, layers)
    layers = list(per_layer)
    picks = []
    for domain in range(len(best)):
        where = int(best[domain].argmax())
        if not torch.isfinite(best[domain, where]):
            picks.append(None)
            continue
        index = layers[where]
        picks.append((index, int(per_layer[index][domain].argmax())))
    return picks


def minimizers(record, worst, box):
    """The input that minimizes each sub-problem's worst row's linear bound over the box (L-infinity)."""
    rows = row_of(record["input"], worst)
    return torch.where(rows > 0, box.lower, box.upper)


def branch_and_bound(net, bounds, box, label, is_counterexample, deadline, batch_size=256, iterations=ITERATIONS,
                     refine=None):
    """Split until every sub-problem is proved (robust), a bound's minimizing input is a counterexample (not
    robust) or the clock reaches `deadline` (unknown). `bounds`: the root's layer bounds (layer_bounds, one image);
    `is_counterexample(pixels)`: the model's own verdict on flat pixels (the caller rounds them to the lattice and
    checks the budget). `batch_size`: sub-problems bounded in one pass (capped so a pass keeps about BLOCK
    elements a block). `refine`: how a sub-problem's intermediate bounds are recomputed below its splits, "crown"
    or "interval" (default: `refinement`'s rule)."""
    refine = refine or refinement(net)
    body = Net(net.layers[:-1], net.input_size)  # a margin's rows need the logits' inputs' bounds, not the logits'
    classes = bounds[-1][0].shape[1]
    rows = margin_rows([label], classes, box.lower.dtype, box.lower.device)[0]
    per_pass = max(1, min(batch_size, BLOCK // (2 * (classes - 1) * widest(net.layers))))
    relus = [index for index, layer in enumerate(net.layers) if isinstance(layer, ReLU)]
    root = {index: torch.zeros(bounds[index][0].shape[1], dtype=torch.int8, device=box.lower.device)
            for index in relus}
    queue, counter, explored, lowest = [Domain(-np.inf, 0, root)], 1, 0, -np.inf
    while queue and time.perf_counter() < deadline:
        picked = [heapq.heappop(queue) for _ in range(min(per_pass, len(queue)))]
        splits = {index: torch.stack([domain.splits[index] for domain in picked]).to(box.lower.dtype)
                  for index in relus}
        sub_box = box.repeat(torch.tensor([len(picked)], device=box.lower.device))
        sub_bounds = layer_bounds(body, sub_box, refine, prior=bounds, splits=splits) + [bounds[-1]]
        record = {}
        margins = optimized_bound(net, sub_bounds, sub_box, rows.expand(len(picked), -1, -1),
                                  torch.full((len(picked), classes - 1), -torch.inf, dtype=box.lower.dtype,
                                             device=box.lower.device), iterations, LR,
                                  splits=splits, record=record, deadline=deadline)
        explored += len(picked)
        worst_value, worst = margins.min(dim=1)
        candidates = minimizers(record, worst, sub_box) if box.budget is None else [None] * len(picked)
        for domain in range(len(picked)):
            if worst_value[domain] <= 0 and candidates[domain] is not None and is_counterexample(candidates[domain]):
                return Outcome("not robust", candidates[domain].cpu().double().numpy(), float(worst_value[domain]),
                               explored)
        choices = choose_splits(net, sub_bounds, record, worst)
        for domain, choice in zip(range(len(picked)), choices):
            if worst_value[domain] > 0:
                continue
            if choice is None:  # every ReLU fixed and still no proof: leave it to the MILP
                return Outcome("unknown", None, float(worst_value.min()), explored)
            index, neuron = choice
            for sign in (1, -1):
                child = {key: value.clone() for key, value in picked[domain].splits.items()}
                child[index][neuron] = sign
                heapq.heappush(queue, Domain(float(worst_value[domain]), counter, child))
                counter += 1
        lowest = queue[0].bound if queue else np.inf  # the heap's first is its lowest bound
    return Outcome("robust" if not queue else "unknown", None, float(lowest), explored)
