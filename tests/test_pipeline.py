"""End to end: a temporary git + DVC copy of the project with tiny params; real `dvc repro`, `dvc exp run`,
`dvc metrics diff`, and `dvc push`/`dvc pull` through a local folder remote and an S3-compatible server."""
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.hub_server import HubServer
from tests.project import STAGES, TINY, ran, run  # noqa: F401  (TINY: for older imports)

pytestmark = pytest.mark.slow  # real DVC runs of every stage: `make test-quick` leaves them out


def test_repro_makes_outputs_and_metrics(finished_project, project):
    """The shared finished project (tests/project.py): its first `dvc repro` ran every stage."""
    repo = project
    out = (finished_project.parent / "repro.log").read_text()
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


def test_second_repro_runs_nothing(project):
    out = run("dvc repro", project)
    assert ran(out) == [] and "up to date" in out


def test_a_suites_experiment_reruns_only_evaluate_and_publish(project):
    """`dvc exp run -S evaluate.suites=...` names other suite files: only evaluate and publish rerun, and the new
    suite's base and sft scores (n, intervals, paired difference) show in metrics.json and `dvc metrics diff`."""
    repo = project
    world = json.loads((repo / "reports/metrics.json").read_text())["world"]  # the bundled suite, from synth
    assert world["base"]["mc_n"] == 8 and world["prompting"] == {"base": "chat", "sft": "chat"}
    mine = repo / "suites/mine"
    mine.mkdir(parents=True)
    rows = [{"question": f"What is {a} plus {b}?", "answer": a + b} for a, b in ((1, 2), (3, 4), (5, 0), (2, 2))]
    rows += [{"question": "Which is a colour?", "choices": ["red", "Osk", "Tal"], "answer": "A"}]
    (mine / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run("git add suites", repo)
    out = run("dvc exp run -S evaluate.suites=suites/mine", repo)
    assert ran(out) == ["evaluate", "publish"]
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert "world" not in metrics and metrics["sums"]["base"]["exact_n"] == 4 and metrics["sums"]["sft"]["mc_n"] == 1
    assert "exact_acc_lo" in metrics["sums"]["sft_minus_base"] and "n" in metrics["regressions"]
    out = run("dvc metrics diff --json --all", repo)  # (HEAD has no metrics: DVC says so after the JSON)
    diff = json.JSONDecoder().raw_decode(out)[0]["reports/metrics.json"]
    assert diff["sums.sft.exact_acc"]["new"] == metrics["sums"]["sft"]["exact_acc"]
    assert "Suite `sums`" in (repo / "reports/eval.md").read_text()


def test_lr_experiment_as_the_user_types_it_reruns_only_train_and_below(project):
    """`dvc exp run -S lr=3e-5`, exactly as users type it: DVC writes 3e-05 back to params.yaml, only train,
    evaluate and publish rerun, the optimizer's schedule peaks at the new value, and `dvc metrics diff` shows the
    fine-tuned model's metrics changing while the base model's do not."""
    repo = project
    out = run("dvc exp run -S lr=3e-5", repo)
    assert ran(out) == ["train", "evaluate", "publish"]
    assert "lr: 3e-05" in (repo / "params.yaml").read_text().splitlines()
    logged = [float(line.split("\t")[1]) for line in
              (repo / "reports/train/plots/metrics/lr.tsv").read_text().splitlines()[1:]]
    assert max(logged) == pytest.approx(3e-5, rel=1e-9)  # the lr that reached the optimizer
    diff = json.loads(run("dvc metrics diff --json", repo))["reports/metrics.json"]
    assert "sft.dev_loss" in diff and diff["sft.dev_loss"]["old"] != diff["sft.dev_loss"]["new"]
    assert not [k for k in diff if k.startswith("base.")], "the base model did not change, nor may its metrics"


def test_masking_policy_change_shows_in_metrics_diff(project):
    repo = project
    out = run("dvc exp run -S render.train_on=last_assistant", repo)
    assert ran(out)[:2] == ["render", "pack"] and "base" not in ran(out)
    diff = run("dvc metrics diff --targets reports/render.json", repo)  # changed metrics only
    assert "train.trained_fraction" in diff and "train.sources.train.trained_fraction" in diff


def test_lora_experiment_as_the_user_types_it_writes_the_adapter_as_its_own_out(project, tmp_path):
    repo = project
    out = run("dvc exp run -S train.lora.rank=16", repo)
    assert ran(out) == ["train", "evaluate", "publish"]
    adapter = repo / "models/adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 16
    assert "Fine-tuned with LoRA (rank 16" in (repo / "publish/model/README.md").read_text()
    metrics = json.loads((repo / "reports/train/metrics.json").read_text())
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert metrics["plan_gradients_gib"] * 2**30 == 4 * sum(t.numel() for t in tensors.values())  # adapters only
    store = tmp_path / "adapters"
    run(f"dvc remote add adapters {store} && dvc push -r adapters models/adapter", repo)
    pushed = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    weights = (repo / "models/sft/model.safetensors").stat().st_size
    assert pushed < weights / 2, (pushed, weights)  # the adapter alone, not the model again


def pull_into_fresh_clone(repo: Path, dest: Path, remote: str, env: dict | None = None) -> None:
    """Clone the git repo (no DVC cache, no outputs), `dvc pull` from the remote, and check every output is back
    byte for byte."""
    run(f"git clone -q {repo} {dest}", repo)
    run(f"dvc pull -r {remote}", dest, env)
    for out in ("models/sft", "models/adapter", "models/base", "data/packed", "publish/model"):
        files = sorted(p.relative_to(repo) for p in (repo / out).rglob("*") if p.is_file())
        assert files, out
        for f in files:
            assert (dest / f).read_bytes() == (repo / f).read_bytes(), f
    assert "up to date" in run("dvc status", dest, env)


def test_push_and_pull_with_a_local_remote(project, tmp_path):
    repo = project
    store = tmp_path / "store"
    run(f"dvc remote add -d local {store} && git add -A && git commit -qm remote && dvc push", repo)
    assert sum(1 for p in store.rglob("*") if p.is_file()) > 10
    pull_into_fresh_clone(repo, tmp_path / "clone", "local")


@pytest.fixture
def s3_server(tmp_path):
    """moto's S3-compatible server on 127.0.0.1 (offline), with an empty bucket."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        import boto3

        boto3.client("s3", endpoint_url=url, **{"aws_access_key_id": "test", "aws_secret_access_key": "test",
                                               "region_name": "us-east-1"}).create_bucket(Bucket="models")
        yield url, env
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_push_and_pull_with_an_s3_remote(project, tmp_path, s3_server):
    repo = project
    url, env = s3_server
    run(f"dvc remote add s3 s3://models/sft && dvc remote modify s3 endpointurl {url} && git add -A && "
        "git commit -qm 's3 remote'", repo)
    run("dvc push -r s3", repo, env)
    import boto3

    listed = boto3.client("s3", endpoint_url=url, aws_access_key_id="test", aws_secret_access_key="test",
                          region_name="us-east-1").list_objects_v2(Bucket="models")
    assert listed["KeyCount"] > 10
    pull_into_fresh_clone(repo, tmp_path / "clone", "s3", env)


def base_stage_ran_on(repo: Path, source: Path) -> None:
    from safetensors.torch import load_file

    ours, theirs = load_file(repo / "models/base/model.safetensors"), load_file(source / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert "corpus_loss" in json.loads((repo / "reports/base/metrics.json").read_text())


def test_bring_your_own_base_model_folder_or_hub_repo(project, tmp_path):
    """base.init_from names a folder, then a Hub repo (served on 127.0.0.1): params.yaml is the only change."""
    repo = project
    mine = tmp_path / "my-base"
    shutil.copytree(repo / "models/base", mine)
    out = run(f"dvc exp run -S base.init_from={mine}", repo)
    # tokenizer and base now come from the folder; it holds the very model trained before, so render, pack, train
    # and evaluate see unchanged inputs and DVC skips them (publish reruns: it records every param)
    assert ran(out) == ["tokenizer", "base", "publish"]
    base_stage_ran_on(repo, mine)
    with HubServer() as hub:
        hub.state.repos["me/base"] = {"private": False, "commits": ["init"],
                                      "files": {p.name: p.read_bytes() for p in mine.iterdir()}}
        out = run("dvc exp run -S base.init_from=hf://me/base", repo, {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"})
    assert "Running stage 'base'" in out
    base_stage_ran_on(repo, mine)
    assert any(path.startswith("/me/base/resolve/") for _, path, _ in hub.state.requests)
    out = run("dvc exp run -S base.init_from=hf://me/other", repo, {"HF_HUB_OFFLINE": "1"}, ok=False)
    assert "cannot download me/other: HF_HUB_OFFLINE is set" in out
