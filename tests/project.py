"""Real DVC projects for the end-to-end tests: a temporary git + DVC copy of this project (its pipeline, stages and
dvc.yaml) with tiny params, commands run in it as users type them, and one finished `dvc repro` of the bundled
default shared by every test that only needs a finished project (each gets its own copy: tests run alone and in
any order)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import ROOT, merge

STAGES = ["synth", "tokenizer", "base", "render", "pack", "train", "evaluate", "publish"]

TINY = {  # the bundled default, small enough that `dvc repro` of every stage takes seconds
    "synth": {"n_towns": 6, "n_people": 12, "docs_per_entity": 2, "n_arith_docs": 10, "n_train": 80, "n_dev": 16,
              "n_heldout": 12, "n_mc": 8, "n_mc_train": 0},
    "tokenizer": {"vocab_size": 300},
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate_size": 64},
    "base": {"block_size": 64, "pretrain": {"max_steps": 3, "batch_size": 4}},
    "pack": {"block_size": 128},
    "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2},
    "evaluate": {"limit": 8, "max_new_tokens": 6, "n_boot": 200, "during_train": {"prompts": 4, "max_new_tokens": 4}},
    "publish": {"gate_min": 0.0},  # 3 training steps do not teach stopping; the gate is tested in test_publish
}


def run(cmd: str, cwd: Path, extra_env: dict | None = None, ok: bool = True) -> str:
    """Run a shell command with this venv first on PATH; it must succeed (ok=True) or fail (ok=False)."""
    env = os.environ | (extra_env or {}) | {
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                        "WANDB_MODE": "disabled", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert (proc.returncode == 0) == ok, f"{cmd} exited with {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    """The stages a dvc command ran, in pipeline order."""
    return [s for s in STAGES if f"Running stage '{s}'" in output]


def new_project(repo: Path, *overrides: dict) -> Path:
    """`repo` as a git + DVC project: this project's pipeline, stages and dvc.yaml, params.yaml with TINY and then
    each of `overrides` merged in, committed."""
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    for override in overrides:
        merge(params, override)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q -b main && dvc init -q && git add -A && git commit -qm init", repo)
    return repo


def copy_project(finished: Path, dest: Path) -> Path:
    """A copy of a finished project (git history, DVC cache, outputs) at `dest`, to change as a test likes."""
    shutil.copytree(finished, dest, symlinks=True)
    return dest
