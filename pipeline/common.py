"""What every layer shares: the ignore index, the user-error class and the one handler every stage runs under,
atomic writes, rank-0 checks and printing, the Hub offline flag, and the compute setup (device, precision).
Cheap to import: torch is imported only by `setup_compute`."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

IGNORE_INDEX = -100  # the label of a position that is not trained (PyTorch's cross-entropy default)


class UserError(ValueError):
    """A problem the user can fix (bad data, a bad or missing param, a missing input, a refused model or
    checkpoint, an offline Hub). The message says what, where, and what to do; stages print it as one line."""


@contextlib.contextmanager
def one_line_errors(name: str):
    """A UserError inside ends the program with `<name>: <message>` on stderr and exit status 1, no traceback;
    anything else is a bug and keeps its traceback."""
    try:
        yield
    except UserError as e:
        print(f"{name}: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def run_stage(name: str, main: Callable[..., None]) -> None:
    """How every stage script runs: main(*command-line arguments) under one_line_errors(name)."""
    with one_line_errors(name):
        main(*sys.argv[1:])


def require_inputs(*paths: str) -> None:
    """Every input of a stage exists; else one line naming each missing one."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise UserError(f"missing input {', '.join(missing)}; run the stages before this one (`dvc repro`) or fix "
                        "the path in params.yaml")


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temp path next to `path`; on success it replaces `path` (a crash never leaves half a file)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path):
    """Yield a sibling temp dir; on success it replaces `out` whole, on failure it is removed."""
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.tmp-", dir=out_path.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the output should not be
    try:
        yield tmp
        if out_path.exists():
            shutil.rmtree(out_path) if out_path.is_dir() else out_path.unlink()
        os.replace(tmp, out_path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def write_json(path: str | Path, obj) -> None:
    """Strict JSON, as DVC and every other reader expect: a non-finite float (no value to report) is written null."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(finite_or_null(obj), indent=2, allow_nan=False) + "\n")


def finite_or_null(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


def is_rank0() -> bool:
    """True in a single process and on rank 0 of a torchrun job (RANK set by torchrun)."""
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE set to a true value: nothing may be downloaded or uploaded."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class Compute:
    device: "torch.device"  # noqa: F821
    autocast_dtype: "torch.dtype | None"  # noqa: F821  (None: plain fp32)

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        import torch

        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_compute(device: str = "auto", dtype: str = "auto") -> Compute:
    """Resolve device and precision once: bf16 autocast on CUDA, fp32 on CPU; fp16 is refused."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("device cuda was asked for, but torch sees no CUDA GPU; set device to auto or cpu, or "
                        "install a CUDA build of torch")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype not in ("bfloat16", "float32"):
        raise UserError(f"dtype {dtype!r} is not supported; use auto, bfloat16 or float32 (float16 would need loss "
                        "scaling)")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Compute(dev, torch.bfloat16 if dtype == "bfloat16" else None)
