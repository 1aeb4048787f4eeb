"""A real queued sweep: two `dvc exp run --queue -S lr=...` experiments run by two parallel queue workers on one
(faked) GPU. Both workers run in copies of the project under .dvc/tmp/exps, yet lock the project's own
.dvc/tmp/gpu-locks, so their GPU stages take turns; `dvc exp show` then lists both with their metrics."""
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
    run("git init -q -b main && dvc init -q && git add -A && git commit -qm init && dvc repro && git add -A && "
        "git commit -qm baseline", repo)

    run("dvc exp run --queue -S lr=1e-4 -n low && dvc exp run --queue -S lr=1e-3 -n high", repo)
    out = run("dvc exp run --run-all -j 2", repo, {"SFT_GPU_COUNT": "1"})  # two workers, one GPU between them
    locks = repo.resolve() / ".dvc" / "tmp" / "gpu-locks"  # DVC_ROOT: the project, not a queue copy
    assert out.count(f"took GPU 0 (of 0; locks in {locks})") == 4, out  # train and evaluate of each experiment
    assert (locks / "gpu0.lock").exists()

    shown = json.loads(run("dvc exp show --json", repo))
    exps = {e["name"]: e["revs"][0]["data"] for b in shown for e in b.get("experiments") or []}
    assert set(exps) == {"low", "high"}
    for name, lr in (("low", 1e-4), ("high", 1e-3)):
        assert exps[name]["params"]["params.yaml"]["data"]["lr"] == lr
        metrics = exps[name]["metrics"]["reports/metrics.json"]["data"]
        assert {"exact_match", "dev_loss"} <= set(metrics["sft"])
    assert exps["low"]["metrics"]["reports/metrics.json"] != exps["high"]["metrics"]["reports/metrics.json"]
