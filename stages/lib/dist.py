"""torch.distributed glue for training under torchrun (nccl on CUDA, gloo on CPU); no-ops otherwise.

Rank 0 alone owns the run directory: it prepares the stage folder, writes artifacts and the record.
The other ranks wait (``hold_followers``) until rank 0 has prepared the folder and entered the stage
(``release_followers``; pipeline/runner.py does both through ``start_stage`` before a distributed stage),
then run the same stage function with rank 0's context, writing nothing.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as tdist
import torch.nn as nn


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1


def init(device: str) -> tuple[int, int, str]:
    """Initialise the process group when under torchrun; returns (rank, world_size, device for this rank)."""
    if not launched_by_torchrun():
        return 0, 1, device
    local = int(os.environ.get("LOCAL_RANK", 0))
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", local + 1))
    if device.startswith("cuda") and per_host > torch.cuda.device_count():
        from stages.lib.errors import PipelineError

        raise PipelineError(f"{per_host} processes on this host need one GPU each, but {torch.cuda.device_count()} "
                            "are visible: use at most that many (--nproc / --nproc-per-node)")
    if not tdist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        tdist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
    return tdist.get_rank(), tdist.get_world_size(), local_device(device)


def local_device(device: str) -> str:
    """This process's device: under torchrun, ``cuda`` means the GPU of its local rank; otherwise ``device``."""
    if launched_by_torchrun() and device.startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def start_stage(device: str, payload: dict) -> str:
    """Under torchrun, before a distributed stage runs: join the process group (once) and let the waiting
    ranks go with ``payload`` (rank 0's context); returns this process's device. A no-op otherwise."""
    device = init(device)[2]
    release_followers(payload)
    return device


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


def broadcast_buffers(model: nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats), so all ranks evaluate the saved model."""
    if not active():
        return
    for b in model.buffers():
        tdist.broadcast(b.data, src=0)


_followers_waiting = False


def hold_followers() -> Optional[dict]:
    """Under torchrun, before running a stage: rank 0 marks the followers as waiting and returns None;
    the other ranks block until rank 0 calls ``release_followers`` and get its payload."""
    global _followers_waiting
    if not active():
        return None
    if rank() == 0:
        _followers_waiting = True
        return None
    box: list = [None]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def release_followers(payload: dict) -> None:
    """Rank 0: let the waiting ranks go (once), telling them whether and how to run the stage."""
    global _followers_waiting
    if not (_followers_waiting and active() and rank() == 0):
        return
    _followers_waiting = False
    tdist.broadcast_object_list([payload], src=0)


def wrap_ddp(model: nn.Module, device: str) -> nn.Module:
    if not active():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [torch.device(device).index] if device.startswith("cuda") else None
    return DDP(model, device_ids=ids)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
