"""Generation speed: our batched greedy decoding (pipeline.generate) against transformers' `generate` on the same
exported model folder, the same prompts and batches, in one run. Tokens/s counts the new tokens each row keeps
(up to and including <|end|>), the same count for both. Usage:

    python bench/generate_bench.py MODEL_DIR HELDOUT.jsonl [--n 256] [--batch-size 64] [--max-new-tokens 200]
                                   [--device cpu|cuda] [--threads N] [--compile] [--repeat N]
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project root

from pipeline.data import read_conversations  # noqa: E402
from pipeline.generate import generate  # noqa: E402
from pipeline.hf import load_model  # noqa: E402
from pipeline.template import layout, render_prompt  # noqa: E402
from pipeline.tokenizer import load_tokenizer  # noqa: E402


def cut(row: list[int], end: int) -> list[int]:
    return row[: row.index(end) + 1] if end in row else row


def ours(model, batches, max_new_tokens, end, compile=False) -> list[list[int]]:
    return [out for batch in batches for out in generate(model, batch, max_new_tokens, end, compile=compile)]


def theirs(hf, batches, max_new_tokens, end, pad) -> list[list[int]]:
    outs = []
    for batch in batches:
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=hf.device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=hf.device)
        with torch.no_grad():
            seq = hf.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                              do_sample=False, eos_token_id=end, pad_token_id=pad)
        outs += [cut(row, end) for row in seq[:, width:].tolist()]
    return outs


def timed(fn, device) -> tuple[list, float]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("heldout")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=200)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    ap.add_argument("--repeat", type=int, default=1,
                    help="time ours and theirs N times, alternating, and keep each one's fastest (a shared machine)")
    ap.add_argument("--compile", action="store_true",
                    help="ours with torch.compile'd decoding steps (compiled in the untimed warm-up)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tok = load_tokenizer(args.model)
    end, pad = layout(tok).end, layout(tok).pad  # the chat format's end of turn and padding
    conversations = read_conversations(args.heldout)[: args.n]
    prompts = [render_prompt(c[:-1], tok) for c in conversations]
    # the same batches for both: sorted by length, as the evaluate stage does
    prompts.sort(key=len)
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    model = load_model(args.model, device).eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).to(device).eval()
    t_warm = time.perf_counter()
    ours(model, batches[:1], 8, end, args.compile), theirs(hf, batches[:1], 8, end, pad)  # warm-up
    if args.compile:  # a batch of one is a graph of its own (the last rows of a batch can be one)
        ours(model, [batches[0][:1]], 8, end, True)
    t_warm_up = time.perf_counter() - t_warm
    t_ours = t_hf = float("inf")
    for _ in range(args.repeat):  # alternating, so a burst of load elsewhere hits both sides alike
        a, t = timed(lambda: ours(model, batches, args.max_new_tokens, end, args.compile), device)
        b, t_b = timed(lambda: theirs(hf, batches, args.max_new_tokens, end, pad), device)
        t_ours, t_hf = min(t_ours, t), min(t_hf, t_b)
    n_a, n_b = sum(map(len, a)), sum(map(len, b))
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "prompts": len(prompts), "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens,
        "compile": args.compile, "warm_up_s": round(t_warm_up, 1), "repeat": args.repeat,
        "ours_tokens": n_a, "ours_s": round(t_ours, 2), "ours_tok_s": round(n_a / t_ours, 1),
        "hf_tokens": n_b, "hf_s": round(t_hf, 2), "hf_tok_s": round(n_b / t_hf, 1),
        "speedup": round((n_a / t_ours) / (n_b / t_hf), 2), "identical_outputs": round(same, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
