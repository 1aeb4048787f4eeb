"""A real queued sweep: `dvc exp run --queue -S 'lr=1e-4,1e-3'` (two experiments) run by two parallel queue
workers on one (faked) GPU. Both workers run in copies of the project under .dvc/tmp/exps, yet lock the project's
own .dvc/tmp/gpu-locks, so their GPU stages take turns; `dvc exp show` then lists both with their metrics."""
import json
import shutil

import pytest
import yaml

from tests.conftest import ROOT, merge
from tests.test_pipeline import TINY, run

pytestmark = pytest.mark.slow  # a real dvc repro and a two-experiment queue (about a minute)


def test_queued_sweep_takes_turns_on_the_gpu_and_exp_show_lists_both(tmp_path):
    repo = tmp_path / "sweep"
    repo.mkdir()
    for name in ("pipeline", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    locks = repo.resolve() / ".dvc" / "tmp" / "gpu-locks"
    took = f"took GPU 0 (of 0; locks in {locks})"
    out = run("git init -q -b main && dvc init -q && git add -A && git commit -qm init && dvc repro", repo,
              {"SFT_GPU_COUNT": "1"})
    assert f"base: {took}" in out and f"train: {took}" in out and f"evaluate: {took}" in out
    run("git add -A && git commit -qm baseline", repo)

    run("dvc exp run --queue -S 'lr=1e-4,1e-3'", repo)  # a Hydra sweep: one queued experiment per value
    out = run("dvc exp run --run-all -j 2", repo, {"SFT_GPU_COUNT": "1"})  # two workers, one GPU between them
    # each worker runs in its own copy under .dvc/tmp/exps, yet locks the project's folder (DVC_ROOT)
    assert out.count(f"train: {took}") == 2 and out.count(f"evaluate: {took}") == 2, out

    shown = json.loads(run("dvc exp show --json", repo))
    exps = [e["revs"][0]["data"] for b in shown for e in b.get("experiments") or []]
    by_lr = {e["params"]["params.yaml"]["data"]["lr"]: e["metrics"]["reports/metrics.json"]["data"] for e in exps}
    assert sorted(by_lr) == [1e-4, 1e-3]
    assert all({"exact_match", "dev_loss"} <= set(metrics["sft"]) for metrics in by_lr.values())
    assert by_lr[1e-4]["sft"]["dev_loss"] != by_lr[1e-3]["sft"]["dev_loss"]
