"""torch.distributed glue for training under torchrun (nccl on CUDA, gloo on CPU); no-ops otherwise."""
from __future__ import annotations

import os

import torch
import torch.distributed as tdist
import torch.nn as nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: str) -> tuple[int, int, str]:
    """Initialise the process group when under torchrun; returns (rank, world_size, device for this rank)."""
    if not launched_by_torchrun():
        return 0, 1, device
    if not tdist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        tdist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return tdist.get_rank(), tdist.get_world_size(), device


def active() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def rank() -> int:
    return tdist.get_rank() if active() else 0


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def barrier() -> None:
    if active():
        tdist.barrier()


def all_reduce_sum(values: list[float], device: str) -> list[float]:
    """Sum scalars over ranks (one collective); identity when not distributed."""
    if not active():
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device if device.startswith("cuda") else "cpu")
    tdist.all_reduce(t)
    return t.tolist()


def wrap_ddp(model: nn.Module, device: str) -> nn.Module:
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
