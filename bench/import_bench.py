"""Importing a Hub-style model folder: this project's loader against transformers' from_pretrained, in one run.

    python -m bench.import_bench                         # a Qwen2.5-0.5B-shaped model (494M parameters)
    python -m bench.import_bench --layers 4              # a smaller one, for a quick look

The folder is built here, as the Hub ships models: a qwen2 model with random weights, saved by transformers in
bf16 as safetensors shards of at most 200 MB with an index. Each side then loads it into fp32 (the precision both
train in) in a child process of its own: `pipeline.hf.load_model` (shard by shard, one tensor converted at a time,
the model built on the meta device) and `transformers.AutoModelForCausalLM.from_pretrained(folder,
dtype=torch.float32)`. Reported: wall time of the load, and the child's peak resident memory (libraries
included), with the fp32 weights' own size for scale. Both are checked to give the same logits."""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                  rope_theta=1000000.0, rms_norm_eps=1e-6)


def build(folder: Path, layers: int) -> int:
    import torch
    import transformers

    config = transformers.Qwen2Config(**(QWEN25_05B | {"num_hidden_layers": layers}))
    with torch.device("cpu"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="200MB")
    return model.num_parameters()


def child(side: str, folder: str) -> None:
    import torch

    t0 = time.perf_counter()
    if side == "ours":
        from pipeline.hf import load_model

        model = load_model(folder).eval()
        seconds = time.perf_counter() - t0
        logits = lambda ids: model(ids)  # noqa: E731
    else:
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        seconds = time.perf_counter() - t0
        logits = lambda ids: model(ids).logits  # noqa: E731
    with torch.no_grad():
        out = logits(torch.arange(8, 40)[None])[0, -1, :8].tolist()
    print(json.dumps({"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "params": sum(p.numel() for p in model.parameters()), "logits": out}))


def run(side: str, folder: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.import_bench", "--child", side, folder], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=QWEN25_05B["num_hidden_layers"])
    ap.add_argument("--repeat", type=int, default=2, help="loads per side, alternating; the fastest is reported")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(*a.child)
        return
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        n = build(Path(tmp), a.layers)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        print(f"torch {torch.__version__}, transformers {transformers.__version__}; qwen2, {a.layers} layers, "
              f"{n / 1e6:,.0f}M parameters, {len(list(Path(tmp).glob('*.safetensors')))} bf16 shards, "
              f"{size / 2**20:,.0f} MiB on disk; fp32 weights {4 * n / 2**20:,.0f} MiB")
        results: dict[str, list[dict]] = {"ours": [], "transformers": []}
        for _ in range(a.repeat):
            for side in results:
                results[side].append(run(side, tmp))
    ours, theirs = (min(results[s], key=lambda r: r["seconds"]) for s in results)
    same = max(abs(x - y) for x, y in zip(ours["logits"], theirs["logits"]))
    print("| side | load s | peak RSS MiB |\n|---|---|---|")
    for side in results:
        best = min(results[side], key=lambda r: r["seconds"])
        print(f"| {side} | {best['seconds']:.2f} | {max(r['peak_mib'] for r in results[side]):,.0f} |")
    print(f"ours / transformers load time: {ours['seconds'] / theirs['seconds']:.2f}x; "
          f"largest logit difference {same:.2e}")


if __name__ == "__main__":
    main()
