"""A real queued sweep: `dvc exp run --queue -S 'lr=1e-4,1e-3'` (two experiments) run by two parallel queue
workers on one (faked) GPU. Both workers run in copies of the project under .dvc/tmp/exps, yet lock the project's
own .dvc/tmp/gpu-locks, so their GPU stages take turns; `dvc exp show` then lists both with their metrics."""
import json

import pytest

from tests.project import run

pytestmark = pytest.mark.slow  # a two-experiment queue on the shared finished project (about a minute)


def test_queued_sweep_takes_turns_on_the_gpu_and_exp_show_lists_both(finished_project, project):
    first = (finished_project.parent / "repro.log").read_text()  # its `dvc repro` ran with one faked GPU
    locks = finished_project.resolve() / ".dvc" / "tmp" / "gpu-locks"
    took = f"took GPU 0 (of 0; locks in {locks})"
    assert f"base: {took}" in first and f"train: {took}" in first and f"evaluate: {took}" in first
    repo = project
    run("dvc exp run --queue -S 'lr=1e-4,1e-3'", repo)  # a Hydra sweep: one queued experiment per value
    out = run("dvc exp run --run-all -j 2", repo, {"SFT_GPU_COUNT": "1"})  # two workers, one GPU between them
    # each worker runs in its own copy under .dvc/tmp/exps, yet locks the project's folder (DVC_ROOT)
    took = f"took GPU 0 (of 0; locks in {repo.resolve() / '.dvc' / 'tmp' / 'gpu-locks'})"
    assert out.count(f"train: {took}") == 2 and out.count(f"evaluate: {took}") == 2, out

    shown = json.loads(run("dvc exp show --json", repo))
    exps = [e["revs"][0]["data"] for b in shown for e in b.get("experiments") or []]
    by_lr = {e["params"]["params.yaml"]["data"]["lr"]: e["metrics"]["reports/metrics.json"]["data"] for e in exps}
    assert sorted(by_lr) == [1e-4, 1e-3]
    assert all({"exact_match", "dev_loss"} <= set(metrics["sft"]) for metrics in by_lr.values())
    assert by_lr[1e-4]["sft"]["dev_loss"] != by_lr[1e-3]["sft"]["dev_loss"]
