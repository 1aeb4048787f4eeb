"""End to end: a temporary git + DVC copy of the project with tiny params; real `dvc repro`, `dvc exp run`,
`dvc metrics diff` and `dvc push` to a local remote."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["synth", "tokenizer", "base", "render", "pack", "train", "evaluate", "publish"]

TINY = {
    "synth": {"n_towns": 6, "n_people": 12, "docs_per_entity": 2, "n_arith_docs": 10, "n_train": 80, "n_dev": 16,
              "n_heldout": 12},
    "tokenizer": {"vocab_size": 300},
    "model": {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate_size": 64},
    "base": {"block_size": 64, "pretrain": {"max_steps": 3, "batch_size": 4}},
    "pack": {"block_size": 128},
    "train": {"max_steps": 3, "batch_size": 4, "eval_every": 2},
    "evaluate": {"limit": 8, "max_new_tokens": 6},
}


def merge(params: dict, override: dict) -> None:
    for key, value in override.items():
        if isinstance(value, dict):
            merge(params[key], value)
        else:
            params[key] = value


def run(cmd: str, cwd: Path) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
                        "WANDB_MODE": "disabled", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                        "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run(cmd, shell=True, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def ran(output: str) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in output]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    repo = tmp_path_factory.mktemp("e2e")
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    merge(params, TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q -b main && dvc init -q && git add -A && git commit -qm init", repo)
    return repo


def test_repro_makes_outputs_and_metrics(repo):
    out = run("dvc repro", repo)
    assert ran(out) == STAGES
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    for name in ("base", "sft"):
        assert metrics[name]["n"] == 8
        assert {"exact_match", "contains_answer", "stopped", "length_ok", "distinct3", "dev_loss"} <= set(metrics[name])
    render = json.loads((repo / "reports/render.json").read_text())
    assert render["train"]["assistant_end_trained_fraction"] == 1.0
    assert render["train"]["rows_read"] == render["train"]["rows_kept"] == 80
    assert render["train"]["sources"]["train"]["roles"]["user"]["trained_fraction"] == 0.0
    pack = json.loads((repo / "reports/pack.json").read_text())
    assert pack["train"]["sources"]["train"]["token_share_after"] == 1.0 and pack["train"]["utilisation"] > 0.5
    assert (repo / "publish/model/README.md").exists() and (repo / "models/sft/model.safetensors").exists()
    shown = run("dvc metrics show", repo)
    assert "metrics.json" in shown and "train.sources.train.assistant_end_trained_fraction" in shown
    assert "reports/pack_lengths/train.csv" in run("dvc plots show --json", repo)


def test_second_repro_runs_nothing(repo):
    out = run("dvc repro", repo)
    assert ran(out) == [] and "up to date" in out


def test_lr_experiment_reruns_only_train_and_below(repo):
    run("git add -A && git commit -qm 'first run'", repo)
    out = run("dvc exp run -S train.lr=3e-5", repo)
    assert ran(out) == ["train", "evaluate", "publish"]
    assert "3e-05" in (repo / "params.yaml").read_text()
    diff = run("dvc metrics diff", repo)
    assert "reports/metrics.json" in diff or "reports/train/metrics.json" in diff


def test_masking_policy_change_shows_in_metrics_diff(repo):
    out = run("dvc exp run -S render.train_on=last_assistant", repo)
    assert ran(out)[:2] == ["render", "pack"] and "base" not in ran(out)
    diff = run("dvc metrics diff --targets reports/render.json", repo)  # changed metrics only
    assert "train.trained_fraction" in diff and "train.sources.train.trained_fraction" in diff


def test_push_to_a_local_remote(repo, tmp_path):
    store = tmp_path / "store"
    run(f"dvc remote add -d local {store} && dvc push", repo)
    assert sum(1 for p in store.rglob("*") if p.is_file()) > 10
