"""DDP on CPU (gloo): 2 ranks, each on its shard of the rows, give the same gradients as 1 rank with twice the batch
(the loss is normalised by the trained-target count over all ranks and micro-batches)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from pipeline.common import setup_compute
from pipeline.config import TrainConfig
from pipeline.distributed import init_distributed
from pipeline.train import accumulate_gradients, micro_batches
from tests.conftest import config, tiny_model
from tests.test_resume import packed

CPU = setup_compute("cpu", "float32")


def rank_gradients(rank: int, world: int, port: int, cfgs: list[TrainConfig], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    world, rank, compute = init_distributed(CPU)
    results = []
    for cfg in cfgs:
        model = tiny_model(300)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batches = micro_batches(packed(), cfg, compute.device, world, rank, skip=1)  # the second optimizer step
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        loss_sum, n_targets = accumulate_gradients(ddp, micro, compute, world)
        results.append({"grads": [p.grad for p in model.parameters()], "loss_sum": float(loss_sum),
                        "n": float(n_targets)})
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_give_the_gradients_of_one_rank_with_twice_the_batch(tmp_path):
    accums = (1, 2)  # 2: the first micro-batch's backward runs under no_sync, the all-reduce on the last
    out = str(tmp_path / "ranks.pt")
    mp.spawn(rank_gradients, args=(2, free_port(), [config("train", batch_size=3, grad_accum=a) for a in accums], out),
             nprocs=2, join=True)
    for two, grad_accum in zip(torch.load(out, weights_only=True), accums):
        model = tiny_model(300)
        batches = micro_batches(packed(), config("train", batch_size=6, grad_accum=grad_accum), "cpu", skip=1)
        loss_sum, n_targets = accumulate_gradients(model, [next(batches) for _ in range(grad_accum)], CPU)
        assert two["n"] == float(n_targets) > 0
        assert two["loss_sum"] == pytest.approx(float(loss_sum), rel=1e-5)
        for a, p in zip(two["grads"], model.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-7)
