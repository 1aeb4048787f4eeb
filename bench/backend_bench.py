"""Training throughput of the same Llama checkpoint on both backends (pipeline/backend.py), side by side.

    python -m bench.backend_bench                  # a ~4M and a ~19M Llama (tied embeddings)
    python -m bench.backend_bench --configs 4m     # a subset

One Llama is built with transformers' config class and saved as the Hub ships it (bf16 safetensors); each backend
loads that folder in a child process of its own and runs the project's train step (pipeline.train:
accumulate_gradients, clipping, AdamW) on the same packed rows of random conversations (~40% of tokens trained),
fp32 on the CPU (bf16 autocast on CUDA). Reported per backend: trained tokens/s (non-padding tokens of a step over
its wall time, the median of the steps after warmup; each backend run `--rounds` times, alternated, and the median
of the runs reported), the first step's loss (equal on both: the same model, rows and loss) and peak memory (CPU:
peak RSS of the child; CUDA: max allocated). The ratio is native tokens/s over transformers'."""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

CONFIGS = {  # name: (LlamaConfig fields, block size, batch size)
    "4m": (dict(hidden_size=192, intermediate_size=512, num_hidden_layers=6, num_attention_heads=6,
                num_key_value_heads=2, vocab_size=8192), 256, 8),
    "19m": (dict(hidden_size=384, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=6,
                 num_key_value_heads=2, vocab_size=16384), 256, 8),
}
WARMUP, STEPS = 2, 8


def make_folder(folder: Path, fields: dict) -> None:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**fields, max_position_embeddings=1024, tie_word_embeddings=True,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)


def rows(vocab: int, block: int, n_rows: int, seed: int = 0) -> dict:
    from pipeline.config import PackConfig
    from pipeline.pack import pack

    rng = np.random.default_rng(seed)
    ids, labels = [], []
    while sum(map(len, ids)) < n_rows * block * 0.97:
        x = rng.integers(8, vocab, int(rng.integers(32, block // 2))).astype(np.int32)
        cut = int(len(x) * 0.6)
        ids.append(x)
        labels.append(np.where(np.arange(len(x)) >= cut, x, -100).astype(np.int32))
    return pack(ids, labels, PackConfig(block_size=block, overlong="drop", seed=0, weights={}))[0]


def side(backend: str, folder: str, block: int, batch: int) -> dict:
    """One backend in this process: STEPS timed train steps after WARMUP."""
    from pipeline.backend import load_model
    from pipeline.common import setup_compute
    from pipeline.train import accumulate_gradients, configure, make_optimizer, micro_batches
    from tests.conftest import config

    compute = setup_compute("auto", "auto")
    model = load_model(folder, backend).to(compute.device)
    cfg = config("train", batch_size=batch, grad_accum=1, compile=False)
    configure(model, cfg, compute)
    data = rows(model.arch.vocab_size, block, batch * (WARMUP + STEPS))
    optimizer = make_optimizer(model, cfg, compute.device)
    batches = micro_batches(data, cfg, compute.device)
    model.train()
    speeds, first = [], None
    for step in range(WARMUP + STEPS):
        micro = [next(batches)]
        t0 = time.perf_counter()
        loss_sum, n = accumulate_gradients(model, micro, compute)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss = (loss_sum / n).item()  # waits for the device
        first = loss if first is None else first
        if step >= WARMUP:
            speeds.append(sum(b.n_tokens for b in micro) / (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated() if compute.device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": float(np.median(speeds)), "first_loss": first, "peak_gib": peak / 2**30,
            "params": model.num_params(), "device": str(compute.device)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=3, help="runs of each backend, alternated")
    ap.add_argument("--side", help=argparse.SUPPRESS)  # backend:folder:block:batch, in a child process
    args = ap.parse_args()
    if args.side:
        backend, folder, block, batch = args.side.split(":")
        print(json.dumps(side(backend, folder, int(block), int(batch))))
        return
    print("| model | backend | tokens/s, median (each run) | first loss | peak memory | native / transformers |")
    print("|---|---|---|---|---|---|")
    for name in args.configs.split(","):
        fields, block, batch = CONFIGS[name]
        with tempfile.TemporaryDirectory() as tmp:
            make_folder(Path(tmp), fields)
            runs = {"native": [], "transformers": []}
            for i in range(args.rounds):  # alternated, so that a change of load on a shared machine hits both
                for backend in ("native", "transformers") if i % 2 == 0 else ("transformers", "native"):
                    proc = subprocess.run([sys.executable, "-m", "bench.backend_bench", "--side",
                                           f"{backend}:{tmp}:{block}:{batch}"], capture_output=True, text=True,
                                          check=True)
                    runs[backend].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        speed = {b: float(np.median([r["tokens_per_s"] for r in rs])) for b, rs in runs.items()}
        ratios = [n["tokens_per_s"] / t["tokens_per_s"] for n, t in zip(runs["native"], runs["transformers"])]
        for backend, rs in runs.items():
            r = rs[0]
            print(f"| {name} ({r['params'] / 1e6:.1f}M, {r['device']}, block {block}, batch {batch}) | {backend} | "
                  f"{speed[backend]:,.0f} ({', '.join(format(x['tokens_per_s'], ',.0f') for x in rs)}) | "
                  f"{r['first_loss']:.4f} | {max(x['peak_gib'] for x in rs):.2f} GiB | "
                  + (f"{speed['native'] / speed['transformers']:.2f}x (rounds: "
                     f"{', '.join(f'{x:.2f}' for x in ratios)})" if backend == "transformers" else "") + " |")


if __name__ == "__main__":
    main()
