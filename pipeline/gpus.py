"""One GPU per run: a stage that will compute on CUDA takes free GPUs of its own (one flock'ed file per GPU under
the DVC project's .dvc/tmp/gpu-locks, shared by every `dvc queue` worker), waits while all are taken, and sets
CUDA_VISIBLE_DEVICES to them before CUDA starts. The kernel drops a flock when its process dies, SIGKILL included."""
import ctypes
import fcntl
import os
import tempfile
import time
from pathlib import Path

from pipeline.common import UserError

FAKE_COUNT = "SFT_GPU_COUNT"  # test/ops hook: pretend this machine has N GPUs (the CPU tests set it); never set in runs
LOCK_DIR = "SFT_GPU_LOCK_DIR"  # one lock folder for several projects on one machine (default: the project's own)


def nvml_gpu_count() -> int:
    """GPUs the NVIDIA driver reports (as nvidia-smi does), 0 without a driver. Asked through NVML, not torch.cuda:
    torch's count initialises CUDA, after which a new CUDA_VISIBLE_DEVICES has no effect in this process."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return 0
    count = ctypes.c_uint(0)
    if nvml.nvmlInit_v2() != 0:
        return 0
    try:
        return count.value if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) == 0 else 0
    finally:
        nvml.nvmlShutdown()


def candidate_gpus() -> list[str]:
    """The GPUs this process may take: the user's CUDA_VISIBLE_DEVICES when set (ids or UUIDs), else all of them."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [d.strip() for d in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    n = int(os.environ[FAKE_COUNT]) if FAKE_COUNT in os.environ else nvml_gpu_count()
    return [str(i) for i in range(n)]


def gpu_lock_dir() -> Path:
    """<project>/.dvc/tmp/gpu-locks. DVC sets DVC_ROOT for every stage; in a queued experiment (which runs in a copy
    under .dvc/tmp/exps) it is the original project, so all workers of one project share the folder. Run by hand,
    outside DVC: the DVC project around the working directory, else one folder per machine in the temp dir."""
    if os.environ.get(LOCK_DIR):
        return Path(os.environ[LOCK_DIR])
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]) / ".dvc" / "tmp" / "gpu-locks"
    here = Path.cwd().resolve()
    project = next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), None)
    return project / ".dvc" / "tmp" / "gpu-locks" if project else Path(tempfile.gettempdir()) / "sft-gpu-locks"


def try_lock(path: Path, holder: str) -> int | None:
    """An open, flock'ed descriptor of `path` (its text says who holds it), or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{holder} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
    return fd


def take_gpus(n: int, lock_dir: Path, who: str, poll_s: float = 0.5) -> list[str]:
    """Take n free GPUs of candidate_gpus(), waiting while fewer are free, and make them this process's (and its
    children's) CUDA_VISIBLE_DEVICES: `cuda` is then the first taken GPU. The locks are held until the process
    exits; a run needing several GPUs takes all at once or none, so two such runs never deadlock."""
    gpus = candidate_gpus()
    if n > len(gpus):
        raise UserError(f"{n} GPUs asked for (nproc), but only {len(gpus)} are visible "
                        f"({', '.join(gpus) or 'none'}); lower nproc or widen CUDA_VISIBLE_DEVICES")
    lock_dir.mkdir(parents=True, exist_ok=True)
    waiting = False
    while True:
        held = {}
        for gpu in gpus:
            fd = try_lock(lock_dir / f"gpu{gpu}.lock", who)
            if fd is not None:
                held[gpu] = fd
                if len(held) == n:
                    taken = list(held)
                    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(taken)
                    print(f"{who}: took GPU {','.join(taken)} (of {','.join(gpus)}; locks in {lock_dir})", flush=True)
                    return taken  # the descriptors stay open (never closed): the locks last as long as the process
        for fd in held.values():  # too few free: hold none while waiting
            os.close(fd)
        if not waiting:
            print(f"{who}: waiting for {n} free GPU(s) of {','.join(gpus)}; other runs hold the rest (locks in "
                  f"{lock_dir})", flush=True)
            waiting = True
        time.sleep(poll_s)


def claim_gpus(who: str, device: str, nproc: int) -> list[str]:
    """What a GPU stage calls first: take nproc GPUs when it will compute on CUDA (device cuda, or auto on a CUDA
    build of torch with a GPU), else nothing. A torchrun rank (RANK set) takes none: its launcher holds them."""
    if "RANK" in os.environ or device == "cpu":
        return []
    if FAKE_COUNT not in os.environ:
        import torch  # importing does not initialise CUDA; torch.cuda.is_available() would

        if torch.version.cuda is None or not candidate_gpus():
            return []
    return take_gpus(nproc, gpu_lock_dir(), who)
