"""Device choice, and torchrun / DistributedDataParallel plumbing for step2's fit, step3 and
step4: one process per device, gloo on CPU, nccl on GPU. Without torchrun's environment
everything runs as a single rank."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def wants_cuda(device: str) -> bool:
    return torch.cuda.is_available() if device == "auto" else device.startswith("cuda")


def setup(device: str = "auto") -> Dist:
    """Pick the device and, under torchrun or run_as_cpu_ranks (WORLD_SIZE > 1), join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = wants_cuda(device)
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


def finish(d: Dist, status: int) -> int:
    """Leave the process group and return the exit status; a launched rank exits here with it. The rank skips
    the interpreter's teardown: the C++ destructors that run there abort now and then, after every output is
    written (`terminate called without an active exception`, 5 of 60 two-rank runs of the test's step3 under
    mimalloc; bench/README.md, "Ranks that abort at exit")."""
    if d.active and dist.is_initialized():
        dist.destroy_process_group()
    if launched():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def launched() -> bool:
    """Whether this process is one rank of a launched group (torchrun or run_as_cpu_ranks)."""
    return "WORLD_SIZE" in os.environ


def run_as_cpu_ranks(n: int, argv: list[str]) -> int:
    """Run this script again as n CPU ranks of one gloo group on this machine, each with its share of the usable
    CPUs; return 0, or the exit status of the first rank that failed. What torchrun does, without its launcher's
    traceback when a rank fails: the other ranks are stopped, and only the failed rank's error lines are shown
    (rank 0 writes to the terminal; the others, whose lines repeat rank 0's in the usual case, to a file)."""
    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(n),
           "LOCAL_WORLD_SIZE": str(n), "OMP_NUM_THREADS": str(max(1, runtime.usable_cpus() // n))}
    with tempfile.TemporaryDirectory() as tmp:
        errs = [None] + [open(Path(tmp) / f"rank{r}.err", "w+") for r in range(1, n)]
        procs = [subprocess.Popen([sys.executable, *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                                  stderr=errs[r]) for r in range(n)]
        failed = None
        try:
            while failed is None and any(p.poll() is None for p in procs):
                time.sleep(0.2)
                failed = next((r for r, p in enumerate(procs) if p.poll()), None)
            failed = next((r for r, p in enumerate(procs) if p.poll()), None)  # the last to end may have failed
            if failed:  # rank 0 has a moment to fail of its own accord (a bad input fails every rank)
                deadline = time.monotonic() + 2.0
                while procs[0].poll() is None and time.monotonic() < deadline:
                    time.sleep(0.1)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
                p.wait()
        if procs[0].returncode > 0:  # its error lines are on the terminal already
            failed = 0
        elif failed:
            errs[failed].seek(0)
            sys.stderr.write(errs[failed].read())
        for f in errs[1:]:
            f.close()
    return 0 if failed is None else procs[failed].returncode
