"""Where this process stands under torchrun: its rank, the collective operations the training loop
needs (broadcast, gather, mean, sum, barrier), and joining or leaving the process group. Rank 0 of
1 without torchrun, where every operation is the identity.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mellow_cli.errors import MellowError


@dataclass(frozen=True)
class World:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def broadcast(self, obj):
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def mean(self, value: float, device) -> float:
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.item() / self.size

    def sum(self, values: list[float], device) -> list[float]:
        if self.size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()


def start_world(device_name: str) -> tuple[World, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1), else run alone."""
    from mellow_cli.settings import pick_device

    size = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if size == 1:
        return World(), device
    if device.type == "mps":
        raise MellowError("torchrun: distributed training runs on cuda or cpu, not mps (pass --device cpu)")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # An hour, not torch's default: rank 0 alone checks every clip before the first step.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=1))
    return World(dist.get_rank(), dist.get_world_size(), local), device


def stop_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
