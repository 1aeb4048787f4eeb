"""Full fine-tuning vs LoRA (rank 16) vs FSDP on 2 ranks: the same model, data and rows per step, one run each of
the real train stage (`python -m stages.train`, torchrun for FSDP), in one go.

    python -m bench.memory_bench                 # CPU: a ~26M-parameter Llama, block 256, 16 rows per step
    python -m bench.memory_bench --size 1b       # on a GPU: a ~1B Llama, block 1024

Reported per run: trained tokens/s (median over the logged steps after the first), the memory plan the stage
printed before loading the model (weights + gradients + AdamW state exact, activations estimated, per rank), and
the measured peak: on CUDA the most memory torch allocated on rank 0's GPU, comparable with the plan; on the CPU
the peak resident set of rank 0's process, which also holds Python, torch and the data, so the table gives it
next to the resident set of a process that has only imported them (measured in the same run)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SIZES = {  # name: (architecture, block_size, rows per step, steps)
    "26m": (dict(n_layer=8, n_embd=512, n_head=8, n_kv_head=4, head_dim=64, intermediate_size=1376,
                 vocab_size=8192), 256, 16, 12),
    "1b": (dict(n_layer=16, n_embd=2048, n_head=32, n_kv_head=8, head_dim=64, intermediate_size=8192,
                vocab_size=32768), 1024, 16, 20),
    "100m": (dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, head_dim=64, intermediate_size=2048,
                  vocab_size=16384), 256, 4, 6),  # bench/fit_bench.py
}
RUNS = {  # name: train params over the project's
    "full": {},
    "lora r16": {"lora": {"rank": 16}},
    "fsdp 2 ranks": {"nproc": 2, "parallel": "fsdp"},
}


def workdir(folder: Path, size: str) -> None:
    """A base model folder (random init) and packed random conversations, as the train stage reads them."""
    import torch

    from pipeline.config import PackConfig
    from pipeline.hf import save_model
    from pipeline.model import Architecture, Transformer
    from pipeline.pack import pack, save_packed
    from pipeline.tokenizer import train_tokenizer

    arch, block, _, _ = SIZES[size]
    vocab = arch["vocab_size"]
    texts = [f"word{i} " * 5 for i in range(vocab)]
    tok = train_tokenizer(texts, vocab)
    torch.manual_seed(0)
    model = Transformer(Architecture(**arch, max_seq_len=block, rope_theta=10000.0, norm_eps=1e-5,
                                     tie_embeddings=False, init_std=0.02))
    model.init_weights(0)
    save_model(model, tok, str(folder / "base"))
    rng = np.random.default_rng(0)
    for split, n in (("train", 400), ("dev", 16)):
        ids = [rng.integers(8, vocab, int(rng.integers(block // 4, block))).astype(np.int32) for _ in range(n)]
        labels = [np.where(np.arange(len(x)) >= len(x) * 0.6, x, -100).astype(np.int32) for x in ids]
        save_packed(pack(ids, labels, PackConfig(block_size=block, overlong="drop", seed=0, weights={}))[0],
                    str(folder / f"packed/{split}"))


def run(folder: Path, name: str, size: str, device: str) -> dict:
    _, _, rows, steps = SIZES[size]
    train = {"max_steps": steps, "batch_size": rows, "grad_accum": 1, "save_every": 0, "eval_every": 1000,
             "log_every": 1, "device": device, "compile": device == "cuda"} | RUNS[name]
    if train.get("nproc", 1) > 1:
        train["batch_size"] = rows // train["nproc"]  # the same rows per optimizer step
    return train_stage(folder, name, train)


def train_stage(folder: Path, name: str, train: dict) -> dict:
    """One run of the real train stage in `folder` (base/ and packed/ made by workdir) with params.yaml's train
    section and `train` merged in (lora.* in its adapters): its median tokens/s after the first step, its plan line,
    seconds, and the plan_*/peak_* figures of its metrics.json."""
    import yaml

    from pipeline.config import read_params

    train = dict(train)
    params = read_params(str(ROOT / "params.yaml"))
    lora = train.pop("lora", {})
    params["train"] |= train
    params["train"]["lora"] |= lora
    params["evaluate"]["during_train"] |= {"prompts": 0, "samples": 0}
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    tag = name.replace(" ", "_").replace("+", "")
    cmd = [sys.executable, "-m", "stages.train", "base", "packed", f"out/{tag}", f"reports/{tag}", f"ckpt/{tag}",
           f"adapter/{tag}"]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "DVC_NO_ANALYTICS": "1"})
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((folder / f"reports/{tag}/metrics.json").read_text())
    tok_s = np.loadtxt(folder / f"reports/{tag}/plots/metrics/tokens_per_s.tsv", skiprows=1)[1:, 1]
    plan = next(line for line in proc.stdout.splitlines() if "memory plan per rank" in line)
    return {"run": name, "tokens_per_s": float(np.median(tok_s)), "plan_line": plan.split(": ", 1)[1],
            "seconds": time.time() - t0} | {k: v for k, v in metrics.items() if k.startswith(("plan_", "peak_"))}


def imported_rss() -> float:
    """GiB resident in a process that imported torch and the pipeline's training modules, and nothing more."""
    code = ("import resource, pipeline.sft; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="26m", choices=SIZES)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    baseline = imported_rss() if device == "cpu" else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        workdir(folder, args.size)
        results = [run(folder, name, args.size, device) for name in RUNS]
    print(json.dumps({"size": args.size, "device": device, "imported_rss_gib": baseline, "runs": results}, indent=1))
    peak = "peak allocated (GiB)" if device == "cuda" else "peak RSS (GiB)"
    print(f"\n| run | tokens/s | planned weights + grads + AdamW (GiB) | planned activations (GiB) | planned total "
          f"(GiB) | {peak} |\n|---|---|---|---|---|---|")
    for r in results:
        state = r["plan_weights_gib"] + r["plan_gradients_gib"] + r["plan_optimizer_gib"]
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {state:.3f} | {r['plan_activations_gib']:.3f} | "
              f"{r['plan_total_gib']:.3f} | {r['peak_memory_gib']:.3f} |")
    if device == "cpu":
        print(f"\nimported torch and the pipeline alone: {baseline:.3f} GiB resident")


if __name__ == "__main__":
    main()
