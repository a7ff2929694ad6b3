"""Speed that never changes a verdict: the memory format measured per model, batch and device, mixed precision whose
successes an fp32 forward confirms, and torch.compile with its compile time reported.

- Memory format. Channels-last (NHWC) makes EfficientNet-Lite0 twice as fast at batch 16 on this CPU and changes
  nothing at batch 1; which one wins depends on the model, the batch, the device, the precision and the threads, so it
  is measured, not assumed: the first forward of a `Classifier` at a given input shape times a few passes (forward and
  backward when gradients are on) in each format and keeps the faster one for that shape (`fastest_memory_format`).
- Precision. `--precision bf16` (or fp16, CUDA only) computes the attack's forward and gradient under
  torch.autocast; utils.attacks.Attack.judge then counts a success only when an fp32 forward of the 8-bit image
  confirms it, so a low-precision rounding can cost steps, never a wrong verdict.
- Compilation. `--compile` wraps the network in torch.compile; the compile happens on the first call, whose time
  `prepare_model` reports.
"""
import contextlib
import os
import shutil
import sys
import time

import torch

from utils.cli import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
# Below this many seconds per pass a model is too cheap for its memory format to matter, and measuring would cost
# more than it could save; keeping the default there also keeps tiny test models bit-for-bit reproducible.
MEASURE_ABOVE_SECONDS = 0.02
# Channels-last must win by this much: under this the two are within the noise of a shared machine.
CHANNELS_LAST_MARGIN = 0.95


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


# ---- memory format --------------------------------------------------------------------------------------------

def synchronize(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(run, pixels, memory_format):
    """Seconds of one forward (and, with gradients on, backward to the input) with the input in `memory_format`."""
    synchronize(pixels.device)
    start = time.perf_counter()
    probe = pixels.detach().contiguous(memory_format=memory_format).requires_grad_(torch.is_grad_enabled())
    output = run(probe, memory_format)
    if probe.requires_grad:
        torch.autograd.grad(output.float().sum(), probe)
    synchronize(pixels.device)
    return time.perf_counter() - start


def fastest_memory_format(run, pixels, trials=2):
    """The faster memory format for `run(pixels, memory_format)` at this input's shape, device, precision and grad
    mode: a warm-up pass in each format (oneDNN and cuDNN pick their kernels on the first one), then `trials` passes
    in each, interleaved so a busy machine slows both alike, best of each kept."""
    if pixels.dim() != 4:
        return torch.contiguous_format
    if time_pass(run, pixels, torch.contiguous_format) < MEASURE_ABOVE_SECONDS:
        return torch.contiguous_format
    time_pass(run, pixels, torch.channels_last)
    best = {torch.contiguous_format: float("inf"), torch.channels_last: float("inf")}
    for _ in range(trials):
        for memory_format in best:
            best[memory_format] = min(best[memory_format], time_pass(run, pixels, memory_format))
    faster = best[torch.channels_last] < CHANNELS_LAST_MARGIN * best[torch.contiguous_format]
    return torch.channels_last if faster else torch.contiguous_format


def format_key(pixels):
    """What the fastest format depends on, besides the model: shape, device, grad mode and autocast dtype."""
    device_type = pixels.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return tuple(pixels.shape), str(pixels.device), torch.is_grad_enabled(), dtype


def format_name(memory_format):
    return {value: key for key, value in MEMORY_FORMATS.items()}.get(memory_format, str(memory_format))


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
    with torch.enable_grad():
        memory_format = model.format_for(example)  # measured before compiling: the compiled code is for one format
    compiled = model.with_net(torch.compile(model.net), memory_format=memory_format)
    seconds = time_pass(lambda pixels, _: compiled(pixels), example, memory_format)
    return compiled, seconds


# ---- command line ---------------------------------------------------------------------------------------------

def add_speed_arguments(parser, compile=True):
    """--precision (steps 5, 7, 8, the benchmark), --memory-format, and --compile for long runs (step 8, benchmark)."""
    parser.add_argument("--precision", choices=list(PRECISIONS), default="fp32",
                        help="arithmetic of the attack's gradients: bf16 or fp16 (CUDA only) under autocast; a success "
                             "counts only when an fp32 forward of the 8-bit image confirms it (default: %(default)s)")
    parser.add_argument("--memory-format", choices=["auto"] + list(MEMORY_FORMATS), default="auto",
                        help="auto measures the faster of the two per model, batch and device (default: %(default)s)")
    if compile:
        parser.add_argument("--compile", action="store_true",
                            help="torch.compile the model: slow to start, worth it on long runs")


def prepare_model(model, args, batch_size, device):
    """The model an evaluation should use, from --memory-format, --precision and --compile: the memory format set
    (or left to measurement), and, with --compile, compiled at `batch_size` with the compile time printed on stderr."""
    check_precision(args.precision, device)
    model.memory_format = "auto" if args.memory_format == "auto" else MEMORY_FORMATS[args.memory_format]
    if not getattr(args, "compile", False):
        return model
    size = model.preprocessing.crop_size
    example = torch.zeros(batch_size, 3, size, size, device=device)
    with autocast(args.precision, device):
        compiled, seconds = compile_model(model, example, device)
    print(f"torch.compile: {seconds:.1f} s for the first forward and backward at batch {batch_size}", file=sys.stderr)
    return compiled
