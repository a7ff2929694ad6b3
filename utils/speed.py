"""Speed that never changes a verdict: the memory format by a fixed rule of model and device, mixed precision whose
successes an fp32 forward confirms, and torch.compile with its compile time reported.

- Memory format. A fixed rule, never a clock: channels-last (NHWC) for a network with 2-D convolutions on a CPU or
  CUDA device, contiguous otherwise (`memory_format_rule`). The two formats give different floats, so a choice timed
  at run time would make a run's bytes depend on how busy the machine was; bench/attack_speed.py measures both and
  prints the rule's choice against the other, which is where the rule comes from (channels-last makes
  EfficientNet-Lite0 twice as fast at batch 16 on this CPU and is level at batch 1, in fp32 and bf16 alike).
- Precision. `--precision bf16` (or fp16, CUDA only) computes the attack's forward and gradient under
  torch.autocast; utils.attacks.Attack.judge then counts a success only when an fp32 forward of the 8-bit image
  confirms it, so a low-precision rounding can cost steps, never a wrong verdict.
- Compilation. `--compile` wraps the network in torch.compile; the compile happens on the first call, whose time
  `prepare_model` reports.
- Memory. Every command line keeps the memory it frees for its next allocation (`keep_freed_memory`) instead of
  handing it back to the system and faulting it in afresh at the next forward.
"""
import contextlib
import copy
import ctypes
import os
import platform
import shutil
import sys
import time

import torch

from utils.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# Where channels-last has native convolution kernels (oneDNN, cuDNN); elsewhere (e.g. MPS) the rule stays contiguous.
CHANNELS_LAST_DEVICES = ("cpu", "cuda")


# ---- precision ------------------------------------------------------------------------------------------------

def check_precision(precision, device):
    """UsageError for a precision this device cannot run."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise UsageError("--precision fp16 needs a CUDA device (CPU autocast computes in bf16); use bf16 or fp32")
    return precision


def autocast(precision, device):
    """The context the attack's gradient is computed in: torch.autocast to `precision`, or nothing for fp32."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def full_precision(device):
    """Autocast off: for the fp32 forward that confirms a verdict, even inside an autocast region."""
    return torch.autocast(torch.device(device).type, enabled=False)


# ---- freed memory -------------------------------------------------------------------------------------------

# glibc's mallopt parameters (malloc.h), and the largest M_MMAP_THRESHOLD it accepts on a 64-bit system
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
TRIM_THRESHOLD = 2 ** 31 - 1


def keep_freed_memory():
    """Have glibc's malloc keep the memory a tensor frees for the next one, instead of unmapping it or trimming the
    heap: by default an activation of a few MB (a batch of 64 through a small CNN) is a fresh mapping or a trimmed
    heap top at every forward, and the kernel faults its pages in again each time (about 1,900 page faults and a
    third of the forward's time on the digits model, measured). Allocations below 32 MB come from the heap, whose
    freed top is kept up to 2 GB. Where malloc is not glibc's, nothing changes. Values are untouched: only where
    memory comes from. Returns whether the setting was made."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


# ---- timing, and the memory format ---------------------------------------------------------------------------

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def clock(device):
    """The clock to time work on `device` with: on a CPU with one torch thread, this process's CPU time, which other
    processes sharing the cores do not inflate (they only make it wait); otherwise the wall clock."""
    if torch.device(device).type == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


class NetworkClock(torch.nn.Module):
    """`net` with a stopwatch, its values and gradients untouched: `seconds` adds up the wall time of its forward
    passes and of the backward passes through it (from the gradient reaching its output to the gradient leaving its
    input), `passes` counts them, `images` the batch rows each pass saw. What a run spends inside the network, which
    no attack on that network can spend less on for the same passes; a run's time less `inside()` is what it spends
    outside them. On CUDA each pass synchronizes, which slows a clocked run there."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seconds = {"forward": 0.0, "backward": 0.0}
        self.passes = {"forward": 0, "backward": 0}
        self.images = {"forward": 0, "backward": 0}

    def inside(self):
        """Seconds inside the network so far, forward and backward passes together."""
        return self.seconds["forward"] + self.seconds["backward"]

    def reading(self):
        """(forward passes, backward passes, seconds inside): subtract two readings for what a run between them did."""
        return self.passes["forward"], self.passes["backward"], self.inside()

    def forward(self, inputs):
        synchronize(inputs.device)
        started = time.perf_counter()
        span = {"clock": self, "rows": len(inputs)}
        tracked = inputs.requires_grad and torch.is_grad_enabled()
        outputs = self.net(_Stopwatch.apply(inputs, span, False) if tracked else inputs)
        if tracked:
            outputs = _Stopwatch.apply(outputs, span, True)
        synchronize(inputs.device)
        self.seconds["forward"] += time.perf_counter() - started
        self.passes["forward"] += 1
        self.images["forward"] += len(inputs)
        return outputs


class _Stopwatch(torch.autograd.Function):
    """The identity, whose backward reads the clock: at a network's output it starts the backward span, at its input
    it ends it (autograd reaches the input last)."""

    @staticmethod
    def forward(ctx, tensor, span, at_output):
        ctx.span, ctx.at_output = span, at_output
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        span = ctx.span
        synchronize(grad.device)
        if ctx.at_output:
            span["started"] = time.perf_counter()
        elif "started" in span:
            span["clock"].seconds["backward"] += time.perf_counter() - span.pop("started")
            span["clock"].passes["backward"] += 1
            span["clock"].images["backward"] += span["rows"]
        return grad, None, None


def time_pass(run, pixels, memory_format):
    """Seconds of one forward (and, with gradients on, backward to the input) with the input in `memory_format`."""
    now = clock(pixels.device)
    synchronize(pixels.device)
    start = now()
    probe = pixels.detach().contiguous(memory_format=memory_format).requires_grad_(torch.is_grad_enabled())
    output = run(probe, memory_format)
    if probe.requires_grad:
        torch.autograd.grad(output.float().sum(), probe)
    synchronize(pixels.device)
    return now() - start


def convolves_in_2d(net):
    """Does `net` hold a 2-D convolution: an nn.Conv2d (or a TorchScript one), or a conv2d call in a traced graph
    (torch.fx, as after fold_batch_norms, or a torch.export program)?"""
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d) or getattr(module, "original_name", None) == "Conv2d":
            return True
        graph = getattr(module, "graph", None)
        if isinstance(graph, torch.fx.Graph) and any(node.op == "call_function" and node.target in CONV_CALLS
                                                     for node in graph.nodes):
            return True
    return False


def memory_format_rule(net, device):
    """The memory format 4-D input runs in, a pure function of the network and the device (the same for every
    precision): channels-last for 2-D convolutions on CPU (oneDNN) and CUDA (cuDNN), whose kernels run NHWC
    natively, contiguous otherwise. The benchmark's measurements on this CPU favour channels-last for both models,
    batch sizes and precisions; where they did not, the loss was within noise."""
    if torch.device(device).type in CHANNELS_LAST_DEVICES and convolves_in_2d(net):
        return torch.channels_last
    return torch.contiguous_format


def memory_format_of(model, device):
    """The name of the memory format `model` (a Classifier) runs its 4-D input in on `device`: forced, or the rule's."""
    size = model.preprocessing.crop_size
    return format_name(model.format_for(torch.zeros(1, 3, size, size, device=device)))


def format_name(memory_format):
    return {value: key for key, value in MEMORY_FORMATS.items()}.get(memory_format, str(memory_format))


# ---- batch norms folded into the convolutions -------------------------------------------------------------------

CONV_FUNCTIONS = (torch.conv2d, torch.nn.functional.conv2d)
# ...and as a torch.export program calls them
CONV_CALLS = CONV_FUNCTIONS + (torch.ops.aten.conv2d.default, torch.ops.aten.convolution.default)


def folded_conv(weight, bias, batch_norm):
    """(weight, bias) of the convolution that computes conv followed by `batch_norm` in eval mode, in one pass."""
    scale = batch_norm.running_var.add(batch_norm.eps).rsqrt()
    shift = -batch_norm.running_mean * scale
    if batch_norm.affine:
        scale, shift = scale * batch_norm.weight, shift * batch_norm.weight + batch_norm.bias
    bias = shift if bias is None else bias * scale + shift
    return weight * scale.view(-1, *[1] * (weight.dim() - 1)), bias


def conv_parts(graph_module, conv):
    """(weight attribute, bias attribute or None) of a conv node whose weights the graph reads directly, else None."""
    if conv.op == "call_module" and isinstance(graph_module.get_submodule(conv.target), torch.nn.Conv2d):
        module = graph_module.get_submodule(conv.target)
        return (f"{conv.target}.weight", f"{conv.target}.bias" if module.bias is not None else None)
    if conv.op != "call_function" or conv.target not in CONV_FUNCTIONS or conv.kwargs:
        return None
    weight = conv.args[1] if len(conv.args) > 1 else None
    bias = conv.args[2] if len(conv.args) > 2 else None
    if getattr(weight, "op", None) != "get_attr" or (bias is not None and getattr(bias, "op", None) != "get_attr"):
        return None
    return weight.target, bias.target if bias is not None else None


def set_folded(graph_module, conv, weight, bias):
    """Point `conv` at the folded weight and bias, stored as new frozen parameters of the graph module."""
    if conv.op == "call_module":  # a new module: the traced graph shares its submodules with the network traced
        module = copy.deepcopy(graph_module.get_submodule(conv.target))
        module.weight = torch.nn.Parameter(weight, requires_grad=False)
        module.bias = torch.nn.Parameter(bias, requires_grad=False)
        graph_module.add_submodule(conv.target, module)
        return
    name = f"folded_{conv.name}"
    graph_module.register_parameter(f"{name}_weight", torch.nn.Parameter(weight, requires_grad=False))
    graph_module.register_parameter(f"{name}_bias", torch.nn.Parameter(bias, requires_grad=False))
    with graph_module.graph.inserting_before(conv):
        weight_node = graph_module.graph.get_attr(f"{name}_weight")
        bias_node = graph_module.graph.get_attr(f"{name}_bias")
    arguments = list(conv.args) + [None] * (3 - len(conv.args))
    conv.args = (arguments[0], weight_node, bias_node, *arguments[3:])


def fold_batch_norms(net):
    """`net` (in eval mode) with every batch norm that directly follows a convolution folded into it: the same
    function in fp32 up to rounding, one pass over each activation fewer, forward and backward (about 10% of a
    ResNet18 step on this CPU). A network torch.fx cannot trace is returned as it is."""
    try:
        graph_module = torch.fx.symbolic_trace(net)
    except Exception:  # dynamic control flow: fx cannot trace every model, and the unfolded one is still right
        return net
    for node in list(graph_module.graph.nodes):
        module = graph_module.get_submodule(node.target) if node.op == "call_module" else None
        if not isinstance(module, torch.nn.BatchNorm2d) or module.training or not module.track_running_stats:
            continue
        conv = node.args[0]
        parts = conv_parts(graph_module, conv) if isinstance(conv, torch.fx.Node) and len(conv.users) == 1 else None
        if parts is None:
            continue
        weight = graph_module.get_parameter(parts[0]) if parts[0] else None
        bias = graph_module.get_parameter(parts[1]) if parts[1] else None
        with torch.no_grad():
            set_folded(graph_module, conv, *folded_conv(weight.detach(), None if bias is None else bias.detach(), module))
        node.replace_all_uses_with(conv)
        graph_module.graph.erase_node(node)
    graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return graph_module


# ---- compilation ----------------------------------------------------------------------------------------------

def compiler_missing():
    """Why torch.compile cannot work here (its CPU backend builds C++), or None."""
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None and shutil.which("c++") is None:
        return f"torch.compile's CPU backend needs a C++ compiler, and neither {compiler} nor c++ is on PATH"
    return None


def compile_model(model, example, device):
    """A Classifier sharing `model`'s weights whose network is torch.compile'd, and the seconds its first forward
    and backward at `example`'s shape took (the compile itself: later calls at that shape reuse the code)."""
    reason = compiler_missing() if torch.device(device).type == "cpu" else None
    if reason:
        raise UsageError(f"--compile: {reason}")
    example = example.to(device)
    memory_format = model.format_for(example)  # fixed before compiling: the compiled code is for one format
    compiled = model.with_net(torch.compile(model.net), memory_format=memory_format)
    start = time.perf_counter()  # the wall clock: the compiler works in other processes too
    time_pass(lambda pixels, _: compiled(pixels), example, memory_format)
    return compiled, time.perf_counter() - start


# ---- the device and the model's set-up -------------------------------------------------------------------------

def get_device(name="auto"):
    """The torch device for --device: "auto" is CUDA when PyTorch sees one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but PyTorch sees no CUDA device; use --device cpu")
    return name


def prepare_model(model, precision, memory_format, batch_size, device, compile=False):
    """The model a run should use: `precision` checked for the device, `memory_format` ("auto": the rule's, or a name
    of MEMORY_FORMATS) set, and, with `compile`, compiled at `batch_size` with the compile time printed on stderr."""
    check_precision(precision, device)
    model.memory_format = "auto" if memory_format == "auto" else MEMORY_FORMATS[memory_format]
    if not compile:
        return model
    size = model.preprocessing.crop_size
    example = torch.zeros(batch_size, 3, size, size, device=device)
    with autocast(precision, device):
        compiled, seconds = compile_model(model, example, device)
    print(f"torch.compile: {seconds:.1f} s for the first forward and backward at batch {batch_size}", file=sys.stderr)
    return compiled
