"""Training throughput: this project's train step against TRL's SFTTrainer (transformers Llama), in one run.

    python -m bench.train_bench                   # the configurations of this device (CPU: 1m, 10m; CUDA: 124m)
    python -m bench.train_bench --configs 1m      # a subset

Each side runs in its own child process (so peak memory is its own) on the same random conversations with the
same Llama configuration, block size, batch and precision: ours packed by pipeline/pack.py, TRL's packed by TRL
itself (packing=True, best-fit decreasing, padding-free batches, completion-only loss). Reported per side: trained
tokens/s (non-padding tokens of the step over its wall time, after warmup), model FLOP utilisation over the matmul
peak of this device measured in the same run (fp32 square matmuls on the CPU, bf16 on CUDA), and peak memory
(CUDA: max allocated; CPU: peak RSS of the child). MFU is given on two FLOP counts per token (forward + backward =
3 x forward, a multiply-add = 2 FLOPs; N parameters, V vocabulary, d width, L layers, conversations of l tokens):
- nominal: 6 N, the figure most reports quote; it credits FLOPs a packed, masked step does not run;
- executed: 6 (N - V d) for the blocks' matrices (the embedding is a lookup), 6 L d E[l (l + 1)] / E[l] for causal
  attention within each conversation (never across packed neighbours, never the future), and 6 V d for the output
  layer at the positions that run it: ours only where a target is trained (the trained fraction of tokens), TRL's
  at every token (its completion-only loss masks the logits after computing them)."""
import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
import torch

CONFIGS = {  # name: (model, block_size, batch_size, device)
    "1m": (dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, intermediate_size=344, vocab_size=2048), 256, 8, "cpu"),
    "10m": (dict(n_layer=10, n_embd=256, n_head=8, n_kv_head=4, intermediate_size=688, vocab_size=8192), 256, 8,
            "cpu"),
    "124m": (dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, intermediate_size=2048, vocab_size=32768), 1024,
             16, "cuda"),
    # a Qwen2-shaped model (biases on q, k, v) of ~100M parameters: `--configs 100m-qwen2` (not run by default)
    "100m-qwen2": (dict(n_layer=10, n_embd=640, n_head=10, n_kv_head=2, intermediate_size=3456, vocab_size=32768,
                        family="qwen2"), 256, 8, "cpu"),
}
WARMUP, STEPS = 3, 10


def conversations(n: int, vocab: int, block: int, seed: int = 0):
    """Random conversations of 32..block/2 tokens; the last ~40% (the answer) is trained."""
    rng = np.random.default_rng(seed)
    ids, masks = [], []
    for _ in range(n):
        length = int(rng.integers(32, block // 2))
        ids.append(rng.integers(8, vocab, length).astype(np.int32))
        prompt = int(length * 0.6)
        masks.append(np.array([0] * prompt + [1] * (length - prompt), dtype=np.int32))
    return ids, masks


def flops_per_token(n_params: int, m: dict, lengths: np.ndarray, trained_fraction: float, side: str) -> dict:
    """FLOPs per non-padding token, nominal and executed (the module docstring gives the formulas)."""
    d, V = m["n_embd"], m["vocab_size"]
    attention = 6 * m["n_layer"] * d * float(np.mean(lengths * (lengths + 1.0))) / float(np.mean(lengths))
    output = 6 * V * d * (trained_fraction if side == "ours" else 1.0)
    return {"nominal": 6.0 * n_params, "executed": 6.0 * (n_params - V * d) + attention + output}


def matmul_peak(device: str) -> float:
    """FLOP/s of plain square matmuls, the best of 5 trials: fp32 on the CPU, bf16 on CUDA."""
    n, dtype = (1024, torch.float32) if device == "cpu" else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    reps = 5 if device == "cpu" else 50
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t))
    return best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux -> MiB


def run_ours(name: str) -> dict:
    from pipeline.common import setup_compute
    from pipeline.config import PackConfig, SftConfig, load_params
    from pipeline.model import Architecture, Transformer
    from pipeline.pack import pack
    from pipeline.train import accumulate_gradients, configure, make_optimizer, micro_batches

    m, block, batch, device = CONFIGS[name]
    ids, masks = conversations(4000, m["vocab_size"], block)
    arrays, _ = pack(ids, [np.where(k == 1, x, -100).astype(np.int32) for x, k in zip(ids, masks)],
                     PackConfig(block_size=block, overlong="drop", seed=0, weights={}))
    compute = setup_compute(device, "auto")
    # the project's SFT settings (params.yaml), with the benchmark's batch, lr and device
    cfg = dataclasses.replace(load_params("train", SftConfig), batch_size=batch, grad_accum=1, lr=1e-4,
                              device=device)
    shape = {k: v for k, v in m.items() if k != "family"}
    model = Transformer(Architecture(**shape, head_dim=m["n_embd"] // m["n_head"], max_seq_len=block,
                                     rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, init_std=0.02,
                                     qkv_bias=m.get("family") == "qwen2"))
    model.init_weights(0)
    model.to(compute.device)
    configure(model, cfg, compute)
    optimizer = make_optimizer(model, cfg, compute.device)
    batches = micro_batches(arrays, cfg, compute.device)
    tokens, t0 = 0, 0.0
    for step in range(WARMUP + STEPS):
        if step == WARMUP:
            sync(device)
            t0 = time.perf_counter()
        micro = [next(batches)]
        accumulate_gradients(model, micro, compute)
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= WARMUP:
            tokens += sum(b.n_tokens for b in micro)
    sync(device)
    return {"tokens_per_s": tokens / (time.perf_counter() - t0), "n_params": model.num_params(),
            "peak_mib": peak_memory(device)}


def run_trl(name: str) -> dict:
    import datasets
    import transformers
    from tokenizers import Tokenizer, models
    from trl import SFTConfig, SFTTrainer

    transformers.logging.set_verbosity_error()
    m, block, batch, device = CONFIGS[name]
    ids, masks = conversations(4000, m["vocab_size"], block)
    vocab = {f"t{i}": i for i in range(m["vocab_size"])}
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                               pad_token="t0", eos_token="t2", unk_token="t1")
    config = (transformers.Qwen2Config if m.get("family") == "qwen2" else transformers.LlamaConfig)(
        vocab_size=m["vocab_size"], hidden_size=m["n_embd"], intermediate_size=m["intermediate_size"],
        num_hidden_layers=m["n_layer"], num_attention_heads=m["n_head"], num_key_value_heads=m["n_kv_head"],
        max_position_embeddings=block, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
    attn = "sdpa"
    if device == "cuda":
        try:
            import flash_attn  # noqa: F401

            attn = "flash_attention_2"
        except ImportError:
            pass
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    data = datasets.Dataset.from_dict({"input_ids": [x.tolist() for x in ids],
                                       "completion_mask": [k.tolist() for k in masks]})
    times = []

    class Timer(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync(device)
            times.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            sync(device)
            times[-1] = time.perf_counter() - times[-1]

    args = SFTConfig(output_dir="/tmp/trl_bench", max_steps=WARMUP + STEPS, per_device_train_batch_size=batch,
                     packing=True, padding_free=True, max_length=block, completion_only_loss=True,
                     learning_rate=1e-4, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                     logging_steps=1000, bf16=device == "cuda", use_cpu=device == "cpu", dataloader_num_workers=0,
                     disable_tqdm=True, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, callbacks=[Timer()])
    lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
    tokens_per_step = np.mean(lengths) * batch  # packed rows are taken in (shuffled) full batches
    trainer.train()
    seconds = sum(times[WARMUP:])
    return {"tokens_per_s": tokens_per_step * STEPS / seconds, "n_params": model.num_parameters(),
            "peak_mib": peak_memory(device), "attn_implementation": attn}


def child(side: str, name: str) -> dict:
    cmd = [sys.executable, "-m", "bench.train_bench", "--child", side, "--configs", name]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ | {"TOKENIZERS_PARALLELISM": "false"})
    if out.returncode:
        raise SystemExit(f"{side} {name} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="", help="comma-separated: 1m, 10m (CPU), 124m (CUDA)")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = parser.parse_args()
    if a.child:
        print(json.dumps((run_ours if a.child == "ours" else run_trl)(a.configs)))
        return
    cuda = torch.cuda.is_available()
    names = a.configs.split(",") if a.configs else [n for n, c in CONFIGS.items() if (c[3] == "cuda") == cuda
                                                     and "family" not in c[0]]
    device = CONFIGS[names[0]][3]
    if device == "cuda" and not cuda:
        raise SystemExit("the 124m configuration needs a CUDA GPU")
    peaks = [matmul_peak(device)]  # measured again after every configuration: the best is the ceiling
    import transformers
    import trl

    print(f"device {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} ({os.cpu_count()} CPUs, "
          f"{torch.get_num_threads()} torch threads); torch {torch.__version__}, transformers "
          f"{transformers.__version__}, trl {trl.__version__}")
    results = {name: {side: child(side, name) for side in ("ours", "trl")} for name in names}
    peaks.append(matmul_peak(device))
    peak = max(peaks)
    print(f"matmul peak ({'bf16' if device == 'cuda' else 'fp32'}): {peak / 1e9:,.1f} GFLOP/s "
          f"(trials before and after: {', '.join(f'{p / 1e9:,.1f}' for p in peaks)})")
    print("| config | side | params | tokens/s | MFU nominal (6N) | MFU executed | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        m, block, _, _ = CONFIGS[name]
        ids, masks = conversations(4000, m["vocab_size"], block)
        lengths = np.array([len(x) for x in ids], dtype=np.float64)
        trained = sum(int(k.sum()) for k in masks) / lengths.sum()
        for side, r in rows.items():
            flops = flops_per_token(r["n_params"], m, lengths, trained, side)
            mfu = {k: r["tokens_per_s"] * f / peak for k, f in flops.items()}
            print(f"| {name} | {side} | {r['n_params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} | {mfu['nominal']:.1%} | "
                  f"{mfu['executed']:.1%} | {r['peak_mib']:,.0f} |")
        print(f"| {name} | ours / trl | | {rows['ours']['tokens_per_s'] / rows['trl']['tokens_per_s']:.2f}x | | | |")


if __name__ == "__main__":
    main()
