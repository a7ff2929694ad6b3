"""A classifier as the list of layers a verifier encodes: affine maps, ReLUs and max pools on flat vectors.

`extract_layers(model, input_shape)` reads the model's computation graph (a torch.export program: the .pt2 file's
own, or one exported here from a Classifier's network) and returns `Layers`: alternating `Affine` (every linear
operation between two nonlinear ones, composed into one sparse matrix: linear, convolution, average and adaptive
average pooling, batch norm in eval mode, flatten/view/reshape, adding or scaling by constants, the normalization
inside the file and the Classifier's own mean and std), `ReLU` and `MaxPool` (each output's window of inputs). The
first layer is affine in the pixels in [0, 1], the last gives the logits. Any other operation on a computed value
(sigmoid, tanh, GELU, softmax, a product of two computed values, a skip connection that adds two layers' outputs)
raises UsageError naming it: the exact verifier encodes only piecewise-linear networks.

Vectors are flattened channel first, as torch flattens (C, H, W). The affine matrices are computed in float64 by
running each linear stretch of the graph on the basis vectors, so they are the graph's own arithmetic, not a
re-implementation of each operation's semantics.
"""
import operator
from dataclasses import dataclass

import numpy as np
import torch

from utils.cli import UsageError
# scipy is imported where it is used (utils/certify/__init__.py says why)

CHUNK = 512  # basis vectors run through a linear stretch at once (memory: CHUNK x the stretch's widest layer)


@dataclass(frozen=True, eq=False)
class Affine:
    """y = weight @ x + bias; weight a scipy CSR matrix (outputs, inputs) in float64. `run`: the same map as the
    graph computes it, flat inputs (B, inputs) to (B, *out_shape), in the inputs' dtype and device: what the tensor
    bounds (utils.certify.propagation) differentiate to pass rows backward through a convolution as its own
    transposed convolution."""
    weight: "scipy.sparse.csr_matrix"
    bias: np.ndarray
    out_shape: tuple
    run: object = None


@dataclass(frozen=True, eq=False)
class ReLU:
    size: int


@dataclass(frozen=True, eq=False)
class MaxPool:
    """Output o is the largest of x[windows[o, k]] over the k with windows[o, k] >= 0 (-1: padding, never the max)."""
    windows: np.ndarray
    out_shape: tuple


@dataclass(frozen=True, eq=False)
class Layers:
    """The network as the verifier sees it: `layers` in order, from `input_shape` (C, H, W) pixels in [0, 1]."""
    layers: list
    input_shape: tuple

    @property
    def relus(self):
        return sum(layer.size for layer in self.layers if isinstance(layer, ReLU))


def evaluate(network, pixels):
    """The logits (B, classes) of flat pixel vectors (B, C*H*W) in [0, 1], computed layer by layer in float64."""
    values = np.asarray(pixels, dtype=np.float64)
    for layer in network.layers:
        values = apply(layer, values)
    return values


def apply(layer, values):
    if isinstance(layer, Affine):
        return np.asarray(layer.weight @ values.T).T + layer.bias
    if isinstance(layer, ReLU):
        return np.maximum(values, 0.0)
    padded = np.concatenate([values, np.full((len(values), 1), -np.inf)], axis=1)  # index -1: padding
    return padded[:, layer.windows].max(axis=2)


# ---- reading the graph ----------------------------------------------------------------------------------------

def graph_of(model, input_shape):
    """The FX graph module of the model's network: a model file's own program, else the network exported here."""
    net = model.net
    inner = getattr(net, "net", None)  # a loaded model file (utils.models.ExportedNet)
    if isinstance(inner, torch.fx.GraphModule):
        return inner
    if isinstance(inner, torch.jit.ScriptModule) or isinstance(net, torch.jit.ScriptModule):
        raise UsageError("the exact verifier cannot read a TorchScript model (.pt): export the network with "
                         "torch.export and torch.export.save as .pt2")
    example = torch.zeros(2, *input_shape, device=model.mean.device)
    try:
        program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as error:  # torch.export refuses data-dependent control flow and such
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"the exact verifier needs the model's graph, and torch.export cannot export it ({reason})")
    return program.module()


@dataclass
class Tracked:
    """A computed value: an affine function of the output of layer `source` (-1: the pixels), as the callable
    `run` from a batch of those vectors (B, n) to the value's batch (B, *shape)."""
    run: object
    shape: tuple
    source: int
    passthrough: bool = False  # the source layer's output itself, untouched (no Affine needed before a max pool)


class Batch:
    """The batch size, where the graph asks for it (sym_size): the batch changes as the basis runs through."""


AFFINE_OPS = {
    "aten.sub.Tensor", "aten.add.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.neg.default",
    "aten.sub.Scalar", "aten.add.Scalar", "aten.mul.Scalar", "aten.div.Scalar",
    "aten.flatten.using_ints", "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
    "aten.linear.default", "aten.conv2d.default", "aten.convolution.default", "aten.addmm.default",
    "aten.mm.default", "aten.t.default", "aten.permute.default", "aten.transpose.int",
    "aten.avg_pool2d.default", "aten.adaptive_avg_pool2d.default", "aten._adaptive_avg_pool2d.default",
    "aten.mean.dim", "aten.squeeze.dim", "aten.squeeze.dims", "aten.unsqueeze.default",
    "aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default",
    "aten.dropout.default", "aten.clone.default", "aten.contiguous.default", "aten.alias.default",
    "aten.detach.default", "aten.constant_pad_nd.default", "aten.pad.default", "aten.expand.default",
    "aten.to.dtype", "aten._to_copy.default", "aten.identity.default",
}
RELU_OPS = {"aten.relu.default", "aten.relu_.default"}
MAX_POOL_OPS = {"aten.max_pool2d.default", "aten.max_pool2d_with_indices.default"}
PRODUCT_OPS = {"aten.mul.Tensor", "aten.div.Tensor", "aten.mm.default", "aten.linear.default", "aten.addmm.default",
               "aten.conv2d.default", "aten.convolution.default"}  # affine only when one operand is a constant
ACTIVATIONS = ("sigmoid", "tanh", "gelu", "silu", "elu", "selu", "leaky_relu", "hardtanh", "softplus", "softmax",
               "log_softmax", "hardswish", "hardsigmoid", "mish", "prelu", "relu6", "celu", "glu")


def op_name(target):
    return str(target).removeprefix("aten.")


def refuse(target, why=None):
    name = op_name(target).split(".")[0]
    kind = "an activation other than ReLU" if name.strip("_") in ACTIVATIONS else why or "not piecewise linear"
    raise UsageError(f"the exact verifier cannot encode {name} ({target}: {kind}); it encodes linear, convolution, "
                     "ReLU, max and average pooling, flatten, batch norm in eval mode and normalization")


def extract_layers(model, input_shape):
    """The Layers of `model` (a utils.models.Classifier) on images of `input_shape` (3, H, W); the logits of
    the result equal the model's (see `evaluate`)."""
    mean = model.mean.detach().cpu().double().view(1, 3, 1, 1)
    std = model.std.detach().cpu().double().view(1, 3, 1, 1)
    reader = GraphReader(tuple(input_shape), mean, std)
    return reader.read(graph_of(model, tuple(input_shape)))


class GraphReader:
    """Walks an FX graph node by node: constants are computed, values that depend on the pixels are Tracked, and
    each ReLU or max pool closes the affine stretch before it into one Affine layer."""

    def __init__(self, input_shape, mean, std):
        self.input_shape, self.mean, self.std = input_shape, mean, std
        self.layers = []
        self.shapes = [input_shape]  # shape of each layer's output; shapes[0]: the pixels

    def read(self, graph_module):
        env = {}
        placeholders = [node for node in graph_module.graph.nodes if node.op == "placeholder"]
        if len(placeholders) != 1:
            raise UsageError(f"the exact verifier needs a model with one input, this one takes {len(placeholders)}")
        for node in graph_module.graph.nodes:
            env[node] = self.visit(node, env, graph_module)
            if node.op == "output":
                return self.finish(env[node])
        raise UsageError("the model's graph has no output")

    def visit(self, node, env, graph_module):
        if node.op == "placeholder":
            # the Classifier's normalization, folded into the first affine layer like any other constant operation
            shape = self.input_shape
            return Tracked(lambda z: (z.reshape(len(z), *shape) - cast(self.mean, z)) / cast(self.std, z), shape, -1)
        if node.op == "get_attr":
            value = operator.attrgetter(node.target)(graph_module)
            return value.detach().double() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        if node.op == "call_module":  # torch.export's input guard: nothing to compute
            return None
        if node.op == "output":
            outputs = node.args[0]
            outputs = outputs[0] if isinstance(outputs, (tuple, list)) else outputs
            return env[outputs]
        args = torch.fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: env[n])
        return self.call(node.target, args, kwargs)

    def call(self, target, args, kwargs):
        name = str(target)
        tracked = [value for value in flat(args, kwargs) if isinstance(value, Tracked)]
        if target is operator.getitem:
            return self.getitem(*args)
        if name in ("aten.sym_size.int",):
            value, dim = args
            return Batch() if dim == 0 else value.shape[dim - 1] if isinstance(value, Tracked) else value.shape[dim]
        if not tracked:  # constants only: computed now (float64)
            return target(*constant(args), **constant(kwargs))
        if name in RELU_OPS:
            return self.nonlinear(tracked[0], ReLU(int(np.prod(tracked[0].shape))), tracked[0].shape)
        if name in MAX_POOL_OPS:
            pool = self.max_pool(*args, **kwargs)
            return pool if name.endswith("default") and "indices" not in name else (pool, None)
        if name not in AFFINE_OPS:
            refuse(target)
        if len(tracked) > 1 and name in PRODUCT_OPS:
            refuse(target, "a product of two computed values")
        if len({value.source for value in tracked}) > 1:
            refuse(target, "it adds the outputs of two different layers (a skip connection)")
        if name == "aten.batch_norm.default" and args[5]:
            refuse(target, "batch norm in training mode")
        return self.affine(target, args, kwargs, tracked[0].source)

    def getitem(self, value, index):
        if isinstance(value, tuple) and value and isinstance(value[0], Tracked):
            if index != 0:
                raise UsageError("the exact verifier cannot encode the indices of a max pool or the statistics of a "
                                 "batch norm: only their values")
            return value[0]
        return value[index]

    def affine(self, target, args, kwargs, source):
        def run(z):
            batch = len(z)
            concrete = lambda value: value.run(z) if isinstance(value, Tracked) else batch if isinstance(value, Batch) \
                else cast(value, z)
            result = target(*tree_map(concrete, args), **tree_map(concrete, kwargs))
            return result
        probe = run(torch.zeros(1, self.source_size(source), dtype=torch.float64))
        if isinstance(probe, tuple):  # batch norm's (output, mean, invstd)
            first = lambda z: run(z)[0]
            return (Tracked(first, tuple(probe[0].shape[1:]), source), None, None)
        return Tracked(run, tuple(probe.shape[1:]), source)

    def source_size(self, source):
        return int(np.prod(self.shapes[source + 1]))

    def close(self, value):
        """The Affine layer of a Tracked value, from the output of its source layer: bias = f(0), column i =
        f(e_i) - f(0), run CHUNK basis vectors at a time."""
        if value.source != len(self.layers) - 1:
            raise UsageError("the exact verifier cannot encode this graph: a layer's input skips the layer before it "
                             "(a skip connection)")
        import scipy.sparse as sparse
        size = self.source_size(value.source)
        with torch.no_grad():
            bias = value.run(torch.zeros(1, size, dtype=torch.float64)).reshape(1, -1)
            columns = []
            for start in range(0, size, CHUNK):
                count = min(CHUNK, size - start)
                basis = torch.zeros(count, size, dtype=torch.float64)
                basis[torch.arange(count), start + torch.arange(count)] = 1.0
                block = (value.run(basis).reshape(len(basis), -1) - bias).numpy()
                columns.append(sparse.csr_matrix(block))
        weight = sparse.vstack(columns).T.tocsr()
        weight.eliminate_zeros()
        return Affine(weight, bias.numpy()[0], tuple(value.shape), value.run)

    def push(self, layer, shape):
        self.layers.append(layer)
        self.shapes.append(tuple(shape))

    def nonlinear(self, value, layer, shape):
        if not (value.passthrough and value.source == len(self.layers) - 1):
            affine = self.close(value)
            self.push(affine, affine.out_shape)
        self.push(layer, shape)
        return Tracked(lambda z: z.reshape(len(z), *shape), tuple(shape), len(self.layers) - 1, passthrough=True)

    def max_pool(self, value, kernel, stride=(), padding=0, dilation=1, ceil_mode=False):
        if not isinstance(value, Tracked) or len(value.shape) != 3:
            refuse("aten.max_pool2d.default", "its input is not a (C, H, W) computed value")
        windows, out_shape = pool_windows(value.shape, kernel, stride or kernel, padding, dilation, ceil_mode)
        return self.nonlinear(value, MaxPool(windows, out_shape), out_shape)

    def finish(self, value):
        if not isinstance(value, Tracked):
            raise UsageError("the model's output does not depend on its input")
        if len(value.shape) != 1:
            raise UsageError(f"the exact verifier needs logits of shape (N, C), the model gives (N, {value.shape})")
        affine = self.close(value)
        self.push(affine, affine.out_shape)
        return Layers(self.layers, self.input_shape)


def pair(value):
    return tuple(value) * (2 // len(value)) if isinstance(value, (tuple, list)) else (value, value)


def pool_windows(shape, kernel, stride, padding, dilation, ceil_mode):
    """(windows (outputs, kh*kw) of flat input indices, -1 for padding; output shape) of a 2-d max pool."""
    channels, height, width = shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = pair(kernel), pair(stride), pair(padding), pair(dilation)
    if ceil_mode:
        refuse("aten.max_pool2d.default", "ceil_mode is not supported")
    out_h = (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    rows = (np.arange(out_h)[:, None] * sh - ph + np.arange(kh)[None, :] * dh)  # (out_h, kh)
    cols = (np.arange(out_w)[:, None] * sw - pw + np.arange(kw)[None, :] * dw)  # (out_w, kw)
    r = rows[:, None, :, None]
    c = cols[None, :, None, :]
    inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)                   # (out_h, out_w, kh, kw)
    flat_hw = np.where(inside, r * width + c, -1)
    base = np.arange(channels)[:, None, None, None, None] * height * width
    windows = np.where(flat_hw[None] >= 0, flat_hw[None] + base, -1)
    return windows.reshape(channels * out_h * out_w, kh * kw), (channels, out_h, out_w)


def flat(args, kwargs):
    out = []
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, (tuple, list)):
            out += flat(value, {})
        else:
            out.append(value)
    return out


def tree_map(function, value):
    if isinstance(value, (tuple, list)):
        return type(value)(tree_map(function, item) for item in value)
    if isinstance(value, dict):
        return {key: tree_map(function, item) for key, item in value.items()}
    return function(value)


def cast(value, like):
    """A float64 constant of the graph in the dtype and on the device of `like` (a copy kept per dtype and device:
    a run on CUDA copies each weight once)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point() or \
            (value.dtype == like.dtype and value.device == like.device):
        return value
    key = (like.dtype, like.device)
    copies = CASTS.setdefault(id(value), (value, {}))[1]
    if key not in copies:
        copies[key] = value.to(dtype=like.dtype, device=like.device)
    return copies[key]


CASTS = {}  # id of a graph constant -> (the constant, kept alive so its id stays its own; {(dtype, device): copy})


def constant(value):
    return tree_map(lambda item: 1 if isinstance(item, Batch) else item, value)
