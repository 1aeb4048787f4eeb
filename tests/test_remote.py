"""Resume checkpoints on the DVC remote (a local folder remote and the S3-compatible server on 127.0.0.1): a run
killed with SIGKILL in one clone resumes in a fresh clone of the same commit, bit for bit; checkpoints of other
params are refused; an unreachable remote warns once and the run completes; a half-written upload is never taken."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.remote import RemoteStore, open_store
from pipeline.train import fingerprint, train
from tests.conftest import ROOT, config, tiny_model, write_params
from tests.test_pipeline import run, s3_server  # noqa: F401  (a fixture)
from tests.test_resume import CPU, TRAIN, finish, packed, stage, workdir  # noqa: F401  (a fixture)

S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def dvc_project(folder: Path, remote: str, endpoint: str | None = None) -> None:
    """`folder` as a git + DVC project whose default remote is `remote` (an S3 URL with `endpoint`, or a folder)."""
    run("git init -q -b main && dvc init -q && dvc remote add -d store " + remote, folder)
    if endpoint:
        run(f"dvc remote modify store endpointurl {endpoint}", folder)


def remote_files(remote: str, endpoint: str | None) -> list[str]:
    """Every object under the remote, as paths relative to it."""
    if endpoint is None:
        return sorted(str(p.relative_to(remote)) for p in Path(remote).rglob("*") if p.is_file())
    import boto3

    bucket, _, prefix = remote.removeprefix("s3://").partition("/")
    listed = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1").list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"].removeprefix(prefix + "/") for o in listed.get("Contents", []))


def upload_in_flight(remote: str, endpoint: str | None) -> bool:
    """An upload is under way: a folder remote's temp file, an S3 multipart upload begun."""
    if endpoint is None:
        return any(p.is_file() and not p.name.startswith("step-") for p in Path(remote).rglob("*"))
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1")
    return bool(client.list_multipart_uploads(Bucket=remote.removeprefix("s3://").split("/")[0]).get("Uploads"))


@pytest.fixture(params=["folder", "s3"])
def remote(request, tmp_path):
    """(remote URL, endpoint or None, environment) of a local folder remote or a bucket on the S3 server."""
    if request.param == "folder":
        yield str(tmp_path / "store"), None, {}
    else:
        url, env = request.getfixturevalue("s3_server")
        yield "s3://models/project", url, env


def kill_in_one_clone_resume_in_another(made: Path, tmp_path: Path, url: str, endpoint: str | None,
                                         train: dict) -> None:
    """An uninterrupted run (no remote) for reference; a clone of a project with the remote on, killed with SIGKILL
    (all its processes) once a checkpoint is on the remote; a second fresh clone resumes from it, bit for bit."""
    finish(stage(made, "whole", train))
    origin = tmp_path / "origin"
    origin.mkdir()
    for name in ("base", "packed"):
        shutil.copytree(made / name, origin / name)
    dvc_project(origin, url, endpoint)
    on = train | {"remote_checkpoints": True}
    write_params(origin, lr=on.pop("lr"), train=on, evaluate={"during_train": {"prompts": 0, "samples": 0}})
    on["lr"] = train["lr"]  # stage() writes the same params.yaml again
    run("git add -A && git commit -qm project", origin)
    first, second = tmp_path / "first", tmp_path / "second"
    run(f"git clone -q {origin} {first} && git clone -q {origin} {second}", tmp_path)
    victim = stage(first, "run", on)
    while not [f for f in remote_files(url, endpoint) if f.endswith(".json")] and victim.poll() is None:
        time.sleep(0.01)
    import psutil  # a DVC dependency; torchrun's workers are no children of its process group

    for proc in [psutil.Process(victim.pid), *psutil.Process(victim.pid).children(recursive=True)]:
        proc.kill()  # the machine is gone: every process at once
    said, _ = victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL and "sft: {" not in said, "the run finished before it was killed"
    marker = [f for f in remote_files(url, endpoint) if f.endswith(".json")][-1]
    saved = int(marker.rsplit("step-", 1)[1].removesuffix(".json"))
    assert 4 <= saved < train["max_steps"] and marker.startswith("sft-checkpoints/sft/")
    assert not (second / "ckpt").exists()
    log = finish(stage(second, "run", on))
    assert f"downloaded the step-{saved} checkpoint from DVC remote store" in log
    assert f"resuming from ckpt/run/resume.pt at step {saved}/{train['max_steps']}" in log
    weights = [(d / "out" / n / "model.safetensors").read_bytes() for d, n in ((made, "whole"),
                                                                                (second, "run"))]
    assert weights[0] == weights[1]
    assert not [f for f in remote_files(url, endpoint) if f.startswith("sft-checkpoints")]  # remote_keep 0
    assert not (second / "ckpt/run/resume.pt").exists()


LONG = TRAIN | {"max_steps": 100, "log_every": 10}  # room to kill a run between its first upload and its end


@pytest.mark.slow
def test_sigkill_in_one_clone_then_a_fresh_clone_resumes_from_the_remote_bit_identical(
        workdir, tmp_path, remote, monkeypatch):  # noqa: F811
    url, endpoint, env = remote
    for key, value in env.items():  # the stage subprocesses inherit the S3 credentials, as from the user's shell
        monkeypatch.setenv(key, value)
    kill_in_one_clone_resume_in_another(workdir, tmp_path, url, endpoint, LONG)


@pytest.mark.slow
def test_two_processes_under_torchrun_resume_from_the_remote(workdir, tmp_path):  # noqa: F811
    """Rank 0 uploads; in the fresh clone rank 0 downloads, rank 1 waits for it, and both resume at that step."""
    two = LONG | {"nproc": 2, "batch_size": 4, "max_steps": 150}
    kill_in_one_clone_resume_in_another(workdir, tmp_path, str(tmp_path / "store"), None, two)


def test_other_params_checkpoint_is_refused_and_the_finished_run_keeps_remote_keep(tmp_path, monkeypatch, capsys):
    """In process, a folder remote: a checkpoint found under this run's key but made with other params is refused
    with one line (the run starts fresh); a finished run deletes its remote checkpoints but for remote_keep."""
    from pipeline.train import clear_checkpoint

    store_dir = tmp_path / "store"
    (tmp_path / "project").mkdir()
    dvc_project(tmp_path / "project", str(store_dir))
    monkeypatch.chdir(tmp_path / "project")
    data = packed()
    cfg = config("train", max_steps=6, batch_size=8, save_every=2, lr=1e-3, device="cpu", remote_checkpoints=True,
                 remote_keep=1)
    other = config("train", max_steps=6, batch_size=8, save_every=2, lr=2e-3, device="cpu", remote_checkpoints=True,
                   remote_keep=1)
    train(other, tiny_model(300), CPU, data, None, ckpt_dir="ckpt/other")
    mine = store_dir / "sft-checkpoints/train" / fingerprint(cfg, tiny_model(300), data, 1)
    theirs = store_dir / "sft-checkpoints/train" / fingerprint(other, tiny_model(300), data, 1)
    assert sorted(p.name for p in theirs.iterdir()) == ["step-000000004.json", "step-000000004.pt"]  # the newest
    shutil.copytree(theirs, mine)  # their checkpoint under my key
    capsys.readouterr()
    model = tiny_model(300)
    train(cfg, model, CPU, data, None, ckpt_dir="ckpt/mine")
    out = capsys.readouterr().out
    assert "downloaded the step-4 checkpoint" in out
    refused = [line for line in out.splitlines() if "refusing" in line]
    assert len(refused) == 1 and "fingerprint differs" in refused[0], out
    reference = tiny_model(300)
    train(config("train", max_steps=6, batch_size=8, save_every=0, lr=1e-3, device="cpu"), reference, CPU, data, None)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)  # started fresh
    clear_checkpoint("ckpt/mine", cfg)  # remote_keep 1: the newest stays
    assert sorted(p.name for p in mine.iterdir()) == ["step-000000004.json", "step-000000004.pt"]
    assert json.loads((mine / "step-000000004.json").read_text())["step"] == 4
    clear_checkpoint("ckpt/other", dataclasses.replace(other, remote_keep=0))
    assert not theirs.exists()


def test_remote_bytes_their_marker_does_not_vouch_for_are_never_taken(tmp_path, monkeypatch, capsys):
    """A checkpoint whose bytes changed on the remote after its marker was written (same size, another sha256) is
    passed over with one line; the download takes the newest one whose bytes match."""
    project = tmp_path / "project"
    project.mkdir()
    dvc_project(project, str(tmp_path / "store"))
    monkeypatch.chdir(project)
    store = open_store("sft", "abc")
    good, newer = tmp_path / "good.pt", tmp_path / "newer.pt"
    good.write_bytes(b"step four " * 100)
    newer.write_bytes(b"step eight" * 100)
    store.upload(good, 4, keep=5)
    store.upload(newer, 8, keep=5)
    store.fs.pipe_file(store.path(8, "pt"), b"step EIGHT" * 100)  # the same size, other bytes
    capsys.readouterr()
    assert store.download(tmp_path / "got.pt") == 4 and (tmp_path / "got.pt").read_bytes() == good.read_bytes()
    said = capsys.readouterr().out
    assert said.count("step-000000008.pt does not match its marker; skipping it") == 1, said
    assert not list(tmp_path.glob(".got.pt*"))  # nothing half-downloaded left behind


@pytest.mark.slow
def test_an_unreachable_remote_warns_once_and_the_run_completes(tmp_path, monkeypatch, capsys):
    with __import__("socket").socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "project").mkdir()
    dvc_project(tmp_path / "project", "s3://models/project", f"http://127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path / "project")
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    data = packed()
    cfg = config("train", max_steps=6, batch_size=8, save_every=2, lr=1e-3, device="cpu", remote_checkpoints=True)
    model = tiny_model(300)
    t0 = time.time()
    train(cfg, model, CPU, data, None, ckpt_dir="ckpt")
    out = capsys.readouterr().out
    assert len([line for line in out.splitlines() if "failed (" in line]) == 1, out
    assert "DVC remote store (s3://models/project) failed" in out
    assert time.time() - t0 < 60
    reference = tiny_model(300)
    train(config("train", max_steps=6, batch_size=8, save_every=0, lr=1e-3, device="cpu"), reference, CPU, data, None)
    for a, b in zip(reference.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


UPLOAD = """
import sys
from pathlib import Path
from pipeline.remote import open_store
store = open_store("sft", "abc")
store.upload(Path(sys.argv[1]), 4, 1)
print("step 4 uploaded", flush=True)
store.upload(Path(sys.argv[2]), 8, 1)
"""


@pytest.mark.slow
def test_a_kill_during_upload_leaves_nothing_a_reader_takes(tmp_path, remote, monkeypatch):
    """SIGKILL while a big checkpoint is on its way: a reader still gets the previous complete one, and never bytes
    without their marker (nor a marker whose bytes are short, nor a marker cut short)."""
    url, endpoint, env = remote
    project = tmp_path / "project"
    project.mkdir()
    dvc_project(project, url, endpoint)
    small, big = tmp_path / "small.pt", tmp_path / "big.pt"
    small.write_bytes(b"step four" * 1000)
    with open(big, "wb") as f:
        f.write(os.urandom(1 << 20) * 300)  # 300 MiB: an upload that takes a while
    proc = subprocess.Popen([sys.executable, "-c", UPLOAD, str(small), str(big)], cwd=project, text=True,
                            env=os.environ | env | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "step 4 uploaded"
    while not upload_in_flight(url, endpoint) and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert "sft-checkpoints/sft/abc/step-000000008.json" not in remote_files(url, endpoint)
    assert proc.returncode == -signal.SIGKILL, "the upload ended before it could be killed"
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(project)
    store = open_store("sft", "abc")
    assert isinstance(store, RemoteStore)
    assert store.download(tmp_path / "got.pt") == 4
    assert (tmp_path / "got.pt").read_bytes() == small.read_bytes()
    # a marker vouching for bytes that are not there whole, and a marker cut short: both passed over
    store.fs.pipe_file(store.path(12, "pt"), b"half")
    store.fs.pipe_file(store.path(12, "json"), json.dumps({"step": 12, "size": 8, "sha256": "0" * 64}).encode())
    store.fs.pipe_file(store.path(16, "json"), b'{"step": 1')
    assert store.download(tmp_path / "again.pt") == 4
