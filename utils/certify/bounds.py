"""The input ball (`make_ball`) every certifier starts from, and a dense NumPy CROWN: the reference the tensor bounds
of utils.certify.propagation (what the certifiers run) are tested against. Interval bound propagation, and CROWN's
linear bounds (Zhang, Weng, Chen, Hsieh and Daniel 2018, "Efficient Neural Network Robustness Certification with
General Activation Functions"), each layer a dense float64 matrix and CROWN for every neuron: exact arithmetic to
compare with, too slow for a convolutional network.

The input set (`Ball`): the pixels (flat, in [0, 1]) within `epsilon` of an image in L-infinity or L1, intersected
with [0, 1]; on the 8-bit lattice the L-infinity box is cut to whole levels and the L1 budget to a whole number of
levels, a superset of the lattice points that stays sound for them. Every bound here holds for every point of the
set (the relaxations only ever widen): the minimum of a linear function over the set is exact (an L-infinity box
takes each coordinate's better end; L1 in a box is a fractional knapsack, filled greedily), and each ReLU or max pool
is replaced by linear functions below and above it on its input's interval.

- `layer_bounds(network, ball, method)`: (lower, upper) of every layer's input and of the logits; `method`
  "interval" (IBP: each affine layer bounds its outputs from its input's box) or "crown" (each affine layer's
  outputs bounded by a backward pass to the input through the relaxations, the adaptive lower slope of CROWN: 1
  where u > -l, else 0).
- `margin_bounds(network, ball, label, bounds)`: for each class t, a lower bound on logit[label] - logit[t] over the
  ball (+inf for t = label); all of them above 0 proves that no point of the ball changes the class.
"""
from dataclasses import dataclass

import numpy as np

from utils.certify.network import Affine, MaxPool, ReLU
# scipy is imported where it is used (utils/certify/__init__.py says why)

ROWS = 512  # rows of a backward pass at once (memory: ROWS x the widest layer, float64)
LEVELS = 255.0


@dataclass(frozen=True, eq=False)
class Ball:
    """Flat pixels in [0, 1]: `center`, the box [lower, upper] that holds the set, and for L1 the `budget` (the
    largest sum of absolute changes, [0, 1] units; None for L-infinity)."""
    center: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    norm: str
    budget: float | None


def make_ball(image_u8, norm, epsilon, lattice=True):
    """The input set around an 8-bit (H, W, 3) image: `epsilon` in levels out of 255 for "Linf" ([0, 255]), in [0, 1]
    pixel units summed over the whole (3, H, W) image for "L1". `lattice`: only whole levels (what a PNG holds)."""
    levels = np.asarray(image_u8, dtype=np.float64).transpose(2, 0, 1).reshape(-1)
    if norm == "Linf":
        radius = np.floor(epsilon + 1e-9) if lattice else float(epsilon)
        lower, upper = np.clip(levels - radius, 0, LEVELS), np.clip(levels + radius, 0, LEVELS)
        return Ball(levels / LEVELS, lower / LEVELS, upper / LEVELS, norm, None)
    if norm == "L1":
        budget = np.floor(epsilon * LEVELS + 1e-9) / LEVELS if lattice else float(epsilon)
        center = levels / LEVELS
        return Ball(center, np.clip(center - budget, 0, 1), np.clip(center + budget, 0, 1), norm, budget)
    raise ValueError(f"norm {norm!r}: bounds cover Linf and L1")


def minimum(A, const, ball):
    """min over the ball of A @ x + const, per row of A (m, n), dense or sparse: exact over the ball (the value of
    a linear program)."""
    import scipy.sparse as sparse
    if ball.norm == "Linf":
        if sparse.issparse(A):
            return const + A.maximum(0) @ ball.lower + A.minimum(0) @ ball.upper
        return const + np.maximum(A, 0) @ ball.lower + np.minimum(A, 0) @ ball.upper
    if sparse.issparse(A):
        return np.concatenate([l1_minimum(A[start:start + ROWS].toarray(), const[start:start + ROWS], ball)
                               for start in range(0, A.shape[0], ROWS)])
    return l1_minimum(A, const, ball)


def l1_minimum(A, const, ball):
    """L1 in a box: start at the centre, and spend the budget on the coordinates with the largest |A|, each moved
    towards the end that lowers A @ x, as far as the box lets it (the greedy solution of a fractional knapsack)."""
    base = const + A @ ball.center
    room = np.where(A > 0, ball.center - ball.lower, ball.upper - ball.center)
    order = np.argsort(-np.abs(A), axis=1)
    gain = np.take_along_axis(np.abs(A), order, axis=1)
    room = np.take_along_axis(room, order, axis=1)
    before = np.cumsum(room, axis=1) - room
    spent = np.clip(ball.budget - before, 0, room)
    return base - (gain * spent).sum(axis=1)


def relu_relaxation(lower, upper):
    """(lower slope, upper slope, upper intercept) of CROWN's linear bounds on relu(z) for z in [lower, upper]:
    below, a line through the origin of slope 1 (u > -l) or 0; above, the chord from (l, 0) to (u, u)."""
    active, inactive = lower >= 0, upper <= 0
    unstable = ~active & ~inactive
    width = np.where(unstable, upper - lower, 1.0)
    up_slope = np.where(active, 1.0, np.where(unstable, upper / width, 0.0))
    up_intercept = np.where(unstable, -upper * lower / width, 0.0)
    low_slope = np.where(active, 1.0, np.where(unstable, (upper > -lower).astype(float), 0.0))
    return low_slope, up_slope, up_intercept


def pool_relaxation(pool, lower, upper):
    """For each max pool output: the input it is at least (the one with the largest lower bound), whether it is
    exactly that input (its lower bound reaches every other input's upper bound), and the constant above it (the
    largest upper bound of its window)."""
    lo = np.concatenate([lower, [-np.inf]])[pool.windows]
    hi = np.concatenate([upper, [-np.inf]])[pool.windows]
    pick = np.argmax(lo, axis=1)
    chosen = pool.windows[np.arange(len(pick)), pick]
    others = hi.copy()
    others[np.arange(len(pick)), pick] = -np.inf
    exact = lo[np.arange(len(pick)), pick] >= others.max(axis=1)
    return chosen, exact, hi.max(axis=1)


def backward(layers, bounds, A, const):
    """(A', const') with A @ v_top + const >= A' @ pixels + const' on the ball, passing back through `layers` (the
    layers below v_top, in order) with the input bounds `bounds` of each."""
    for layer, (lower, upper) in zip(reversed(layers), reversed(bounds)):
        if isinstance(layer, Affine):
            const = const + A @ layer.bias
            A = np.asarray((layer.weight.T @ A.T).T)
        elif isinstance(layer, ReLU):
            low_slope, up_slope, up_intercept = relu_relaxation(lower, upper)
            positive, negative = np.maximum(A, 0), np.minimum(A, 0)
            const = const + negative @ up_intercept
            A = positive * low_slope + negative * up_slope
        else:
            chosen, exact, ceiling = pool_relaxation(layer, lower, upper)
            positive, negative = np.maximum(A, 0), np.minimum(A, 0)
            routed = positive + negative * exact
            const = const + (negative * ~exact) @ ceiling
            import scipy.sparse as sparse
            select = sparse.csr_matrix((np.ones(len(chosen)), (np.arange(len(chosen)), chosen)),
                                       shape=(len(chosen), len(lower)))
            A = np.asarray((select.T @ routed.T).T)
    return A, const


def lower_bound(layers, bounds, A, const, ball):
    """A sound lower bound of A @ v + const over the ball, v the output of `layers` (CROWN), ROWS rows at a time."""
    out = []
    for start in range(0, len(A), ROWS):
        back, shift = backward(layers, bounds, A[start:start + ROWS], const[start:start + ROWS])
        out.append(minimum(back, shift, ball))
    return np.concatenate(out) if out else np.zeros(0)


def interval_affine(layer, lower, upper):
    middle, radius = (upper + lower) / 2, (upper - lower) / 2
    centre = layer.weight @ middle + layer.bias
    spread = abs(layer.weight) @ radius
    return centre - spread, centre + spread


def crown_affine(layers, bounds, ball, size):
    """(lower, upper) of the output of layers[-1] (an Affine) by CROWN: the identity's rows, then their negation."""
    low, high = [], []
    for start in range(0, size, ROWS):
        rows = np.zeros((min(ROWS, size - start), size))
        rows[np.arange(len(rows)), start + np.arange(len(rows))] = 1.0
        zero = np.zeros(len(rows))
        low.append(lower_bound(layers, bounds, rows, zero, ball))
        high.append(-lower_bound(layers, bounds, -rows, zero, ball))
    return np.concatenate(low), np.concatenate(high)


def layer_bounds(network, ball, method="crown"):
    """[(lower, upper)] of v_0 (the pixels), v_1, ..., v_L (the logits), v_{i+1} the output of network.layers[i]."""
    bounds = [(ball.lower, ball.upper)]
    for index, layer in enumerate(network.layers):
        lower, upper = bounds[-1]
        if isinstance(layer, ReLU):
            bounds.append((np.maximum(lower, 0), np.maximum(upper, 0)))
        elif isinstance(layer, MaxPool):
            bounds.append(pool_interval(layer, lower, upper))
        elif index == 0:  # affine in the pixels: the exact range over the ball
            weight = layer.weight
            bounds.append((minimum(weight, layer.bias, ball), -minimum(-weight, -layer.bias, ball)))
        elif method == "interval":
            bounds.append(interval_affine(layer, lower, upper))
        else:
            low, high = crown_affine(network.layers[:index + 1], bounds, ball, layer.weight.shape[0])
            ibp_low, ibp_high = interval_affine(layer, lower, upper)  # both sound: keep the tighter end of each
            bounds.append((np.maximum(low, ibp_low), np.minimum(high, ibp_high)))
    return bounds


def pool_interval(pool, lower, upper):
    lo = np.concatenate([lower, [-np.inf]])[pool.windows].max(axis=1)
    hi = np.concatenate([upper, [-np.inf]])[pool.windows].max(axis=1)
    return lo, hi


def margin_bounds(network, ball, label, bounds, method="crown"):
    """Lower bounds (classes,) on logit[label] - logit[t] over the ball for every t (+inf at t = label)."""
    classes = network.layers[-1].weight.shape[0]
    others = [t for t in range(classes) if t != label]
    A = np.zeros((len(others), classes))
    A[:, label] = 1.0
    A[np.arange(len(others)), others] = -1.0
    if method == "interval":
        lower, upper = bounds[-1]
        values = lower[label] - upper[others]
    else:
        values = lower_bound(network.layers, bounds[:-1], A, np.zeros(len(others)), ball)
    out = np.full(classes, np.inf)
    out[others] = values
    return out
