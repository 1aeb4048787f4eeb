"""Data benchmark: render + pack N synthetic conversations (default a million), against
  - the raw `Tokenizer.encode_batch` throughput on the same turn texts (the ceiling for rendering; target >= 0.7x),
  - TRL's dataset preparation with packing (SFTTrainer: load, chat template, tokenize, BFD pack; target >= 3x),
plus packing utilisation against the ideal and peak memory (max RSS) of each phase.

    .venv/bin/python -m bench.data_bench --n 1000000            # everything, one run (~10-20 min on 2 cores)
    .venv/bin/python -m bench.data_bench --n 20000 --skip-trl   # a quick look

Each phase runs in its own process so its peak memory is its own. Data, tokenizer and outputs go to bench/.work/."""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORK = Path(__file__).resolve().parent / ".work"
WORDS = ("the river town mayor founded north south bridge market winter summer stone old new green hill valley "
         "road people harbour bell tower mill field orchard lake forest keeper council year school").split()


def peak_mib() -> float:
    """Max RSS of this process or of any worker it waited for (TRL's dataset_num_proc workers), MiB."""
    return max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024


def generate(n: int, path: Path, seed: int = 0) -> None:
    """n conversations in the messages form: optional system, 1-3 exchanges, short and long answers."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w") as f:
        for _ in range(n):
            msgs = []
            if rng.random() < 0.3:
                msgs.append({"role": "system", "content": "Answer briefly and precisely."})
            for _ in range(int(rng.integers(1, 4))):
                q = " ".join(words[rng.integers(0, len(words), rng.integers(5, 20))]) + "?"
                a = " ".join(words[rng.integers(0, len(words), rng.integers(2, 40))]) + "."
                msgs += [{"role": "user", "content": q.capitalize()}, {"role": "assistant", "content": a.capitalize()}]
            f.write(json.dumps({"messages": msgs}) + "\n")


def phase_tokenizer(data: Path) -> dict:
    from pipeline.tokenizer import save_tokenizer, train_tokenizer

    with open(data) as f:
        texts = [m["content"] for _, line in zip(range(20000), f) for m in json.loads(line)["messages"]]
    save_tokenizer(train_tokenizer(texts, 2048), str(WORK / "tok"))
    return {}


def phase_encode_batch(data: Path, batch: int) -> dict:
    """The ceiling: encode_batch on every turn text the renderer tokenizes, texts already in memory; and
    encode_batch_fast (no character offsets), which is what the renderer calls."""
    from tokenizers import Tokenizer

    with open(data) as f:
        texts = [m["content"] for line in f for m in json.loads(line)["messages"]]
    tok = Tokenizer.from_file(str(WORK / "tok" / "tokenizer.json"))
    out = {"texts": len(texts)}
    for name in ("encode_batch", "encode_batch_fast"):
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(texts), batch):
            tokens += sum(len(e.ids) for e in getattr(tok, name)(texts[i:i + batch], add_special_tokens=False))
        out[name] = {"seconds": time.perf_counter() - t0, "tokens": tokens}
    return out


def phase_render(data: Path, batch: int) -> dict:
    from pipeline.config import RenderConfig
    from pipeline.render import render_split
    from pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(str(WORK / "tok"))
    t0 = time.perf_counter()
    cfg = RenderConfig(on_error="fail", train_on="all_assistant", batch_size=batch, unpaired="drop")
    report = render_split(str(data), tok, cfg, str(WORK / "rendered.parquet"))
    return {"seconds": time.perf_counter() - t0, "rows": report["rows_kept"], "tokens": report["tokens"],
            "trained_fraction": report["trained_fraction"],
            "assistant_end_trained_fraction": report["assistant_end_trained_fraction"]}


def phase_pack(block: int) -> dict:
    from pipeline.config import PackConfig
    from pipeline.pack import pack_rendered, read_index, weighted_order

    t0 = time.perf_counter()
    cfg, path = PackConfig(block_size=block, overlong="drop", seed=0, weights={}), str(WORK / "rendered.parquet")
    index = read_index(path, cfg)
    order = weighted_order(index.sources, {}, 0)
    report = pack_rendered(path, index, order, cfg, str(WORK / "packed"))
    kept = index.lengths[index.lengths <= block]
    return {"seconds": time.perf_counter() - t0, "rows": report["rows"], "utilisation": report["utilisation"],
            "ideal_utilisation": report["ideal_utilisation"],
            "ideal_rows": int(-(-kept.sum() // block)), "dropped_overlong": report["dropped_overlong"]}


def phase_trl(data: Path, block: int, procs: int) -> dict:
    """TRL's own preparation: SFTTrainer(train_dataset=messages, packing=True) loads, applies the chat template,
    tokenizes and packs (BFD) in its constructor. The same tokenizer and chat template; a tiny model."""
    import shutil
    import tempfile

    cache = tempfile.mkdtemp(prefix="hf_cache_", dir=WORK)  # fresh: a cached Arrow copy would make TRL look free
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets

    datasets.disable_caching()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(str(WORK / "tok"))
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    args = SFTConfig(output_dir=str(WORK / "trl_out"), packing=True, max_length=block, dataset_num_proc=procs,
                     report_to=[], eos_token="<|end|>", pad_token="<|pad|>", use_cpu=True, bf16=False)
    t0 = time.perf_counter()
    ds = datasets.load_dataset("json", data_files=str(data), split="train", keep_in_memory=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    seconds = time.perf_counter() - t0
    packed = trainer.train_dataset
    lengths = np.fromiter((len(x) for x in packed["input_ids"]), np.int64, len(packed))
    out = {"seconds": seconds, "rows": len(packed), "tokens": int(lengths.sum()),
           "utilisation": float(lengths.sum() / (len(packed) * block))}
    shutil.rmtree(cache, ignore_errors=True)
    return out


def run_phase(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.data_bench", "--phase", *args], capture_output=True,
                          text=True, cwd=Path(__file__).resolve().parents[1])
    if proc.returncode:
        raise SystemExit(f"phase {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--block", type=int, default=512)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--procs", type=int, default=2, help="dataset_num_proc for TRL")
    p.add_argument("--skip-trl", action="store_true")
    p.add_argument("--phase", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args()
    data = WORK / f"conversations_{a.n}.jsonl"
    if a.phase:
        name = a.phase[0]
        out = {"tokenizer": lambda: phase_tokenizer(data), "encode_batch": lambda: phase_encode_batch(data, a.batch),
               "render": lambda: phase_render(data, a.batch), "pack": lambda: phase_pack(a.block),
               "trl": lambda: phase_trl(data, a.block, a.procs)}[name]()
        out["peak_mib"] = peak_mib()
        print(json.dumps(out))
        return
    WORK.mkdir(exist_ok=True)
    (WORK / ".gitignore").write_text("*\n")  # generated data and outputs stay out of git
    if not data.exists():
        t0 = time.perf_counter()
        generate(a.n, data)
        print(f"generated {a.n} conversations in {time.perf_counter() - t0:.0f} s: {data}", flush=True)
    common = ["--n", str(a.n), "--block", str(a.block), "--batch", str(a.batch), "--procs", str(a.procs)]
    results = {"n": a.n, "block_size": a.block, "cpus": os.cpu_count()}
    for name in ("tokenizer", "encode_batch", "render", "pack") + (() if a.skip_trl else ("trl",)):
        results[name] = run_phase([name, *common])
        print(f"{name}: {results[name]}", flush=True)
    enc, ren, pk = results["encode_batch"], results["render"], results["pack"]
    for name in ("encode_batch", "encode_batch_fast"):  # the same turn texts: throughput ratio = time ratio
        results[f"render_vs_{name}"] = enc[name]["seconds"] / ren["seconds"]
    ours = ren["seconds"] + pk["seconds"]
    results["ours_render_pack_seconds"] = ours
    results["ours_conversations_per_s"] = a.n / ours
    if "trl" in results:
        results["speedup_vs_trl"] = results["trl"]["seconds"] / ours
    (WORK / f"results_{a.n}.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
