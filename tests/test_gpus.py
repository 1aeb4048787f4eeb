"""GPU choice (pipeline/gpus.py) with the GPU count faked on the CPU (SFT_GPU_COUNT): real processes holding real
locks. Four take four different GPUs, a fifth waits until one exits, a SIGKILLed holder frees its GPU, and
CUDA_VISIBLE_DEVICES narrows the choice."""
import os
import select
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.gpus import claim_gpus, gpu_lock_dir, take_gpus
from tests.conftest import ROOT

# takes n GPUs, prints what it took, then holds them until its stdin closes
HOLDER = """import sys
from pathlib import Path
from pipeline.gpus import take_gpus
take_gpus(int(sys.argv[2]), Path(sys.argv[1]), "holder", poll_s=0.05)
sys.stdin.read()
"""


class Holder:
    def __init__(self, lock_dir: Path, n: int = 1, count: int = 4, visible: str | None = None):
        env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"} | {"SFT_GPU_COUNT": str(count)}
        if visible is not None:
            env["CUDA_VISIBLE_DEVICES"] = visible
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), str(n)], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def line(self, timeout: float = 20.0) -> str | None:
        """The holder's next output line, or None if it prints none within `timeout` seconds."""
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else None

    def took(self) -> str:
        """The GPU ids it took (after any waiting line)."""
        line = self.line()
        while line and "waiting" in line:
            line = self.line()
        assert line and line.startswith("holder: took GPU "), line
        return line.split()[3]

    def release(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=20)


@pytest.fixture
def holders(tmp_path):
    started = []

    def start(**kw) -> Holder:
        started.append(Holder(tmp_path / "locks", **kw))
        return started[-1]

    yield start
    for h in started:
        h.proc.kill()
        h.proc.wait()


def test_four_processes_take_four_gpus_and_a_fifth_waits_for_one_to_exit(holders):
    four = [holders() for _ in range(4)]
    taken = [h.took() for h in four]
    assert sorted(taken) == ["0", "1", "2", "3"]
    fifth = holders()
    assert "waiting" in fifth.line()
    assert fifth.line(timeout=1.0) is None, "the fifth took a GPU while all four were held"
    four[2].release()
    assert fifth.took() == taken[2]


def test_a_sigkilled_holder_frees_its_gpu(holders):
    first, second = holders(count=2), holders(count=2)
    killed = first.took()
    assert {killed, second.took()} == {"0", "1"}
    third = holders(count=2)
    assert "waiting" in third.line()
    first.proc.send_signal(signal.SIGKILL)  # no cleanup runs: the kernel drops the flock with the process
    first.proc.wait(timeout=20)
    assert third.took() == killed


def test_cuda_visible_devices_is_respected(holders):
    a, b = holders(visible="2,3"), holders(visible="2,3")
    assert sorted([a.took(), b.took()]) == ["2", "3"]
    c = holders(visible="2,3")
    assert "waiting" in c.line(), "GPUs 0 and 1 are free but not visible: it must wait"


def test_nproc_takes_that_many_at_once(holders):
    one = holders(n=1)
    assert one.took() == "0"
    assert holders(n=3).took() == "1,2,3"
    assert "waiting" in holders(n=2).line(), "a 2-GPU run waits with nothing held while one GPU is free"


def test_taken_gpus_become_cuda_visible_devices(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_GPU_COUNT", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    try:
        assert take_gpus(2, tmp_path, "t") == ["0", "1"]
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"  # the torchrun ranks inherit it; rank r uses cuda:r
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # take_gpus set it; monkeypatch restores the one from before
    assert "t pid" in (tmp_path / "gpu0.lock").read_text()


def test_too_many_asked_for_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_GPU_COUNT", "2")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(ValueError, match="3 GPUs asked for.*only 2 are visible"):
        take_gpus(3, tmp_path, "t")


def test_cpu_runs_and_torchrun_ranks_take_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("SFT_GPU_COUNT", "2")
    monkeypatch.setenv("SFT_GPU_LOCK_DIR", str(tmp_path))
    assert claim_gpus("t", "cpu", 1) == []
    monkeypatch.setenv("RANK", "1")
    assert claim_gpus("t", "auto", 1) == []
    assert not list(tmp_path.iterdir())


def test_lock_dir_is_the_projects_even_in_a_queued_copy(monkeypatch, tmp_path):
    """DVC sets DVC_ROOT to the original project for a queued experiment that runs in .dvc/tmp/exps/..."""
    monkeypatch.delenv("SFT_GPU_LOCK_DIR", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert gpu_lock_dir() == tmp_path / ".dvc" / "tmp" / "gpu-locks"


def test_lock_dir_run_by_hand_is_the_dvc_project_around(monkeypatch, tmp_path):
    for name in ("SFT_GPU_LOCK_DIR", "DVC_ROOT"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert gpu_lock_dir() == tmp_path.resolve() / ".dvc" / "tmp" / "gpu-locks"
