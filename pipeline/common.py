"""Shared helpers: params.yaml -> dataclasses, atomic outputs, compute setup, rank-0 printing."""
import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import typing
from pathlib import Path

import torch
import yaml

PARAMS_FILE = "params.yaml"


def _coerce(value, kind, where: str):
    """Type-check one scalar; DVC writes `-S train.lr=3e-5` as '3e-05', which YAML reads as a string."""
    if kind is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is int and isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value)
    elif kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind in (int, float, str, bool) and (type(value) is not kind):
        if not (kind is float and type(value) is int):
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def from_dict(cls, section: dict, where: str):
    """Build dataclass `cls` from a dict: unknown or missing keys fail, scalars are type-checked."""
    if not isinstance(section, dict):
        raise ValueError(f"{where}: expected a mapping, got {section!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in section.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = from_dict(kind, value, f"{where}.{key}")
        else:
            kwargs[key] = _coerce(value, kind, f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"{where}: {e}") from None


def load_params(section: str, cls, path: str = PARAMS_FILE):
    """Load one section of params.yaml into its dataclass."""
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section not in params:
        raise ValueError(f"{path}: missing section '{section}'")
    return from_dict(cls, params[section], f"{path}:{section}")


@contextlib.contextmanager
def atomic_dir(out: str):
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


def write_json(path: str, obj) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, p)


def is_rank0() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def print0(*args, **kwargs) -> None:
    if is_rank0():
        print(*args, **kwargs, flush=True)


@dataclasses.dataclass
class Compute:
    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


def setup_compute(device: str = "auto", dtype: str = "auto") -> Compute:
    """Resolve device and precision once: bf16 autocast on CUDA, fp32 on CPU; fp16 is refused."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    if dtype == "float16":
        raise ValueError("float16 is not supported (needs loss scaling); use bfloat16 or float32")
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"unknown dtype {dtype!r}: use auto, bfloat16 or float32")
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Compute(dev, torch.bfloat16 if dtype == "bfloat16" else None)
