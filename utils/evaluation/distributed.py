"""Running one script as several processes with torch.distributed, as `torchrun` launches them.

    torchrun --nproc_per_node 2 step_8_evaluate.py FOLDER ...                       # one machine
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 step_8_evaluate.py ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE in each process's environment; a plain `python`
run has none of them and is rank 0 of 1, with no process group. Ranks talk over gloo on CPU and NCCL on CUDA, each
on the GPU of its LOCAL_RANK. Work is dealt in whole batches (`deal`): on CPU, PyTorch's kernels give other floats
for another batch composition, so a batch must be the same batch whichever rank runs it.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size`, its rank and count on this machine, its device."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def grouped(self):
        return dist.is_available() and dist.is_initialized()


def launcher(processes):
    """The command prefix that runs a script as `processes` torchrun ranks on this machine (1: a plain process)."""
    if processes == 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]


def launched_by_torchrun(environ=os.environ):
    return all(name in environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank_device(device, local_rank):
    """The device a rank works on: the GPU of its LOCAL_RANK when `device` is CUDA, else `device` itself."""
    return f"cuda:{local_rank}" if str(device).startswith("cuda") else str(device)


def backend_for(device):
    return "nccl" if str(device).startswith("cuda") else "gloo"


def start(device="cpu", environ=os.environ):
    """This process's Context; under torchrun also joins the process group (gloo on CPU, NCCL on CUDA)."""
    if not launched_by_torchrun(environ):
        return Context(device=str(device))
    rank, world_size = int(environ["RANK"]), int(environ["WORLD_SIZE"])
    local_rank = int(environ["LOCAL_RANK"])
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    device = rank_device(device, local_rank)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # NCCL's collectives use the current device
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), rank=rank, world_size=world_size)
    return Context(rank, world_size, local_rank, local_world_size, device)


def stop(context):
    if context.grouped:
        dist.destroy_process_group()


def thread_share(threads, context, cores=None):
    """Torch threads for this process: `threads` when given, else an equal share of this machine's cores among the
    processes on it (at least 1), so N processes never oversubscribe the machine."""
    if threads:
        return threads
    return max(1, (cores or os.cpu_count() or 1) // context.local_world_size)


def deal(batches, context):
    """The whole batches this rank runs: batch k goes to rank k % world_size."""
    return batches[context.rank::context.world_size]


def barrier(context):
    if context.grouped:
        dist.barrier()


def gather(value, context):
    """Every rank's `value` (any picklable object), in rank order, on every rank."""
    if not context.grouped:
        return [value]
    values = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values
