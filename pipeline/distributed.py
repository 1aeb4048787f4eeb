"""Many processes: a stage relaunched under torchrun, the process group (NCCL on CUDA, gloo on CPU), sums over
ranks, and outputs written by rank 0 only."""
import contextlib
import dataclasses
import os
import subprocess
import sys

import torch
import torch.distributed as dist

from pipeline.common import Compute, UserError, atomic_dir, is_rank0, print0


def launch(nproc: int, module: str, args: list[str]) -> bool:
    """Rerun `python -m module args` as nproc processes under torchrun on this machine, unless this process
    already is one (RANK set: torchrun started it, possibly across machines). Returns True when it launched."""
    if nproc <= 1 or "RANK" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    print0(f"{module}: launching {nproc} processes: {' '.join(cmd[1:])}")
    result = subprocess.run(cmd)
    if result.returncode:
        raise UserError(f"torchrun with {nproc} processes failed (exit code {result.returncode}); the lines above "
                        "say why")
    return True


@contextlib.contextmanager
def output_dir(out: str):
    """atomic_dir(out) on rank 0, as a str; other ranks write nothing and get None."""
    if not is_rank0():
        yield None
        return
    with atomic_dir(out) as tmp:
        yield str(tmp)


def init_distributed(compute: Compute) -> tuple[int, int, Compute]:
    """(world, rank, compute) from torchrun's environment; joins the process group (NCCL on CUDA, gloo on CPU)
    and puts each CUDA rank on its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, compute
    if compute.device.type == "cuda":
        compute = dataclasses.replace(compute, device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        torch.cuda.set_device(compute.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if compute.device.type == "cuda" else "gloo")
    return world, dist.get_rank(), compute


def all_reduce_sum(t: torch.Tensor, world: int) -> torch.Tensor:
    """The sum of `t` over all ranks (in place); `t` itself on one process. Queued on the device: no host wait."""
    if world > 1:
        dist.all_reduce(t)
    return t
