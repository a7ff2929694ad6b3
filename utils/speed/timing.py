"""Timing the network without changing it: the clock for a device, NetworkClock (the wall time spent inside a
network's forward and backward passes) and one timed pass."""
import time

import torch


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
