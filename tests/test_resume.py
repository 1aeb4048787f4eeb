"""Exact resume: a run killed with SIGKILL after a checkpoint and rerun ends with the same weights, bit for bit,
as a run never interrupted; a checkpoint from other params or other data is refused."""
import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.common import setup_compute
from pipeline.hf import save_model
from pipeline.pack import pack, save_packed
from pipeline.train import train
from tests.conftest import config, tiny_model, write_params
from tests.test_pack import conversations

ROOT = Path(__file__).resolve().parent.parent
CPU = setup_compute("cpu", "float32")
TRAIN = {"max_steps": 40, "batch_size": 8, "save_every": 4, "eval_every": 10, "log_every": 1, "lr": 1.0e-3,
         "warmup_frac": 0.1, "device": "cpu", "dtype": "float32"}


def packed(n=120, block=64, seed=0):
    ids, labels = conversations(n, seed=seed, max_len=50)
    return pack(ids, labels, config("pack", block_size=block))[0]


def make_workdir(folder: Path, tok) -> Path:
    """A folder with a base model folder and packed train/dev rows, for running stages.train (stage() writes
    params.yaml)."""
    save_model(tiny_model(tok.get_vocab_size()), tok, str(folder / "base"))
    save_packed(packed(), str(folder / "packed/train"))
    save_packed(packed(24, seed=1), str(folder / "packed/dev"))
    return folder


@pytest.fixture
def workdir(tmp_path, tok):
    return make_workdir(tmp_path, tok)


def stage(workdir: Path, name: str, train: dict, during: dict | None = None, **popen):
    # evaluate.during_train: the train stage reads it (generation on dev prompts); off unless asked for
    train = dict(train)
    write_params(workdir, lr=train.pop("lr"), train=train,
                 evaluate={"during_train": during or {"prompts": 0, "samples": 0}})
    cmd = [sys.executable, "-m", "stages.train", "base", "packed", f"out/{name}", f"reports/{name}", f"ckpt/{name}",
           f"adapter/{name}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


def kill_after_checkpoint(workdir: Path, name: str, train: dict, start=stage) -> None:
    """Start the run `name` (start: stage, or base_stage) and, once its first resume checkpoint exists, kill it with
    SIGKILL: the stage, and under torchrun the launcher and every rank (torchrun starts them in sessions of their
    own), as when the machine goes away."""
    import psutil

    victim = start(workdir, name, train)
    ckpt = workdir / f"ckpt/{name}/resume.pt"
    while not ckpt.exists() and victim.poll() is None:
        time.sleep(0.002)
    tree = psutil.Process(victim.pid)
    for proc in [tree, *tree.children(recursive=True)]:
        proc.kill()
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"


def finish(proc) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.mark.slow
def test_sigkill_after_a_checkpoint_then_rerun_gives_bit_identical_weights(workdir):
    finish(stage(workdir, "whole", TRAIN))
    victim = stage(workdir, "killed", TRAIN)
    ckpt = workdir / "ckpt/killed/resume.pt"
    while not ckpt.exists() and victim.poll() is None:
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved_step = torch.load(ckpt, weights_only=True)["step"]
    assert 4 <= saved_step < TRAIN["max_steps"]
    assert not (workdir / "out/killed").exists()  # no half model folder
    log = finish(stage(workdir, "killed", TRAIN))
    assert f"resuming from ckpt/killed/resume.pt at step {saved_step}/40" in log
    assert "sft step 40/40 loss" in log and "tok/s" in log and "eta 0s" in log  # plain lines, not a bar: no TTY
    weights = [(workdir / f"out/{n}/model.safetensors").read_bytes() for n in ("whole", "killed")]
    assert weights[0] == weights[1]
    assert not ckpt.exists()  # served its purpose once the model folder is written


@pytest.mark.slow
def test_two_processes_under_torchrun_match_one_process_with_twice_the_batch(workdir, tok):
    """With generation on dev prompts at every evaluation (rank 0 answers while rank 1 waits), as by default."""
    from pipeline.template import render
    from tests.conftest import CONVERSATIONS, labels_of

    rendered = [render(c, tok) for c in CONVERSATIONS * 6]  # dev rows with answers to prompt for
    save_packed(pack([np.array(ids, np.int32) for ids, _ in rendered],
                     [np.array(labels_of(ids, m), np.int32) for ids, m in rendered], config("pack", block_size=64))[0],
                str(workdir / "packed/dev"))
    short = TRAIN | {"max_steps": 3, "save_every": 0, "eval_every": 2}
    during = {"prompts": 3, "samples": 1, "max_new_tokens": 4}
    finish(stage(workdir, "one", short, during))
    log = finish(stage(workdir, "two", short | {"nproc": 2, "batch_size": 4}, during))
    assert "launching 2 processes" in log and "on 2 x cpu" in log
    curves = [(workdir / f"reports/{n}/plots/metrics/gen_stopped.tsv").read_text() for n in ("one", "two")]
    assert curves[0] == curves[1] and len(curves[0].splitlines()) == 1 + 3  # steps 0, 2, 3: the same answers
    assert len((workdir / "reports/two/samples.jsonl").read_text().splitlines()) == 3  # one sample, 3 evaluations
    from safetensors.numpy import load_file

    one, two = load_file(workdir / "out/one/model.safetensors"), load_file(workdir / "out/two/model.safetensors")
    assert one.keys() == two.keys()
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    norms = [np.loadtxt(workdir / f"reports/{n}/plots/metrics/grad_norm.tsv", skiprows=1)[:, 1] for n in ("one", "two")]
    np.testing.assert_allclose(norms[1], norms[0], rtol=1e-5)  # the global gradient, step by step
    assert not np.array_equal(one["model.layers.0.mlp.up_proj.weight"],
                              load_file(workdir / "base/model.safetensors")["model.layers.0.mlp.up_proj.weight"])


def test_resume_in_process_is_exact_and_stale_checkpoints_are_refused(tmp_path, capsys):
    data = packed()
    cfg = config("train", max_steps=6, batch_size=8, save_every=2, lr=1e-3, device="cpu")
    whole = tiny_model(300)
    train(cfg, whole, CPU, data, None, ckpt_dir=str(tmp_path))  # leaves the step-4 checkpoint behind
    assert torch.load(tmp_path / "resume.pt", weights_only=True)["step"] == 4
    resumed = tiny_model(300)
    train(cfg, resumed, CPU, data, None, ckpt_dir=str(tmp_path))
    assert "resuming from" in capsys.readouterr().out
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    fresh = {}
    for name, changed_cfg, changed_data, seed in (("lr", dataclasses.replace(cfg, lr=2e-3), data, 0),
                                                  ("data", cfg, packed(seed=5), 0),
                                                  ("init", cfg, data, 1)):  # other starting weights
        model = tiny_model(300, seed=seed)
        train(changed_cfg, model, CPU, changed_data, None, ckpt_dir=str(tmp_path / name))  # the reference
        model = tiny_model(300, seed=seed)
        (tmp_path / name / "resume.pt").write_bytes((tmp_path / "resume.pt").read_bytes())  # a stale checkpoint
        capsys.readouterr()
        train(changed_cfg, model, CPU, changed_data, None, ckpt_dir=str(tmp_path / name))
        assert "refusing it and starting fresh" in capsys.readouterr().out, name
        fresh[name] = model
    reference = tiny_model(300)
    train(dataclasses.replace(cfg, lr=2e-3, save_every=0), reference, CPU, data, None)
    for a, b in zip(reference.state_dict().values(), fresh["lr"].state_dict().values()):
        assert torch.equal(a, b)  # the refused checkpoint left no trace


def test_resume_with_gradient_accumulation_skips_every_micro_batch_of_the_steps_done(tmp_path, capsys):
    """grad_accum 3: a resumed run skips 3 micro-batches per step done (a dropped multiplier would replay rows the
    run already trained on, silently); its weights equal the uninterrupted run's, bit for bit."""
    data = packed()  # 120 rows: 10 steps of 12 rows per epoch, so a replay trains on other rows
    cfg = config("train", max_steps=6, batch_size=4, grad_accum=3, save_every=2, lr=1e-3, device="cpu")
    whole = tiny_model(300)
    train(cfg, whole, CPU, data, None, ckpt_dir=str(tmp_path))  # leaves the step-4 checkpoint behind
    resumed = tiny_model(300)
    train(cfg, resumed, CPU, data, None, ckpt_dir=str(tmp_path))
    assert "at step 4/6" in capsys.readouterr().out
    for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def rank_resumes(rank: int, world: int, port: int, folder: str) -> None:
    """One of two gloo ranks training with a resume checkpoint: rank 1 looks in a folder of its own, as on a second
    machine without shared storage; what each rank raised goes to a file."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = config("train", max_steps=4, batch_size=4, save_every=2, lr=1e-3, device="cpu")
    own = Path(folder) / ("shared" if rank == 0 else "elsewhere")
    try:
        train(cfg, tiny_model(300), CPU, packed(), None, ckpt_dir=str(own))
        said = "trained"
    except Exception as e:  # noqa: BLE001
        said = f"{type(e).__name__}: {e}"
    (Path(folder) / f"rank{rank}.txt").write_text(said)
    torch.distributed.destroy_process_group()


def test_ranks_that_find_different_resume_steps_stop_in_one_line(tmp_path):
    import torch.multiprocessing as mp

    from tests.test_ddp import free_port

    mp.spawn(rank_resumes, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)  # leaves the step-2 checkpoint
    assert (tmp_path / "shared/resume.pt").exists() and not (tmp_path / "elsewhere/resume.pt").exists()
    mp.spawn(rank_resumes, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # every rank stops with the same user error, none trains on alone
        said = (tmp_path / f"rank{rank}.txt").read_text()
        assert said.startswith("UserError: ranks disagree on the resume step [2, 0]; put ") and \
            "on storage every machine shares" in said, said


def test_checkpoints_of_another_process_count_or_cut_short_are_refused(tmp_path, capsys):
    from pipeline.train import fingerprint

    data = packed()
    cfg = config("train", max_steps=6, batch_size=8, save_every=2, lr=1e-3, device="cpu")
    reference = tiny_model(300)
    train(dataclasses.replace(cfg, save_every=0), reference, CPU, data, None)
    train(cfg, tiny_model(300), CPU, data, None, ckpt_dir=str(tmp_path / "made"))  # leaves the step-4 checkpoint
    good = (tmp_path / "made/resume.pt").read_bytes()
    state = torch.load(tmp_path / "made/resume.pt", weights_only=True)
    assert state["fingerprint"] == fingerprint(cfg, tiny_model(300), data, 1)
    state["fingerprint"] = fingerprint(cfg, tiny_model(300), data, 2)  # the same run on two processes
    (tmp_path / "two").mkdir()
    torch.save(state, tmp_path / "two/resume.pt")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut/resume.pt").write_bytes(good[: len(good) // 2])  # a copy cut short
    for name, said in (("two", "refusing it and starting fresh"), ("cut", "is unreadable")):
        model = tiny_model(300)
        capsys.readouterr()
        train(cfg, model, CPU, data, None, ckpt_dir=str(tmp_path / name))
        assert said in capsys.readouterr().out, name
        for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
            assert torch.equal(a, b), name  # started fresh: the same weights as a run with no checkpoint


class PoisonedAfter(torch.nn.Module):
    """The tiny model, whose loss turns NaN from the n-th forward pass on (an overflow in the middle of a run)."""

    def __init__(self, n: int):
        super().__init__()
        self.inner, self.calls, self.n = tiny_model(300), 0, n
        self.blocks, self.arch = self.inner.blocks, self.inner.arch

    def forward(self, *args):
        self.calls += 1
        loss_sum, count = self.inner(*args)
        return (loss_sum * float("nan") if self.calls > self.n else loss_sum), count

    def num_params(self):
        return self.inner.num_params()


def test_watchdog_stops_after_max_bad_steps_with_the_last_checkpoint_holding_good_weights(tmp_path, capsys):
    model = PoisonedAfter(5)  # steps 0..4 train, 5.. are non-finite
    cfg = config("train", max_steps=20, batch_size=8, save_every=2, max_bad_steps=3, lr=1e-3, device="cpu")
    with pytest.raises(RuntimeError, match="3 non-finite steps in a row"):
        train(cfg, model, CPU, packed(), None, ckpt_dir=str(tmp_path))
    assert capsys.readouterr().out.count("non-finite") == 3  # steps 5, 6, 7
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert state["step"] == 6 and state["skipped"] == 1
    for name, t in model.state_dict().items():  # the skipped steps changed nothing; the checkpoint holds it
        assert torch.isfinite(t).all() and torch.equal(state["model"][name], t), name


def test_rng_state_holds_this_process_cuda_generator_only_and_restores_on_fewer_gpus(monkeypatch):
    """A checkpoint keeps the generator of the process's own GPU, not one per visible GPU; and a checkpoint of the
    old form (one per GPU of a bigger machine) restores on a machine with fewer GPUs (CUDA faked on the CPU)."""
    from pipeline.train import rng_state, set_rng_state

    calls = []
    fake = torch.tensor([7], dtype=torch.uint8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": fake)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": calls.append(state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("saves every visible GPU's generator"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every GPU's"))
    state = rng_state()
    assert state["cuda"] is fake  # one tensor: this process's device
    set_rng_state(state)
    assert calls == [fake]
    eight = [torch.tensor([g], dtype=torch.uint8) for g in range(8)]  # written on an 8-GPU machine
    set_rng_state(state | {"cuda": eight})
    assert calls[-1] is eight[0]  # this process is on device 0: its own generator, no IndexError
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    set_rng_state(state | {"cuda": eight[:2]})  # device 3, but the checkpoint held 2: nothing to restore
    assert len(calls) == 2


BASE_MODEL = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate_size": 64}


def base_stage(workdir: Path, name: str, pretrain: dict, **popen):
    """The base stage pretraining the bundled kind of model on the corpus in `workdir` (as `dvc repro` runs it)."""
    write_params(workdir, base={"block_size": 32, "pretrain": pretrain}, model=BASE_MODEL)
    cmd = [sys.executable, "-m", "stages.base", "corpus.jsonl", "tok", f"out/{name}", f"reports/{name}",
           f"ckpt/{name}"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen)


@pytest.mark.slow
def test_base_pretraining_on_two_processes_killed_after_a_checkpoint_resumes_to_the_one_process_run(tmp_path, tok):
    """The base stage under torchrun (base.pretrain.nproc 2), killed with SIGKILL after a checkpoint and rerun:
    it resumes, and ends where one process with twice the batch ends (fp32 tolerance), step by step."""
    import json

    from pipeline.tokenizer import save_tokenizer
    from tests.conftest import TEXTS

    save_tokenizer(tok, str(tmp_path / "tok"))
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    run = {"max_steps": 24, "batch_size": 8, "save_every": 4, "log_every": 1, "lr": 3.0e-3, "device": "cpu"}
    finish(base_stage(tmp_path, "one", run))
    two = run | {"nproc": 2, "batch_size": 4}
    kill_after_checkpoint(tmp_path, "two", two, start=base_stage)
    saved = torch.load(tmp_path / "ckpt/two/resume.pt", weights_only=True)["step"]
    assert 4 <= saved < 24 and not (tmp_path / "out/two").exists()
    log = finish(base_stage(tmp_path, "two", two))
    assert "launching 2 processes" in log and f"resuming from ckpt/two/resume.pt at step {saved}/24" in log
    from safetensors.numpy import load_file

    one, resumed = (load_file(tmp_path / f"out/{n}/model.safetensors") for n in ("one", "two"))
    for k in one:
        np.testing.assert_allclose(resumed[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    norms = [np.loadtxt(tmp_path / f"reports/{n}/plots/metrics/grad_norm.tsv", skiprows=1) for n in ("one", "two")]
    after = norms[0][norms[0][:, 0] >= saved]  # the resumed run logs the steps after its checkpoint
    np.testing.assert_allclose(norms[1][-len(after):, 1], after[:, 1], rtol=1e-5)
    assert not (tmp_path / "ckpt/two/resume.pt").exists()
