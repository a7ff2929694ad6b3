"""Mixed precision: --precision bf16 (or fp16, CUDA only) runs the attack's forward and gradient under
torch.autocast; utils.attacks.Attack.judge counts a success only when an fp32 forward (full_precision) of the 8-bit
image confirms it."""
import contextlib

import torch

from utils.errors import UsageError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(precision, device):
    """UsageError for a precision this device cannot run."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and torch.device(device).type != "cuda":
        raise UsageError("`precision` fp16 needs a CUDA device (CPU autocast computes in bf16); use bf16 or fp32",
                         "precision")
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
