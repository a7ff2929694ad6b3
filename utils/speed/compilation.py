"""torch.compile: whether it can work here, and a compiled Classifier with its compile time."""
import os
import shutil
import time

import torch

from utils.errors import UsageError
from utils.speed.timing import time_pass


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
        raise UsageError(f"`compile`: {reason}", "compile")
    example = example.to(device)
    memory_format = model.format_for(example)  # fixed before compiling: the compiled code is for one format
    compiled = model.with_net(torch.compile(model.net), memory_format=memory_format)
    start = time.perf_counter()  # the wall clock: the compiler works in other processes too
    time_pass(lambda pixels, _: compiled(pixels), example, memory_format)
    return compiled, time.perf_counter() - start
