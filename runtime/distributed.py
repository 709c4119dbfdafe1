"""Process setup shared by every multi-process script (extraction, sampling, training).

The same script runs under `torchrun` or `accelerate launch` (rank and world size from their
environment variables, on one node or several) and under plain `python` (one process, no
process group). Training joins the group here, then hands it to accelerate.
"""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


#################################################################################
#                              Process context                                  #
#################################################################################

@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self):
        return self.rank == 0


def enable_tf32():
    """TF32 matmuls and convolutions on CUDA (float32 weights, faster tensor-core math)."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.cudnn.conv.fp32_precision = "tf32"


def launched_by_torchrun():
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed():
    """Picks this process's device and, under torchrun, joins the process group.

    CUDA: device cuda:local_rank, NCCL, TF32 matmuls and convolutions. CPU: gloo. Exits with
    one line (from the node's first process) when the node runs more processes than it has GPUs.
    """
    if launched_by_torchrun():
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    else:
        rank, world_size, local_rank = 0, 1, 0

    if torch.cuda.is_available():
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", local_rank + 1))
        shortage = gpu_shortage(local_processes, torch.cuda.device_count())
        if shortage:
            # Every process stops, so that none waits for the others in the process group.
            raise SystemExit(f"error: {shortage}" if local_rank == 0 else 1)
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        enable_tf32()
    else:
        device = torch.device("cpu")

    if launched_by_torchrun() and not dist.is_initialized():
        join_process_group(device)
    return DistributedContext(rank, world_size, local_rank, device)


def gpu_shortage(local_processes, gpu_count):
    """Why local_processes processes cannot each have a GPU of the gpu_count here; None if they can."""
    if local_processes <= gpu_count:
        return None
    return (f"{local_processes} processes on this node but it has {gpu_count} GPU(s): start at most "
            f"{gpu_count} per node (torchrun --nproc_per_node {gpu_count}, or accelerate launch "
            f"--num_processes {gpu_count} per machine)")


def join_process_group(device):
    """init_process_group through the launcher's store, under a prefix per torchelastic restart.

    torchrun's agent keeps one store for all restarts of its workers; without the prefix a
    restarted worker can read the address a dead worker of the previous attempt left there,
    and gloo then fails with "connection refused"."""
    store, rank, world_size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"restart-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    if device.type == "cuda":
        # Binding the group to the device lets NCCL barriers know which GPU to use.
        dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
    else:
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)


def barrier():
    """Waits for every process; a no-op in a single plain process."""
    if dist.is_initialized():
        dist.barrier()


def cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


#################################################################################
#                              Splitting work                                   #
#################################################################################

def split_range(total, rank, world_size):
    """The contiguous part of range(total) that `rank` handles.

    Parts cover every index exactly once (no padding duplicates) and differ in length by at
    most one; a part may be empty, so callers must still join every collective call.
    """
    base, remainder = divmod(total, world_size)
    start = rank * base + min(rank, remainder)
    stop = start + base + (1 if rank < remainder else 0)
    return range(start, stop)
