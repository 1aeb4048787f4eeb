"""Evaluation: masked loss on packed rows, and the judge-free generation metrics of SPEC §5."""
import dataclasses
import json
import math
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.chat import END, load_tokenizer, read_conversations, render_prompt
from pipeline.common import Compute, setup_compute, write_json
from pipeline.generate import generate
from pipeline.model import load_model
from pipeline.pack import load_packed, to_batch


@torch.no_grad()
def evaluate_loss(model, arrays: dict, batch_size: int, compute: Compute) -> float:
    """Mean cross-entropy per trained target over all rows (a sum over tokens, not a mean of batch means)."""
    model.eval()
    total, count = 0.0, 0
    n_rows = len(arrays["ids"])
    for start in range(0, n_rows, batch_size):
        ids, labels, pos, doc = to_batch(arrays, range(start, min(n_rows, start + batch_size)), compute.device)
        with compute.autocast():
            loss_sum, n = model(ids, labels, pos, doc)
        total += loss_sum.item()
        count += int(n)
    return total / max(1, count)


@dataclasses.dataclass
class EvaluateConfig:
    max_new_tokens: int = 200  # generation budget per answer
    batch_size: int = 64  # prompts decoded together
    limit: int = 0  # evaluate the first N held-out conversations; 0: all
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | bfloat16 | float32

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.limit < 0:
            raise ValueError("evaluate: need max_new_tokens >= 1, batch_size >= 1, limit >= 0")


def normalize(text: str) -> str:
    """SPEC §5: lowercase, keep [a-z0-9 ], drop a/an/the, collapse whitespace."""
    text = re.sub(r"[^a-z0-9\s]", "", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def distinct3(text: str) -> float:
    """Unique word trigrams / trigrams; 1.0 means no repetition loop (and for texts under 3 words)."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def score(output: str, gold: str, stopped: bool) -> dict:
    out, ref = normalize(output), normalize(gold)
    return {
        "exact_match": float(out == ref),
        # whole words: gold "5" is not found in "1250", nor "red" in "bred"
        "contains_answer": float(f" {ref} " in f" {out} ") if ref else 0.0,
        "stopped": float(stopped),
        "length_ok": float(len(output.split()) <= 3 * max(1, len(gold.split()))),
        "distinct3": distinct3(output),
    }


def answer(model, tok, prompts: list[list[dict]], cfg: EvaluateConfig, compute: Compute) -> list[tuple[str, bool]]:
    """Greedy answers to conversations (rendered up to <|assistant|>): (text, stopped at <|end|>)."""
    end = tok.token_to_id(END)
    encoded = [render_prompt(p, tok) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    results: list = [None] * len(encoded)
    for start in tqdm(range(0, len(order), cfg.batch_size), desc="generate", disable=not sys.stderr.isatty()):
        idx = order[start : start + cfg.batch_size]
        with compute.autocast():
            outs = generate(model, [encoded[i] for i in idx], cfg.max_new_tokens, stop_id=end)
        for i, out in zip(idx, outs):
            stopped = bool(out) and out[-1] == end
            results[i] = (tok.decode(out[:-1] if stopped else out).strip(), stopped)
    return results


def evaluate_model(model, tok, conversations: list[list[dict]], dev: dict, cfg: EvaluateConfig,
                   compute: Compute, name: str) -> tuple[dict, list[dict]]:
    """The SPEC §5 table for one model (rates with n, dev loss and perplexity) and per-example predictions."""
    model.to(compute.device)
    answers = answer(model, tok, [c[:-1] for c in conversations], cfg, compute)
    rows = []
    for conv, (text, stopped) in zip(conversations, answers):
        gold = conv[-1]["content"]
        rows.append({"model": name, "prompt": conv[-2]["content"], "gold": gold, "output": text}
                    | score(text, gold, stopped))
    metrics = {"n": len(rows)}
    for key in ("exact_match", "contains_answer", "stopped", "length_ok", "distinct3"):
        metrics[key] = sum(r[key] for r in rows) / max(1, len(rows))
    metrics["dev_loss"] = evaluate_loss(model, dev, cfg.batch_size, compute)
    metrics["dev_ppl"] = math.exp(min(50.0, metrics["dev_loss"]))
    return metrics, rows


def evaluate_pair(cfg: EvaluateConfig, models: dict[str, str], heldout: str, dev: str, metrics_path: str,
                  predictions_path: str) -> dict:
    """Run the same harness on each model folder (base first: the 'before' row) -> metrics.json grouped by
    model, and every prediction as JSONL."""
    conversations, _, _, _ = read_conversations(heldout, on_error="fail")
    if cfg.limit:
        conversations = conversations[: cfg.limit]
    compute = setup_compute(cfg.device, cfg.dtype)
    dev_data = load_packed(dev)
    metrics, predictions = {}, []
    for name, folder in models.items():
        model, tok = load_model(folder), load_tokenizer(folder)
        metrics[name], rows = evaluate_model(model, tok, conversations, dev_data, cfg, compute, name)
        predictions += rows
        print(f"evaluate {name}: {metrics[name]}")
    write_json(metrics_path, metrics)
    Path(predictions_path).parent.mkdir(parents=True, exist_ok=True)
    with open(predictions_path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in predictions)
    return metrics
