"""FSDP2 on 2 gloo ranks (the train stage under torchrun, as users run it): the same trajectory as 1 process with
twice the batch, within fp32 tolerance; a sharded checkpoint (one file per rank) resumes after SIGKILL to the same
weights as an uninterrupted run, and one that lost a rank's shard is left by every rank at once (one line); LoRA
trains the same under 1 process, DDP and FSDP."""

import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.test_resume import TRAIN, finish, kill_after_checkpoint, make_workdir, stage

SHORT = TRAIN | {"max_steps": 3, "save_every": 0}


@pytest.fixture
def workdir(tmp_path, tok):
    return make_workdir(tmp_path, tok)


def weights(workdir, name: str, folder: str = "out", file: str = "model.safetensors") -> dict:
    return load_file(workdir / f"{folder}/{name}/{file}")


def assert_close(a: dict, b: dict, rtol=1e-4, atol=1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


def grad_norms(workdir, name: str) -> np.ndarray:
    return np.loadtxt(workdir / f"reports/{name}/plots/metrics/grad_norm.tsv", skiprows=1)[:, 1]


@pytest.mark.slow
def test_fsdp_on_two_ranks_follows_one_process_with_twice_the_batch(workdir):
    finish(stage(workdir, "one", SHORT))
    # with activation checkpointing too: each sharded block recomputed in backward (the same math)
    log = finish(stage(workdir, "fsdp", SHORT | {"nproc": 2, "batch_size": 4, "parallel": "fsdp",
                                                 "activation_checkpointing": True}))
    assert "launching 2 processes" in log and "(FSDP)" in log
    assert_close(weights(workdir, "fsdp"), weights(workdir, "one"))
    np.testing.assert_allclose(grad_norms(workdir, "fsdp"), grad_norms(workdir, "one"), rtol=1e-5)
    base, one = weights(workdir, "", "base"), weights(workdir, "one")
    key = "model.layers.1.mlp.down_proj.weight"
    assert not np.allclose(one[key], base[key])  # it trained
    assert (workdir / "adapter/fsdp/README.md").is_file()  # full fine-tuning: no adapter, said so


@pytest.mark.slow
def test_lora_under_one_process_ddp_and_fsdp_gives_the_same_adapters(workdir):
    run = SHORT | {"lora": {"rank": 4, "dropout": 0.0}}
    finish(stage(workdir, "one", run))
    finish(stage(workdir, "ddp", run | {"nproc": 2, "batch_size": 4}))
    finish(stage(workdir, "fsdp", run | {"nproc": 2, "batch_size": 4, "parallel": "fsdp"}))
    one = weights(workdir, "one", "adapter", "adapter_model.safetensors")
    assert len(one) == 2 * 7 * 2 and all(k.startswith("base_model.model.model.layers.") for k in one)
    for name in ("ddp", "fsdp"):
        assert_close(weights(workdir, name, "adapter", "adapter_model.safetensors"), one)
        assert_close(weights(workdir, name), weights(workdir, "one"))  # the merged model folders too


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_after_sigkill_to_the_weights_of_an_uninterrupted_run(workdir):
    run = TRAIN | {"max_steps": 16, "save_every": 2, "nproc": 2, "batch_size": 4, "parallel": "fsdp"}
    finish(stage(workdir, "whole", run))
    kill_after_checkpoint(workdir, "killed", run)
    ckpt = workdir / "ckpt/killed/resume.pt"
    shards = sorted(p.name for p in ckpt.parent.glob("resume-step*-rank*.pt"))
    assert any(s.endswith("rank0.pt") for s in shards) and any(s.endswith("rank1.pt") for s in shards)
    assert not (workdir / "out/killed").exists()
    shutil.copytree(ckpt.parent, workdir / "ckpt/lost")  # the same checkpoint, with rank 1's shard lost
    for lost in (workdir / "ckpt/lost").glob("resume-step*-rank1.pt"):
        lost.unlink()
    log = finish(stage(workdir, "lost", run))  # one line, and every rank starts fresh (no rank resumes alone)
    assert log.count("lacks the shard of rank 1 of 2; every rank starts fresh") == 1 and "resuming" not in log
    assert_close(weights(workdir, "lost"), weights(workdir, "whole"), rtol=0, atol=0)
    log = finish(stage(workdir, "killed", run))
    assert "resuming from ckpt/killed/resume.pt at step" in log
    assert_close(weights(workdir, "killed"), weights(workdir, "whole"), rtol=0, atol=0)  # equal, bit for bit
    assert not list(ckpt.parent.glob("resume*.pt"))  # all served their purpose once the model folder is written
