"""Evaluation: masked loss on packed rows, the judge-free generation metrics of SPEC §5 with bootstrap intervals,
a multiple-choice (letter logits) evaluation, per-example predictions (parquet), and a paired base-vs-SFT
comparison. Pictures and the Markdown report are in pipeline/report.py."""
import dataclasses
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from pipeline.chat import layout, load_tokenizer, read_conversations, render_prompt
from pipeline.common import Compute, setup_compute, write_json
from pipeline.generate import generate
from pipeline.model import Transformer, load_model
from pipeline.pack import load_packed, to_batch

RATES = ("exact_match", "contains_answer", "stopped", "length_ok", "distinct3")  # per-example scores, averaged


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
class DuringTrainConfig:
    prompts: int = 32  # dev conversations answered at every train.eval_every (generation metrics logged)
    max_new_tokens: int = 32  # generation budget per answer during training
    samples: int = 4  # of those, the first N answers are written as samples (samples.jsonl, samples.md)

    def __post_init__(self):
        if self.prompts < 0 or self.max_new_tokens < 1 or not 0 <= self.samples <= self.prompts:
            raise ValueError("evaluate.during_train: need prompts >= 0, max_new_tokens >= 1, 0 <= samples <= prompts")


@dataclasses.dataclass
class EvaluateConfig:
    mc: str = "data/synth/mc.jsonl"  # multiple-choice conversations (options `a) ...` in the user turn, gold letter)
    max_new_tokens: int = 200  # generation budget per answer
    batch_size: int = 64  # prompts decoded together
    limit: int = 0  # evaluate the first N held-out conversations (and N multiple-choice questions); 0: all
    n_boot: int = 1000  # bootstrap resamples for the 95% intervals
    seed: int = 0  # bootstrap seed
    n_report: int = 8  # held-out prompts shown side by side (base, sft) in the Markdown report
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | bfloat16 | float32
    during_train: DuringTrainConfig = dataclasses.field(default_factory=DuringTrainConfig)  # used by train

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.limit < 0:
            raise ValueError("evaluate: need max_new_tokens >= 1, batch_size >= 1, limit >= 0")
        if self.n_boot < 100 or self.n_report < 0:
            raise ValueError("evaluate: need n_boot >= 100 and n_report >= 0")


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


# ---- uncertainty ------------------------------------------------------------------------------------------
def bootstrap_ci(values, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of per-example values (resampling examples)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def summarize(rows: list[dict], keys, n_boot: int, seed: int, prefix: str = "") -> dict:
    """{prefix}n and, per key, the mean with its bootstrap interval: key, key_lo, key_hi."""
    out = {f"{prefix}n": len(rows)}
    for key in keys:
        values = [r[key] for r in rows]
        out[key] = float(np.mean(values)) if values else math.nan
        out[f"{key}_lo"], out[f"{key}_hi"] = bootstrap_ci(values, n_boot, seed)
    return out


def paired(a: list[dict], b: list[dict], keys, n_boot: int, seed: int, prefix: str = "") -> dict:
    """b minus a on the same examples (same order): the mean difference per key, a paired bootstrap interval
    (examples resampled together, so per-example correlation narrows it), and wins/losses counts."""
    assert len(a) == len(b), "paired comparison needs the same examples for both models"
    diffs = [{k: rb[k] - ra[k] for k in keys} for ra, rb in zip(a, b)]
    out = summarize(diffs, keys, n_boot, seed, prefix)
    for key in keys:
        out[f"{key}_wins"] = sum(d[key] > 0 for d in diffs)
        out[f"{key}_losses"] = sum(d[key] < 0 for d in diffs)
    return out


# ---- generation -------------------------------------------------------------------------------------------
def answer(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
           compute: Compute) -> list[tuple[str, bool]]:
    """Greedy answers to conversations (rendered up to the assistant header): (text, stopped at the end token)."""
    return answer_ids(model, tok, [render_prompt(p, tok) for p in prompts], max_new_tokens, batch_size, compute)


def answer_ids(model, tok, encoded: list[list[int]], max_new_tokens: int, batch_size: int,
               compute: Compute) -> list[tuple[str, bool]]:
    end = layout(tok).end
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    results: list = [None] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not sys.stderr.isatty()):
        idx = order[start : start + batch_size]
        with compute.autocast():
            outs = generate(model, [encoded[i] for i in idx], max_new_tokens, stop_id=end)
        for i, out in zip(idx, outs):
            stopped = bool(out) and out[-1] == end
            results[i] = (tok.decode(out[:-1] if stopped else out).strip(), stopped)
    return results


def generation_rows(model, tok, conversations: list[list[dict]], cfg: EvaluateConfig, compute: Compute,
                    name: str) -> list[dict]:
    """One prediction row per held-out conversation: the last assistant turn is the gold answer."""
    answers = answer(model, tok, [c[:-1] for c in conversations], cfg.max_new_tokens, cfg.batch_size, compute)
    rows = []
    for i, (conv, (text, stopped)) in enumerate(zip(conversations, answers)):
        gold = conv[-1]["content"]
        rows.append({"example": i, "model": name, "context": json.dumps(conv[:-2]), "prompt": conv[-2]["content"],
                     "gold": gold, "output": text} | score(text, gold, stopped))
    return rows


# ---- multiple choice --------------------------------------------------------------------------------------
OPTION = re.compile(r"^\s*([A-Za-z])\)\s", re.MULTILINE)


def option_letters(question: str) -> list[str]:
    """The option labels of a multiple-choice question: lines that start with `x) `."""
    return OPTION.findall(question)


@torch.no_grad()
def continuation_logprobs(model, pairs: list[tuple[list[int], list[int]]], compute: Compute) -> list[float]:
    """log P(continuation | prompt), summed over its tokens, for each (prompt ids, continuation ids)."""
    seqs = [p + c for p, c in pairs]
    width = max(map(len, seqs))
    # right padding: causal attention means pads after a sequence cannot change its scores
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=compute.device)
    with compute.autocast():
        logprobs = model(ids).float().log_softmax(-1)  # (B, T, V)
    out = []
    for row, (p, c) in enumerate(pairs):
        at = torch.arange(len(p) - 1, len(p) - 1 + len(c), device=compute.device)  # position t predicts t + 1
        out.append(float(logprobs[row, at, torch.tensor(c, device=compute.device)].sum()))
    return out


def mc_rows(model, tok, conversations: list[list[dict]], batch_size: int, compute: Compute, name: str) -> list[dict]:
    """SPEC §5 categorical evaluation: at the answer position (the assistant header that ends the prompt) only the
    option letters are compared, and the most likely one is the choice; correct when it is the gold letter.
    A letter is scored by its log-probability as the model would write it (content has a prefix space): with
    single-token letters that is the letter's logit minus a constant shared by all letters, so the argmax is the
    argmax of the letter logits; a letter split into several tokens is scored by their summed log-probability."""
    model.eval()
    rows, pairs, spans = [], [], []
    for i, conv in enumerate(conversations):
        letters, gold = option_letters(conv[-2]["content"]), conv[-1]["content"].strip()
        if gold not in letters:
            raise ValueError(f"multiple-choice question {i}: gold {gold!r} is not one of its options {letters}")
        prompt = render_prompt(conv[:-1], tok)
        spans.append((len(pairs), letters, gold))
        pairs += [(prompt, tok.encode(x, add_special_tokens=False).ids) for x in letters]
    scores: list[float] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="multiple choice", disable=not sys.stderr.isatty()):
        scores += continuation_logprobs(model, pairs[start : start + batch_size], compute)
    for i, (first, letters, gold) in enumerate(spans):
        mine = scores[first : first + len(letters)]
        choice = letters[int(np.argmax(mine))]
        rows.append({"example": i, "model": name, "prompt": conversations[i][-2]["content"], "gold": gold,
                     "choice": choice, "letter_logprobs": json.dumps(dict(zip(letters, np.round(mine, 4).tolist()))),
                     "mc_accuracy": float(choice == gold)})
    return rows


# ---- during training --------------------------------------------------------------------------------------
def dev_prompts(arrays: dict, tok, n: int) -> list[tuple[list[int], str]]:
    """The first n conversations of packed rows as (prompt ids up to the last assistant header, gold answer text):
    the packed dev split is all the training stage has, and it holds the rendered conversations whole."""
    lay = layout(tok)
    header = lay.header_ids("assistant")
    out = []
    for ids, doc in zip(arrays["ids"], arrays["doc"]):
        for d in dict.fromkeys(doc[doc >= 0].tolist()):
            seg = ids[doc == d]
            starts = lay.starts(seg, "assistant")
            if not len(starts) or seg[starts[-1] : starts[-1] + len(header)].tolist() != header:
                continue  # no assistant turn, or its header merged with its text (the prompt would differ)
            at = int(starts[-1]) + len(header)
            gold = seg[at:].tolist()
            gold = gold[: gold.index(lay.end)] if lay.end in gold else gold
            out.append((seg[:at].tolist(), tok.decode(gold).strip()))
            if len(out) == n:
                return out
    return out


def make_train_evaluator(tok, dev: dict, cfg: DuringTrainConfig, compute: Compute,
                         samples_dir: str | None) -> Callable[[Transformer], dict[str, float]] | None:
    """evaluator(model) for train(): greedy answers to a few dev prompts -> gen_* rates, and the first
    cfg.samples answers appended (with the evaluation count) to samples.jsonl and samples.md in samples_dir."""
    if samples_dir:  # the files exist (empty) even when nothing is sampled: they are outputs of the train stage
        Path(samples_dir).mkdir(parents=True, exist_ok=True)
        for name in ("samples.jsonl", "samples.md"):
            (Path(samples_dir) / name).write_text("")
    examples = dev_prompts(dev, tok, cfg.prompts)
    if not examples:
        return None
    calls = 0

    def evaluator(model: Transformer) -> dict[str, float]:
        nonlocal calls
        answers = answer_ids(model, tok, [p for p, _ in examples], cfg.max_new_tokens, len(examples), compute)
        rows = [score(text, gold, stopped) for (text, stopped), (_, gold) in zip(answers, examples)]
        if samples_dir and cfg.samples:
            write_samples(samples_dir, calls, tok, examples[: cfg.samples], answers)
        calls += 1
        return {f"gen_{k}": float(np.mean([r[k] for r in rows])) for k in RATES}

    return evaluator


def write_samples(folder: str, call: int, tok, examples, answers) -> None:
    path = Path(folder)
    with open(path / "samples.jsonl", "a", encoding="utf-8") as jl, open(path / "samples.md", "a") as md:
        if call == 0:
            md.write("# Answers to fixed dev prompts during training\n")
        md.write(f"\n## evaluation {call}\n\n")
        for (prompt, gold), (text, stopped) in zip(examples, answers):
            prompt_text = tok.decode(prompt, skip_special_tokens=False)
            jl.write(json.dumps({"eval": call, "prompt": prompt_text, "gold": gold, "output": text,
                                 "stopped": stopped}, ensure_ascii=False) + "\n")
            shown = prompt_text[-120:].replace("\n", " ⏎ ")  # one Markdown line per sample
            md.write(f"- `…{shown}` → **{text[:200]}** (gold: {gold}{'' if stopped else ', no stop'})\n")


# ---- the stage --------------------------------------------------------------------------------------------
def write_parquet(path: str, rows: list[dict]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp")
    pq.write_table(pa.Table.from_pylist(rows), tmp)
    tmp.replace(path)


def evaluate_pair(cfg: EvaluateConfig, models: dict[str, str], heldout: str, mc: str, dev: str, metrics_path: str,
                  predictions_dir: str) -> dict:
    """Run the same harness on each model folder (base first: the 'before' row) -> metrics.json grouped by
    model (every rate with n and a bootstrap 95% interval), a paired comparison of the second model against
    the first, and every prediction in predictions_dir/{generation,mc}.parquet."""
    conversations = read_conversations(heldout, on_error="fail")[0]
    questions = read_conversations(mc, on_error="fail")[0]
    if cfg.limit:
        conversations, questions = conversations[: cfg.limit], questions[: cfg.limit]
    compute = setup_compute(cfg.device, cfg.dtype)
    dev_data = load_packed(dev)
    metrics, gen, choice = {}, {}, {}
    for name, folder in models.items():
        model, tok = load_model(folder).to(compute.device), load_tokenizer(folder)
        gen[name] = generation_rows(model, tok, conversations, cfg, compute, name)
        choice[name] = mc_rows(model, tok, questions, cfg.batch_size, compute, name)
        metrics[name] = summarize(gen[name], RATES, cfg.n_boot, cfg.seed)
        metrics[name] |= summarize(choice[name], ["mc_accuracy"], cfg.n_boot, cfg.seed, prefix="mc_")
        metrics[name]["dev_loss"] = evaluate_loss(model, dev_data, cfg.batch_size, compute)
        metrics[name]["dev_ppl"] = math.exp(min(50.0, metrics[name]["dev_loss"]))
        print(f"evaluate {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[name].items()))
    if len(models) == 2:
        a, b = models
        key = f"{b}_minus_{a}"
        metrics[key] = paired(gen[a], gen[b], RATES, cfg.n_boot, cfg.seed)
        metrics[key] |= paired(choice[a], choice[b], ["mc_accuracy"], cfg.n_boot, cfg.seed, prefix="mc_")
    write_json(metrics_path, metrics)
    write_parquet(f"{predictions_dir}/generation.parquet", [r for rows in gen.values() for r in rows])
    write_parquet(f"{predictions_dir}/mc.parquet", [r for rows in choice.values() for r in rows])
    return metrics
