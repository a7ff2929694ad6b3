"""Bound propagation on tensors: interval bounds (IBP), CROWN (Zhang, Weng, Chen, Hsieh and Daniel 2018) and
alpha-CROWN (Xu, Zhang, Wang, Wang, Jana, Lin and Hsieh 2021, "Fast and Complete"), batched over images (or branch
and bound's sub-problems) and the rows being bounded, on any device.

A network here (`Net`) is a list of layers on flat vectors, from the pixels in [0, 1] to the logits:
- `Linear`: an affine map with its own three operations: `forward` (W x + b), `transpose` (rows R -> R W: the
  layer's backward operation, a convolution's transposed convolution, never a dense matrix of the layer; a fully
  connected layer's is its own dense W) and `magnitude` (|W| r, for intervals). Two makers: `Net.from_layers`
  (step 10's graph of a model file, each affine stretch run as the graph runs it and transposed by differentiating
  it, |W| from its sparse matrix) and
  `Net.from_module` (a training network's Conv2d, Linear, pooling and Flatten modules on their live parameters, so
  that a bound is differentiable in the weights: certified training).
- `ReLU`, and `MaxPool` (each output's window of flat input indices, -1 for padding).

The input set is a `Box` (L-infinity: each pixel in [lower, upper]) or a box with an L1 `budget` around `center`;
both are what utils.certify.bounds.make_ball builds, on the 8-bit lattice or continuous. Every bound holds for every
point of the set: the minimum of a linear function over it is exact (a box takes each coordinate's better end; L1 in a
box is a fractional knapsack, filled greedily) and each ReLU or max pool is replaced by linear functions below and
above it on its input's interval.

- `layer_bounds(net, box, method, prior=None, splits=None)`: the (lower, upper) of every layer's input and of the
  logits. Interval bounds for every neuron; with method "crown", CROWN's tighter bounds where they change a
  relaxation: the inputs of ReLUs that interval bounds leave unstable and every input (with a positive upper bound)
  of a max-pool window that interval bounds leave undecided (`neurons="all"`: every neuron, as the NumPy bounds of
  utils.certify.bounds do). Branch and bound's sub-problems: within the root's bounds, split neurons cut at zero.
- `margin_bounds(net, box, labels, bounds, method)`: lower bounds on logit[label] - logit[t] for every class t
  (+inf at t = label); "interval", "crown" (at least the interval bound) or "alpha-crown" (at least CROWN's: the
  lower slopes of the unstable ReLUs optimized by gradient ascent on the bound, each iterate sound, the best kept).

Memory: each backward pass carries its rows as one (images x rows x width) block; the rows bounded at once are cut so
that a block holds at most BLOCK elements (256 MiB in float64), and a pass keeps about four such blocks alive (its
positive and negative parts and the result), so a CROWN pass peaks near 1 GiB on top of the network, whatever the
layer's size. alpha-CROWN keeps its graph for the margins' rows only (classes - 1 rows per image), one block per layer.

Floating point: in float64 (the default, on the CPU) rounding moves a bound by about 1e-16 of its terms, far inside
the 1e-9-level margins the verdicts use; in float32 (CUDA) every bound is moved outward by FLOAT32_SLACK x (1 + |b|),
a margin tests/test_propagation.py checks against the float64 bounds on random and trained networks.
"""
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils.certify.network import Affine, MaxPool as GraphMaxPool, ReLU as GraphReLU, pool_windows
from utils.cli import UsageError

BLOCK = 2 ** 25  # elements of one block of backward rows
DENSE_SHARE = 0.25  # a graph layer whose W has at least this share of nonzeros transposes by its dense matrix
FLOAT32_SLACK = 1e-4  # outward margin of float32 bounds, relative to (1 + |bound|)
METHODS = ("interval", "crown", "alpha-crown")
ALPHA_ITERATIONS, ALPHA_LR = 20, 0.1


# ---- the layers -----------------------------------------------------------------------------------------------

class Linear:
    """An affine layer x -> W x + b on flat vectors (batch, in_size)."""

    def __init__(self, forward, transpose, magnitude, bias, in_size, out_size, matrix=None):
        self._forward, self._transpose, self._magnitude, self._bias = forward, transpose, magnitude, bias
        self.in_size, self.out_size = in_size, out_size
        self.matrix = matrix  # the graph's sparse W (scipy CSR, float64), for sparse rows (crown_neurons)

    def forward(self, x):
        return self._forward(x)

    def transpose(self, rows):
        """rows (N, out_size) -> rows @ W (N, in_size)."""
        return self._transpose(rows)

    def magnitude(self, radius):
        """|W| @ radius for a batch of non-negative radii (B, in_size)."""
        return self._magnitude(radius)

    @property
    def bias(self):
        return self._bias() if callable(self._bias) else self._bias


class ReLU:
    def __init__(self, size):
        self.in_size = self.out_size = size


class MaxPool:
    """Output o is the largest of x[windows[o, k]] over the k with windows[o, k] >= 0."""

    def __init__(self, windows, in_size):
        self.windows, self.in_size, self.out_size = windows, in_size, len(windows)


@dataclass
class Net:
    layers: list
    input_size: int

    @classmethod
    def from_layers(cls, network, dtype=torch.float64, device="cpu"):
        """The tensor layers of step 10's graph (utils.certify.network.Layers)."""
        size, layers = int(np.prod(network.input_shape)), []
        for layer in network.layers:
            if isinstance(layer, Affine):
                layers.append(graph_linear(layer, size, dtype, device))
            elif isinstance(layer, GraphReLU):
                layers.append(ReLU(layer.size))
            else:
                layers.append(MaxPool(torch.as_tensor(layer.windows, device=device), size))
            size = layers[-1].out_size
        return cls(layers, int(np.prod(network.input_shape)))

    @classmethod
    def from_module(cls, net, input_shape, mean=None, std=None):
        """The layers of a training network (its parameters live: bounds are differentiable in them), after the
        normalization (x - mean) / std when given. Modules: Conv2d, Linear, ReLU, MaxPool2d, AvgPool2d,
        AdaptiveAvgPool2d, Flatten, nn.Sequential of them, and the project's SmallCNN (features, classifier)."""
        shape, layers = tuple(input_shape), []
        if mean is not None:
            layers.append(normalization_linear(mean, std, shape))
        device = next(net.parameters()).device
        for module in flat_modules(net):
            layer, shape = module_layer(module, shape, device)
            if layer is not None:
                layers.append(layer)
        return cls(layers, int(np.prod(input_shape)))

    def logits(self, pixels):
        """The network's output for flat pixels (B, input_size): the layers' own forward."""
        values = pixels
        for layer in self.layers:
            values = apply(layer, values)
        return values


def apply(layer, values):
    if isinstance(layer, Linear):
        return layer.forward(values)
    if isinstance(layer, ReLU):
        return values.clamp(min=0)
    return padded(values, -torch.inf)[:, layer.windows].amax(dim=2)


def padded(values, fill):
    """values (B, n) with one more column of `fill`: where a window's -1 (padding) points."""
    return torch.cat([values, values.new_full((len(values), 1), fill)], dim=1)


def graph_linear(affine, in_size, dtype, device):
    """A graph Affine as a Linear: forward and transpose by the graph's own arithmetic, |W| from its sparse matrix."""
    run = affine.run
    forward = lambda x: run(x).reshape(len(x), -1)
    bias = torch.as_tensor(affine.bias, dtype=dtype, device=device)
    magnitude_matrix = abs(affine.weight).tocsr()
    with warnings.catch_warnings():  # "sparse CSR support is in beta": matrix products are all we ask of it
        warnings.simplefilter("ignore", UserWarning)
        absolute = torch.sparse_csr_tensor(torch.as_tensor(magnitude_matrix.indptr, dtype=torch.int64),
                                           torch.as_tensor(magnitude_matrix.indices, dtype=torch.int64),
                                           torch.as_tensor(magnitude_matrix.data, dtype=dtype),
                                           size=magnitude_matrix.shape, check_invariants=False).to(device)
    weight = affine.weight
    if weight.nnz >= DENSE_SHARE * np.prod(weight.shape) and np.prod(weight.shape) <= BLOCK:
        dense = torch.as_tensor(weight.toarray(), dtype=dtype, device=device)  # a fully connected layer is its matrix
        transpose = lambda rows: rows @ dense
    else:
        transpose = linear_transpose(forward, in_size, dtype, device)
    return Linear(forward, transpose, lambda r: (absolute @ r.T).T, bias, in_size, weight.shape[0], weight)


def linear_transpose(forward, in_size, dtype, device):
    """rows -> rows @ W for an affine `forward`: its vector-Jacobian product, the backward operation autograd has for
    each of its operations (a convolution's is a transposed convolution), taken once at one point (the map is
    affine: its Jacobian is the same everywhere) and mapped over the rows with vmap, which batches it."""
    state = {}

    def transpose(rows):
        if "vjp" not in state:
            state["vjp"] = torch.func.vjp(forward, torch.zeros(1, in_size, dtype=dtype, device=device))[1]
        return torch.func.vmap(lambda row: state["vjp"](row[None])[0][0])(rows)
    return transpose


def normalization_linear(mean, std, shape):
    channels = shape[0]
    mean, std = mean.reshape(channels, 1, 1), std.reshape(channels, 1, 1)
    scale = lambda x: (x.reshape(len(x), *shape) / std).reshape(len(x), -1)
    return Linear(lambda x: ((x.reshape(len(x), *shape) - mean) / std).reshape(len(x), -1), scale, scale,
                  lambda: (-mean / std).expand(shape).reshape(-1), int(np.prod(shape)), int(np.prod(shape)))


def flat_modules(net):
    from utils.training import SmallCNN
    if isinstance(net, nn.Sequential):
        return [leaf for child in net for leaf in flat_modules(child)]
    if isinstance(net, SmallCNN):
        return flat_modules(net.features) + flat_modules(net.classifier)
    return [net]


def module_layer(module, shape, device):
    """(the layer of one module, or None for a reshape, the output shape)."""
    size = int(np.prod(shape))
    if isinstance(module, nn.ReLU):
        return ReLU(size), shape
    if isinstance(module, nn.Flatten):
        return None, (size,)
    if isinstance(module, nn.MaxPool2d):
        windows, out_shape = pool_windows(shape, module.kernel_size, module.stride or module.kernel_size,
                                          module.padding, module.dilation, module.ceil_mode)
        return MaxPool(torch.as_tensor(windows, device=device), size), out_shape
    if isinstance(module, nn.Linear):
        return Linear(lambda x: F.linear(x, module.weight, module.bias), lambda rows: rows @ module.weight,
                      lambda r: r @ module.weight.abs().T, lambda: module.bias, module.in_features,
                      module.out_features), (module.out_features,)
    if isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str):
        return conv_linear(module, shape)
    if isinstance(module, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        out_shape = tuple(module(torch.zeros(1, *shape)).shape[1:])
        forward = lambda x: module(x.reshape(len(x), *shape)).reshape(len(x), -1)
        return Linear(forward, pooling_transpose(forward, size), forward, None, size, int(np.prod(out_shape))), \
            out_shape
    raise UsageError(f"the bounds cannot cover {type(module).__name__}: they cover Conv2d, Linear, ReLU, MaxPool2d, "
                     "AvgPool2d, AdaptiveAvgPool2d and Flatten")


def pooling_transpose(forward, in_size):
    def transpose(rows):
        return torch.func.vjp(forward, rows.new_zeros(len(rows), in_size))[1](rows)[0]
    return transpose


def conv_linear(conv, shape):
    out_shape = tuple(conv(conv.weight.new_zeros(1, *shape)).shape[1:])
    size, out_size = int(np.prod(shape)), int(np.prod(out_shape))
    arguments = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)

    def forward(x):
        return F.conv2d(x.reshape(len(x), *shape), conv.weight, conv.bias, **arguments).reshape(len(x), -1)

    def transpose(rows):
        grid = rows.reshape(len(rows), *out_shape)
        # the transposed convolution's output can be a few pixels short of the input (strides): pad its end
        extra = [shape[1 + i] - ((out_shape[1 + i] - 1) * conv.stride[i] - 2 * conv.padding[i]
                                 + conv.dilation[i] * (conv.kernel_size[i] - 1) + 1) for i in range(2)]
        return F.conv_transpose2d(grid, conv.weight, None, conv.stride, conv.padding, tuple(extra), conv.groups,
                                  conv.dilation).reshape(len(rows), -1)

    def magnitude(radius):
        return F.conv2d(radius.reshape(len(radius), *shape), conv.weight.abs(), None, **arguments).reshape(
            len(radius), -1)

    bias = (lambda: conv.bias.reshape(-1, 1, 1).expand(out_shape).reshape(-1)) if conv.bias is not None else \
        (lambda: conv.weight.new_zeros(out_size))
    return Linear(forward, transpose, magnitude, bias, size, out_size), out_shape


# ---- the input set --------------------------------------------------------------------------------------------

@dataclass
class Box:
    """Flat pixels in [0, 1] for B images: `lower`, `upper` (B, n), and for L1 the `center` and `budget` (B,)."""
    lower: torch.Tensor
    upper: torch.Tensor
    center: torch.Tensor | None = None
    budget: torch.Tensor | None = None

    @classmethod
    def from_balls(cls, balls, dtype=torch.float64, device="cpu"):
        """The Box of utils.certify.bounds.Ball's (one norm)."""
        stack = lambda name: torch.as_tensor(np.stack([getattr(ball, name) for ball in balls]), dtype=dtype,
                                             device=device)
        if balls[0].norm == "Linf":
            return cls(stack("lower"), stack("upper"))
        budget = torch.as_tensor([ball.budget for ball in balls], dtype=dtype, device=device)
        return cls(stack("lower"), stack("upper"), stack("center"), budget)

    def repeat(self, counts):
        """Each image's set repeated counts[i] times (branch and bound's sub-problems of one image)."""
        pick = lambda value: None if value is None else value.repeat_interleave(counts, dim=0)
        return Box(pick(self.lower), pick(self.upper), pick(self.center), pick(self.budget))


def minimum(rows, const, box):
    """min over the set of rows @ x + const, per image and row: rows (B, R, n), const (B, R)."""
    if box.budget is None:
        return const + torch.einsum("brn,bn->br", rows.clamp(min=0), box.lower) \
            + torch.einsum("brn,bn->br", rows.clamp(max=0), box.upper)
    # L1 in a box: from the centre, spend the budget on the coordinates with the largest |row|, each moved towards
    # the end that lowers the row's value, as far as the box lets it
    base = const + torch.einsum("brn,bn->br", rows, box.center)
    room = torch.where(rows > 0, (box.center - box.lower)[:, None], (box.upper - box.center)[:, None])
    gain, order = rows.abs().sort(dim=2, descending=True)
    room = room.gather(2, order)
    before = room.cumsum(dim=2) - room
    spent = torch.minimum((box.budget[:, None, None] - before).clamp(min=0), room)
    return base - (gain * spent).sum(dim=2)


# ---- relaxations ----------------------------------------------------------------------------------------------

def relu_relaxation(lower, upper):
    """(lower slope, upper slope, upper intercept, unstable) of linear bounds on relu(z), z in [lower, upper]:
    below a line through the origin of slope 1 (u > -l) or 0 (CROWN's adaptive choice), above the chord."""
    active, unstable = lower >= 0, (lower < 0) & (upper > 0)
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    up_slope = torch.where(active, 1.0, torch.where(unstable, upper / width, 0.0))
    up_intercept = torch.where(unstable, -upper * lower / width, 0.0)
    low_slope = torch.where(active, 1.0, torch.where(unstable & (upper > -lower), 1.0, 0.0))
    return low_slope.to(lower.dtype), up_slope.to(lower.dtype), up_intercept, unstable


def pool_relaxation(windows, lower, upper):
    """(chosen input (B, out), exact (B, out), ceiling (B, out)) of each max pool output: at least the input with
    the largest lower bound, exactly it when that lower bound reaches every other input's upper bound, at most the
    window's largest upper bound."""
    lo, hi = padded(lower, -torch.inf)[:, windows], padded(upper, -torch.inf)[:, windows]  # (B, out, k)
    pick = lo.argmax(dim=2, keepdim=True)
    others = hi.scatter(2, pick, -torch.inf).amax(dim=2)
    exact = lo.gather(2, pick)[..., 0] >= others
    return windows[None].expand(len(lower), -1, -1).gather(2, pick)[..., 0], exact, hi.amax(dim=2)


def pool_interval(windows, lower, upper):
    return padded(lower, -torch.inf)[:, windows].amax(dim=2), padded(upper, -torch.inf)[:, windows].amax(dim=2)


# ---- CROWN's backward pass ------------------------------------------------------------------------------------

def backward(layers, bounds, rows, const, alphas=None, betas=None, record=None):
    """(rows', const') with rows @ v + const >= rows' @ pixels + const' for every point of the set, v the output of
    `layers`; rows (B, R, width), const (B, R); bounds[i] the (lower, upper) of layers[i]'s input. `alphas`: {layer
    index: lower slopes (B, R, width) of that ReLU's unstable neurons} (alpha-CROWN); `betas`: {layer index: (B, R,
    width)}, the split constraints' signed multipliers of branch and bound (beta_j s_j: each split neuron's value
    z_j, with s_j z_j >= 0 on the sub-problem, weighted by beta_j >= 0 and subtracted, so the bound stays below on
    the sub-problem; Wang et al. 2021, beta-CROWN). `record`: a dict that gets each ReLU's rows at its output (the
    coefficients branch and bound scores its splits by)."""
    batch, count = rows.shape[:2]
    for index in reversed(range(len(layers))):
        layer, (lower, upper) = layers[index], bounds[index]
        if isinstance(layer, Linear):
            if layer.bias is not None:
                const = const + rows @ layer.bias
            rows = layer.transpose(rows.reshape(batch * count, -1)).reshape(batch, count, -1)
        elif isinstance(layer, ReLU):
            if record is not None:
                record[index] = rows
            low_slope, up_slope, up_intercept, unstable = relu_relaxation(lower, upper)
            low_slope = low_slope[:, None]
            if alphas is not None and index in alphas:
                low_slope = torch.where(unstable[:, None], alphas[index], low_slope)
            positive, negative = rows.clamp(min=0), rows.clamp(max=0)
            const = const + torch.einsum("brn,bn->br", negative, up_intercept)
            rows = positive * low_slope + negative * up_slope[:, None]
            if betas is not None and index in betas:
                rows = rows - betas[index]
        else:
            chosen, exact, ceiling = pool_relaxation(layer.windows, lower, upper)
            positive, negative = rows.clamp(min=0), rows.clamp(max=0)
            routed = positive + negative * exact[:, None]
            const = const + torch.einsum("brn,bn->br", negative * ~exact[:, None], ceiling)
            rows = rows.new_zeros(batch, count, layer.in_size).scatter_add(
                2, chosen[:, None].expand(-1, count, -1), routed)
    return rows, const


def lower_bound(layers, bounds, rows, const, box, **relaxed):
    """A sound lower bound (B, R) of rows @ v + const over the set, v the output of `layers` (CROWN)."""
    back, shift = backward(layers, bounds, rows, const, **relaxed)
    return minimum(back, shift, box)


def widest(layers):
    return max(max(layer.in_size, layer.out_size) for layer in layers)


def crown_neurons(layers, bounds, box, mask):
    """CROWN's (lower, upper) (B, width) of the output of layers[-1] (a Linear) at the neurons of `mask` (B, width);
    +-inf elsewhere. For one image, in float64 on the CPU with the graph's sparse matrices, the rows stay sparse
    (`sparse_crown`); else (a batch of branch and bound's sub-problems, too) dense rows, cut so that a block holds at
    most BLOCK elements."""
    batch, width = mask.shape
    lower = torch.full(mask.shape, -torch.inf, dtype=box.lower.dtype, device=mask.device)
    upper = torch.full(mask.shape, torch.inf, dtype=box.lower.dtype, device=mask.device)
    if batch == 1 and sparse_rows_apply(layers, box):
        picked = torch.nonzero(mask[0])[:, 0]
        low, high = sparse_crown(layers, [(lo[0], hi[0]) for lo, hi in bounds[:len(layers)]], box, picked.numpy())
        lower[0, picked], upper[0, picked] = torch.from_numpy(low), torch.from_numpy(high)
        return lower, upper
    counts = mask.sum(dim=1)
    most = int(counts.max()) if batch else 0
    if most == 0:
        return lower, upper
    # each image's neurons first, in index order, then padding (repeats of its first neuron, results dropped)
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :most]
    step = max(1, BLOCK // (2 * batch * widest(layers)))
    for start in range(0, most, step):
        picked = order[:, start:start + step]
        rows = F.one_hot(picked, width).to(box.lower.dtype)
        both = lower_bound(layers, bounds[:len(layers)], torch.cat([rows, -rows], dim=1),
                           rows.new_zeros(batch, 2 * picked.shape[1]), box)
        low, high = both[:, :picked.shape[1]], -both[:, picked.shape[1]:]
        real = (start + torch.arange(picked.shape[1], device=mask.device))[None] < counts[:, None]
        lower.scatter_(1, picked, torch.where(real, low, lower.gather(1, picked)))
        upper.scatter_(1, picked, torch.where(real, high, upper.gather(1, picked)))
    return lower, upper


def sparse_rows_apply(layers, box):
    return box.lower.dtype == torch.float64 and box.lower.device.type == "cpu" and box.budget is None and \
        all(layer.matrix is not None for layer in layers if isinstance(layer, Linear))


def sparse_crown(layers, bounds, box, picked):
    """CROWN's (lower, upper) of the neurons `picked` of layers[-1]'s output, one image, L-infinity: the rows as
    scipy CSR matrices, passed back through each layer's sparse W and the relaxations. A neuron of a convolution
    depends on a patch of the input, so its row stays about as sparse as that patch: this is CROWN by local patches,
    the work of each row proportional to its receptive field instead of the layer's width. Peak memory: the rows'
    nonzeros, at most (2 x picked) x the largest receptive field (no dense block)."""
    import scipy.sparse as sparse
    numpy_bounds = [(lower.numpy(), upper.numpy()) for lower, upper in bounds]
    count = len(picked)
    top = layers[-1]
    rows = sparse.vstack([top.matrix[picked], -top.matrix[picked]]).tocsr()
    bias = top.bias.numpy()[picked]
    const = np.concatenate([bias, -bias])
    for index in reversed(range(len(layers) - 1)):
        layer, (lower, upper) = layers[index], numpy_bounds[index]
        owner = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
        if isinstance(layer, Linear):
            const = const + rows @ layer.bias.numpy()
            rows = (rows @ layer.matrix).tocsr()
            continue
        values, columns = rows.data, rows.indices
        negative = values < 0
        if isinstance(layer, ReLU):
            low, up, intercept, _ = (part.numpy() for part in relu_relaxation(torch.from_numpy(lower),
                                                                              torch.from_numpy(upper)))
            const = const + np.bincount(owner, np.where(negative, values * intercept[columns], 0), len(const))
            rows = sparse.csr_matrix((np.where(negative, values * up[columns], values * low[columns]), columns,
                                      rows.indptr), shape=rows.shape)
        else:
            chosen, exact, ceiling = (part[0].numpy() for part in pool_relaxation(
                layer.windows, torch.from_numpy(lower)[None], torch.from_numpy(upper)[None]))
            moved = negative & ~exact[columns]
            const = const + np.bincount(owner, np.where(moved, values * ceiling[columns], 0), len(const))
            rows = sparse.csr_matrix((np.where(moved, 0.0, values), chosen[columns], rows.indptr),
                                     shape=(rows.shape[0], layer.in_size))
            rows.sum_duplicates()
        rows.eliminate_zeros()
    lower, upper = box.lower.numpy()[0], box.upper.numpy()[0]
    owner = np.repeat(np.arange(rows.shape[0]), np.diff(rows.indptr))
    ends = np.where(rows.data > 0, lower[rows.indices], upper[rows.indices])
    both = const + np.bincount(owner, rows.data * ends, len(const))
    return both[:count], -both[count:]


def interval_linear(layer, lower, upper):
    middle, radius = (upper + lower) / 2, (upper - lower) / 2
    centre, spread = layer.forward(middle), layer.magnitude(radius)
    return centre - spread, centre + spread


def window_inputs(windows, undecided, size):
    """(B, size) mask of the inputs of the (B, out) windows marked."""
    marks = torch.zeros(len(undecided), size + 1, dtype=torch.bool, device=undecided.device)
    spread = undecided[:, :, None].expand(-1, -1, windows.shape[1])
    target = torch.where(windows >= 0, windows, size)[None].expand(len(undecided), -1, -1)
    marks.scatter_(1, target.reshape(len(undecided), -1), spread.reshape(len(undecided), -1))
    return marks[:, :size]


def neurons_that_matter(layers, index, lower, upper):
    """The outputs of layers[index] (a Linear) whose bounds decide a relaxation: unstable ReLU inputs, and the
    inputs (upper bound above zero) of the max-pool windows that the bounds leave undecided."""
    after = layers[index + 1:index + 3]
    mask = torch.zeros_like(lower, dtype=torch.bool)
    if after and isinstance(after[0], ReLU):
        mask |= (lower < 0) & (upper > 0)
        lower, upper = lower.clamp(min=0), upper.clamp(min=0)
        after = after[1:]
    if after and isinstance(after[0], MaxPool):
        _, exact, _ = pool_relaxation(after[0].windows, lower, upper)
        mask |= window_inputs(after[0].windows, ~exact, lower.shape[1]) & (upper > 0)
    return mask


def outward(lower, upper):
    """Bounds widened by the float32 slack (none in float64)."""
    if lower.dtype == torch.float64:
        return lower, upper
    return lower - FLOAT32_SLACK * (1 + lower.abs()), upper + FLOAT32_SLACK * (1 + upper.abs())


def split_limits(low, high, signs):
    """Bounds (B, width) of a ReLU's input on sub-problems whose split neurons are fixed: active (+1) at or above
    zero, inactive (-1) at or below (signs (B, width), 0 for a neuron not split)."""
    return torch.where(signs > 0, low.clamp(min=0), low), torch.where(signs < 0, high.clamp(max=0), high)


def layer_bounds(net, box, method="crown", neurons="needed", prior=None, splits=None):
    """[(lower, upper)] (B, width) of v_0 (the pixels), v_1, ..., v_L (the logits), v_{i+1} the output of
    net.layers[i]. `method` "interval" or "crown" (alpha-CROWN's intermediate bounds are CROWN's); `neurons`
    "needed" (CROWN where a relaxation depends on it) or "all". Branch and bound's sub-problems: `prior`, bounds
    that hold on the whole set (the root's, broadcast over B), each layer's kept within them; `splits` {ReLU layer
    index: (B, width) signs}, the split neurons' bounds cut at zero before the layers after them are bounded, so
    those see the sub-problem's tighter relaxations (a neuron stable within these limits is not bounded again; the
    layers before the first split are the prior's)."""
    bounds = [(box.lower, box.upper)]
    last = len(net.layers) - 1  # the logits: CROWN for all (a few neurons), the exact verifier's objective bounds
    split = min((index for index, signs in (splits or {}).items() if bool(signs.any())), default=len(net.layers))
    for index, layer in enumerate(net.layers):
        lower, upper = bounds[-1]
        if isinstance(layer, ReLU):
            bounds.append((lower.clamp(min=0), upper.clamp(min=0)))
            continue
        if isinstance(layer, MaxPool):
            bounds.append(pool_interval(layer.windows, lower, upper))
            continue
        reused = prior is not None and index < split  # no relaxation before this output changed
        if reused:
            low, high = (limit.expand(len(lower), -1) for limit in prior[index + 1])
        else:
            low, high = interval_linear(layer, lower, upper)  # exact for the first layer in L-infinity
            if prior is not None:
                low, high = torch.maximum(low, prior[index + 1][0]), torch.minimum(high, prior[index + 1][1])
        if splits is not None and index + 1 in splits:
            low, high = split_limits(low, high, splits[index + 1])
        first_l1 = index == 0 and box.budget is not None
        if method != "interval" and (index > 0 or first_l1) and not reused:
            mask = torch.ones_like(low, dtype=torch.bool) if neurons == "all" or first_l1 or index == last else \
                neurons_that_matter(net.layers, index, low, high)
            crown_low, crown_high = crown_neurons(net.layers[:index + 1], bounds, box, mask)
            low, high = torch.maximum(low, crown_low), torch.minimum(high, crown_high)
        bounds.append(outward(low, high))
    return bounds


# ---- the margins ----------------------------------------------------------------------------------------------

def margin_rows(labels, classes, dtype, device):
    """(B, classes - 1, classes): the rows e_label - e_t of the classes t other than each label, and the t's."""
    labels = torch.as_tensor(labels, device=device)
    others = torch.stack([torch.cat([torch.arange(label, device=device), torch.arange(label + 1, classes,
                                                                                      device=device)])
                          for label in labels.tolist()])
    rows = F.one_hot(labels, classes)[:, None].to(dtype) - F.one_hot(others, classes).to(dtype)
    return rows, others


def spread(values, others, classes):
    """(B, classes): the margin bounds of the other classes at their places, +inf at the label."""
    out = values.new_full((len(values), classes), torch.inf)
    return out.scatter(1, others, values)


def margin_bounds(net, box, labels, bounds, method="crown", iterations=ALPHA_ITERATIONS, lr=ALPHA_LR, deadline=None):
    """Lower bounds (B, classes) on logit[label] - logit[t] over each image's set (+inf at t = label); bounds from
    layer_bounds. "crown" is at least the interval bound and "alpha-crown" at least CROWN's (all three are sound:
    the best is kept). `deadline`: optimized_bound's."""
    lower, upper = bounds[-1]
    classes = lower.shape[1]
    rows, others = margin_rows(labels, classes, lower.dtype, lower.device)
    labels = torch.as_tensor(labels, device=lower.device)
    interval = lower.gather(1, labels[:, None]) - upper.gather(1, others)
    if method == "interval":
        return spread(interval, others, classes)
    crown = lower_bound(net.layers, bounds[:-1], rows, rows.new_zeros(rows.shape[:2]), box)
    crown = torch.maximum(interval, outward(crown, crown)[0])
    if method == "crown":
        return spread(crown, others, classes)
    return spread(optimized_bound(net, bounds, box, rows, crown, iterations, lr, deadline=deadline), others, classes)


def initial_alphas(net, bounds, count):
    """CROWN's own lower slopes for every ReLU, one copy per row (B, R, width), to optimize from."""
    alphas = {}
    for index, layer in enumerate(net.layers):
        if isinstance(layer, ReLU):
            lower, upper = bounds[index]
            slope = relu_relaxation(lower, upper)[0]
            alphas[index] = slope[:, None].expand(-1, count, -1).clone().requires_grad_(True)
    return alphas


def optimized_bound(net, bounds, box, rows, start, iterations, lr, splits=None, record=None, deadline=None):
    """alpha-CROWN: the lower slopes of the unstable ReLUs (any value in [0, 1] gives a sound bound) moved by Adam
    to raise the bound of every row, from CROWN's slopes; the best bound each row reached (never below `start`).
    `splits` (branch and bound): {layer index: (B, width) signs, +1 for a neuron split active, -1 inactive, 0 not
    split}: their multipliers beta >= 0 are optimized with the slopes (beta-CROWN). `record`: a dict that gets the
    last pass's rows at each ReLU and, under "input", at the pixels. `deadline` (a time.perf_counter() reading, for
    the exact verifier's time limit): no step starts after it (the slopes reached so far give a sound bound); without
    one, the result does not depend on the clock."""
    bounds = [(lower.detach(), upper.detach()) for lower, upper in bounds]  # fixed: only the slopes move
    alphas = initial_alphas(net, bounds[:-1], rows.shape[1])
    raw = {index: rows.new_zeros(rows.shape[:2] + sign.shape[1:]).requires_grad_(True)
           for index, sign in (splits or {}).items()}
    signed = lambda: {index: beta * splits[index][:, None] for index, beta in raw.items()}
    variables = list(alphas.values()) + list(raw.values())
    best = start.detach().clone()
    optimizer = torch.optim.Adam(variables, lr=lr) if variables else None
    for _ in range(iterations if variables else 0):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        with torch.enable_grad():
            bound = lower_bound(net.layers, bounds[:-1], rows, rows.new_zeros(rows.shape[:2]), box, alphas=alphas,
                                betas=signed())
            bound = outward(bound, bound)[0]
            best = torch.maximum(best, bound.detach())
            # gradients for the slopes alone (a training network's weights keep theirs)
            for variable, gradient in zip(variables, torch.autograd.grad(-bound.sum(), variables)):
                variable.grad = gradient
        optimizer.step()
        with torch.no_grad():
            for alpha in alphas.values():
                alpha.clamp_(0, 1)
            for beta in raw.values():
                beta.clamp_(min=0)
    with torch.no_grad():  # the last step's variables, not yet evaluated
        back, const = backward(net.layers, bounds[:-1], rows, rows.new_zeros(rows.shape[:2]), alphas=alphas,
                               betas=signed(), record=record)
        bound = minimum(back, const, box)
    if record is not None:
        record["input"] = back
    return torch.maximum(best, outward(bound, bound)[0])
