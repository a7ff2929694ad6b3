"""The mixed-integer linear program of Tjeng, Xiao and Tedrake 2019 ("Evaluating Robustness of Neural Networks with
Mixed Integer Programming") for a piecewise-linear network (utils.certify.network) over an input ball, solved by
HiGHS through scipy.optimize.milp.

Variables: the input pixels in levels (integers on the 8-bit lattice, reals for the continuous ball; for L1 also
each pixel's increase and decrease, whose sum is the budget's), then every layer's outputs within the bounds that
utils.certify.bounds proved. An affine layer is its equalities. A ReLU whose input bounds are both >= 0 is the
identity and one whose bounds are both <= 0 is zero; one whose bounds straddle zero gets one binary delta (on or
off) and the big-M constraints a >= 0, a >= z, a <= z - l (1 - delta), a <= u delta, exact for z in [l, u]. A max
pool output m is the max of the inputs that can be the largest (upper bound above the largest lower bound, and the
input with that lower bound): with one candidate m equals it; else one binary per candidate, m >= z_j,
m <= z_j + (u_max - l_j)(1 - delta_j) and one delta set. The tighter the bounds, the fewer binaries and the smaller the big-Ms.

`MarginProgram(network, ball, bounds, lattice).solve(label, target, threshold, time_limit)` asks whether some input
of the ball has logit[label] - logit[target] <= threshold: "infeasible" (none: proved), "found" (the input's levels
and its margin in the program) or "time" (the limit ran out; with HiGHS's lower bound on the margin).
"""
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from utils.certify.network import Affine, ReLU

LEVELS = 255.0
SLACK = 1e-6  # bounds widened by this (relative) before they become big-Ms: float rounding must not cut a real point


@dataclass
class Answer:
    status: str               # "infeasible", "found" or "time"
    levels: np.ndarray | None  # the input found, flat (3*H*W,), in levels
    bound: float | None       # HiGHS's proved lower bound on the margin when the limit ran out


class Builder:
    """Accumulates variables (bounds, integrality) and sparse constraint rows lo <= a @ x <= hi."""

    def __init__(self):
        self.lower, self.upper, self.integer = [], [], []
        self.rows, self.cols, self.values, self.row_lo, self.row_hi = [], [], [], [], []

    def variables(self, lower, upper, integer=False):
        start = len(self.lower)
        self.lower += list(lower)
        self.upper += list(upper)
        self.integer += [int(integer)] * len(lower)
        return np.arange(start, start + len(lower))

    def constraints(self, matrix, lo, hi):
        """Rows of a sparse (rows, variables-so-far) matrix, columns as variable indices."""
        matrix = sparse.coo_matrix(matrix)
        base = len(self.row_lo)
        self.rows.append(matrix.row + base)
        self.cols.append(matrix.col)
        self.values.append(matrix.data)
        self.row_lo += list(np.broadcast_to(lo, matrix.shape[0]))
        self.row_hi += list(np.broadcast_to(hi, matrix.shape[0]))

    def entries(self, rows, cols, values, lo, hi):
        """Constraints given entry by entry: row r (0-based within this call) has values at cols."""
        count = int(max(rows) + 1) if len(rows) else 0
        matrix = sparse.coo_matrix((values, (rows, cols)), shape=(count, len(self.lower)))
        self.constraints(matrix, lo, hi)

    def matrix(self):
        rows, cols, values = (np.concatenate(part) if part else np.zeros(0) for part in
                              (self.rows, self.cols, self.values))
        return sparse.csr_matrix((values, (rows, cols)), shape=(len(self.row_lo), len(self.lower)))


def widened(lower, upper):
    pad = SLACK * (1 + np.maximum(abs(lower), abs(upper)))
    return lower - pad, upper + pad


class MarginProgram:
    """The network's MILP over one ball: built once, solved once per target class."""

    def __init__(self, network, ball, bounds, lattice=True):
        self.network, self.ball = network, ball
        build = Builder()
        center = ball.center * LEVELS
        lo, hi = ball.lower * LEVELS, ball.upper * LEVELS
        if lattice:
            lo, hi = np.ceil(lo - 1e-9), np.floor(hi + 1e-9)
        self.inputs = build.variables(lo, hi, integer=lattice)
        if ball.norm == "L1":
            self.l1_budget(build, center, lo, hi, lattice)
        self.binaries = 0
        current, scale = self.inputs, 1 / LEVELS  # the first layer reads levels: its weights over 255
        for layer, (lower, upper) in zip(network.layers, bounds[1:]):
            lower, upper = widened(lower, upper)
            if isinstance(layer, Affine):
                current = self.affine(build, layer, current, lower, upper, scale)
            elif isinstance(layer, ReLU):
                current = self.relu(build, current, bounds_of(bounds, layer, network))
            else:
                current = self.max_pool(build, layer, current, bounds_of(bounds, layer, network))
            scale = 1.0
        self.logits = current
        self.build = build
        self.A = build.matrix()
        self.constraint_count = self.A.shape[0]
        self.variable_count = self.A.shape[1]

    def l1_budget(self, build, center, lo, hi, lattice):
        """v = center + up - down, sum(up + down) <= budget (levels): |v - center| summed is at most the budget."""
        count = len(self.inputs)
        up = build.variables(np.zeros(count), np.maximum(hi - center, 0))
        down = build.variables(np.zeros(count), np.maximum(center - lo, 0))
        index = np.arange(count)
        build.entries(np.concatenate([index, index, index]), np.concatenate([self.inputs, up, down]),
                      np.concatenate([np.ones(count), -np.ones(count), np.ones(count)]), center, center)
        budget = self.ball.budget * LEVELS
        build.entries(np.zeros(2 * count, dtype=int), np.concatenate([up, down]), np.ones(2 * count), -np.inf,
                      np.floor(budget + 1e-9) if lattice else budget)

    def affine(self, build, layer, previous, lower, upper, scale):
        outputs = build.variables(lower, upper)
        weight = sparse.coo_matrix(layer.weight * scale)
        rows = np.concatenate([weight.row, np.arange(len(outputs))])
        cols = np.concatenate([previous[weight.col], outputs])
        values = np.concatenate([-weight.data, np.ones(len(outputs))])
        build.entries(rows, cols, values, layer.bias, layer.bias)
        return outputs

    def relu(self, build, inputs, input_bounds):
        lower, upper = input_bounds
        lower, upper = widened(lower, upper)
        active, inactive = lower >= 0, upper <= 0
        unstable = np.flatnonzero(~active & ~inactive)
        outputs = build.variables(np.zeros(len(inputs)), np.where(inactive, 0.0, np.maximum(upper, 0)))
        on = np.flatnonzero(active)
        build.entries(np.concatenate([np.arange(len(on))] * 2), np.concatenate([outputs[on], inputs[on]]),
                      np.concatenate([np.ones(len(on)), -np.ones(len(on))]), 0.0, 0.0)
        if len(unstable):
            delta = build.variables(np.zeros(len(unstable)), np.ones(len(unstable)), integer=True)
            self.binaries += len(unstable)
            a, z, l, u, k = outputs[unstable], inputs[unstable], lower[unstable], upper[unstable], len(unstable)
            rows = np.arange(k)
            build.entries(np.concatenate([rows, rows]), np.concatenate([a, z]),
                          np.concatenate([np.ones(k), -np.ones(k)]), 0.0, np.inf)               # a >= z
            build.entries(np.concatenate([rows, rows, rows]), np.concatenate([a, z, delta]),
                          np.concatenate([np.ones(k), -np.ones(k), -l]), -np.inf, -l)           # a <= z - l (1 - d)
            build.entries(np.concatenate([rows, rows]), np.concatenate([a, delta]),
                          np.concatenate([np.ones(k), -u]), -np.inf, 0.0)                     # a <= u d
        return outputs

    def max_pool(self, build, pool, inputs, input_bounds):
        windows = pool.windows
        exact_lo, exact_hi = (np.concatenate([bound, [-np.inf]])[windows] for bound in input_bounds)
        # z_j can be the largest only if its upper bound beats every lower bound; the input with the largest lower
        # bound always can. On the bounds as proved: widened, a dead input ([0, 0] after its ReLU) would pass the
        # test and bring a big-M of 2e-6 that HiGHS fails on
        first = exact_lo.argmax(axis=1)
        candidate = (windows >= 0) & (exact_hi > exact_lo.max(axis=1, keepdims=True))
        candidate[np.arange(len(windows)), first] = True
        lower, upper = widened(*input_bounds)
        lo = np.concatenate([lower, [-np.inf]])[windows]
        hi = np.concatenate([upper, [-np.inf]])[windows]
        floor = lo.max(axis=1)
        outputs = build.variables(floor, hi.max(axis=1))
        single = candidate.sum(axis=1) == 1
        alone = np.flatnonzero(single)
        if len(alone):  # m = z_j
            rows = np.arange(len(alone))
            build.entries(np.concatenate([rows, rows]),
                          np.concatenate([outputs[alone], inputs[windows[alone, candidate[alone].argmax(axis=1)]]]),
                          np.concatenate([np.ones(len(alone)), -np.ones(len(alone))]), 0.0, 0.0)
        window, slot = np.nonzero(candidate & ~single[:, None])  # grouped by window, in order
        if len(window):
            count = len(window)
            delta = build.variables(np.zeros(count), np.ones(count), integer=True)
            self.binaries += count
            m, z = outputs[window], inputs[windows[window, slot]]
            big = np.where(candidate, hi, -np.inf).max(axis=1)[window] - lower[windows[window, slot]]
            rows, ones = np.arange(count), np.ones(count)
            build.entries(np.concatenate([rows, rows]), np.concatenate([m, z]), np.concatenate([ones, -ones]),
                          0.0, np.inf)                                                           # m >= z_j
            build.entries(np.concatenate([rows, rows, rows]), np.concatenate([m, z, delta]),
                          np.concatenate([ones, -ones, big]), -np.inf, big)    # m <= z_j + big (1 - d_j)
            group = np.unique(window, return_inverse=True)[1]
            build.entries(group, delta, ones, 1.0, 1.0)                           # one d_j set per window
        return outputs

    def solve(self, label, targets, threshold, time_limit, logit_bounds):
        """Is there an input with logit[label] - logit[t] <= threshold for some t of `targets`? One program for all
        of them: a binary s_t per target picks the class that wins, margin_t <= threshold + M_t (1 - s_t) with M_t
        from the logits' bounds `logit_bounds` (lower, upper), and the s_t sum to one. No objective: the first point
        found answers the question, and infeasibility proves every target at once."""
        lower, upper = logit_bounds
        count, k = self.variable_count, len(targets)
        picks = np.arange(count, count + k)
        big = np.maximum(upper[label] - np.asarray(lower)[targets] - threshold, 0) * (1 + SLACK) + SLACK
        rows = np.repeat(np.arange(k), 3)
        cols = np.stack([np.full(k, self.logits[label]), self.logits[targets], picks], axis=1).reshape(-1)
        values = np.stack([np.ones(k), -np.ones(k), big], axis=1).reshape(-1)
        rows = np.concatenate([rows, np.full(k, k)])
        cols = np.concatenate([cols, picks])
        values = np.concatenate([values, np.ones(k)])
        extra = sparse.csr_matrix((values, (rows, cols)), shape=(k + 1, count + k))
        matrix = sparse.vstack([sparse.hstack([self.A, sparse.csr_matrix((self.A.shape[0], k))]), extra]).tocsr()
        row_lo = np.concatenate([self.build.row_lo, np.full(k, -np.inf), [1.0]])
        row_hi = np.concatenate([self.build.row_hi, threshold + big, [1.0]])
        integrality = np.concatenate([self.build.integer, np.ones(k)])
        var_lo = np.concatenate([self.build.lower, np.zeros(k)])
        var_hi = np.concatenate([self.build.upper, np.ones(k)])
        started = time.perf_counter()
        result = milp(np.zeros(count + k), constraints=[LinearConstraint(matrix, row_lo, row_hi)],
                      integrality=integrality, bounds=Bounds(var_lo, var_hi),
                      options={"time_limit": max(time_limit, 0.01), "presolve": True})
        self.seconds = time.perf_counter() - started
        if result.status == 2:  # infeasible: no input of the ball brings any margin down to the threshold
            return Answer("infeasible", None, None)
        if result.x is not None:
            return Answer("found", result.x[self.inputs], None)
        if result.status == 1:  # the time limit, nothing found
            return Answer("time", None, None)
        raise RuntimeError(f"HiGHS failed on the verification program: {result.message}")


def bounds_of(bounds, layer, network):
    """The bounds of the input of `layer` (an entry of network.layers)."""
    index = next(i for i, item in enumerate(network.layers) if item is layer)
    return bounds[index]
