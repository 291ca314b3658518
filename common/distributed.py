"""Device choice, and torchrun / DistributedDataParallel plumbing for step2's fit, step3 and
step4: one process per device, gloo on CPU, nccl on GPU. Without torchrun's environment
everything runs as a single rank."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common import runtime


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str = "auto") -> Dist:
    """Pick the device and, under torchrun (WORLD_SIZE > 1), join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        runtime.die(f"--device {device}: torch sees no CUDA device here (use --device cpu or auto)")
    if device not in ("auto", "cpu") and not use_cuda:
        runtime.die(f"--device {device}: choose auto, cpu or cuda")
    dev = torch.device(f"cuda:{local}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return Dist(rank, world, local, dev)


def all_sum(tensor: torch.Tensor, d: Dist) -> torch.Tensor:
    """Sum a statistics tensor over ranks (a no-op on one rank)."""
    if d.active:
        t = tensor.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t
    return tensor


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def teardown(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
