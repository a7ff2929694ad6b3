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
One module per concern: precision.py, memory_format.py, timing.py, folding.py (batch norms folded), compilation.py and
memory.py; this package's face holds the device and the model's set-up (get_device, prepare_model) and hands the rest
on as `utils.speed.NAME`.

- Memory. Every command line keeps the memory it frees for its next allocation (`keep_freed_memory`) instead of
  handing it back to the system and faulting it in afresh at the next forward.
"""
import sys

import torch

from utils.errors import UsageError
from utils.speed.compilation import compile_model, compiler_missing
from utils.speed.folding import CONV_CALLS, CONV_FUNCTIONS, conv_parts, fold_batch_norms, folded_conv, set_folded
from utils.speed.memory import keep_freed_memory
from utils.speed.memory_format import (CHANNELS_LAST_DEVICES, MEMORY_FORMATS, convolves_in_2d, format_name,
                                       memory_format_of, memory_format_rule)
from utils.speed.precision import PRECISIONS, autocast, check_precision, full_precision
from utils.speed.timing import NetworkClock, clock, synchronize, time_pass

__all__ = ["CHANNELS_LAST_DEVICES", "CONV_CALLS", "CONV_FUNCTIONS", "MEMORY_FORMATS", "PRECISIONS", "NetworkClock",
           "autocast", "check_precision", "clock", "compile_model", "compiler_missing", "conv_parts", "convolves_in_2d",
           "fold_batch_norms", "folded_conv", "format_name", "full_precision", "get_device", "keep_freed_memory",
           "memory_format_of", "memory_format_rule", "prepare_model", "set_folded", "synchronize", "time_pass"]


def get_device(name="auto"):
    """The torch device `name` names (a run's --device): "auto" is CUDA when PyTorch sees one, else the CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("`device` cuda was asked for, but PyTorch sees no CUDA device; use `device` cpu", "device")
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
