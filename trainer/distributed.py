"""Processes under torchrun: the process group, the DDP wrapper, and sums over the ranks."""
import inspect
import os

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def setup_distributed(device_flag: str):
    """(rank, world, device). Under torchrun: nccl on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = device_flag.startswith("cuda") or (device_flag == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device(f"cuda:{local_rank}" if world > 1 else
                              (device_flag if device_flag.startswith("cuda") else "cuda"))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Processes on one machine share its cores; oversubscription is much slower.
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local_world > 1 and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return rank, world, device


def wrap_ddp(model, device):
    """DDP without re-sending buffers at every forward: they (feature statistics, RoPE tables) never
    change in training, and DDP copies rank 0's to every rank at the start."""
    no_resend = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(
        DistributedDataParallel.__init__).parameters else "broadcast_buffers"   # its older name
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **{no_resend: False})


def all_sum(value: float, world: int, device) -> float:
    return all_sums([value], world, device)[0]


def all_sums(values, world: int, device) -> list:
    """Each value summed over the ranks, in one collective."""
    if world == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
