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


# ---- FSDP2 -----------------------------------------------------------------------------------------------------
def one_process_group(device: torch.device) -> None:
    """A process group of this process alone (an in-memory store, no network), for FSDP2 on one GPU."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def shard(model: torch.nn.Module, compute: Compute, world: int, offload: bool = False) -> None:
    """FSDP2 in place: every block, then the root (embedding, final norm, output layer), sharded over the ranks on
    dim 0 and moved to the device; a block's full weights exist only while it runs. Under bf16 autocast the blocks'
    weights are gathered in bf16 (what autocast would cast them to) and their gradients reduce-scattered in fp32;
    the root's stay fp32 and the blocks' inputs are not cast, so the residual stream is fp32 as under DDP. The fp32
    shards are the master weights. offload: the shards, their gradients and so the optimizer state and step stay in
    host memory (CPUOffloadPolicy; each module's weights are copied to the device for its forward and backward); on
    the CPU a no-op that still runs the same code."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(compute.device.type, (world,))
    placed = CPUOffloadPolicy(pin_memory=compute.device.type == "cuda") if offload else OffloadPolicy()
    blocks = MixedPrecisionPolicy(param_dtype=compute.autocast_dtype, reduce_dtype=torch.float32,
                                  cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=blocks, offload_policy=placed)
    fully_shard(model, mesh=mesh, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32), offload_policy=placed)


def local(t):
    """A DTensor's shard on this rank (a plain tensor as it is); nested dicts and lists converted throughout."""
    if isinstance(t, dict):
        return {k: local(v) for k, v in t.items()}
    if isinstance(t, (list, tuple)):
        return type(t)(local(v) for v in t)
    return t.to_local() if hasattr(t, "to_local") else t


def sharded_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A shard `t` saved by local() as a tensor sharded like `param` (a DTensor), or `t` itself for a plain param
    or a scalar (AdamW's step)."""
    if not hasattr(param, "device_mesh") or t.dim() == 0:
        return t
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(t.to(param.device), param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


def gather_full(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The whole tensors on rank 0's CPU (None on other ranks), DTensors all-gathered one at a time, so no rank ever
    holds more than one whole tensor beyond its shards. Every rank must call it."""
    out = {}
    for name, t in tensors.items():
        whole = t.full_tensor() if hasattr(t, "full_tensor") else t
        if is_rank0():
            out[name] = whole.detach().to("cpu", copy=True)
        del whole
    return out if is_rank0() else None
