"""Evaluation with a model: the masked dev loss, greedy answers to held-out conversations scored judge-free
(pipeline/metrics.py) within a budget fixed or sized from each gold answer, the loss of each gold answer, multiple
choice from the option letters' scores, the generation check during training, and the evaluate stage's base-vs-SFT
run (metrics.json, per-example predictions as parquet)."""
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
from tokenizers import Tokenizer
from tqdm import tqdm

from pipeline.common import IGNORE_INDEX, Compute, UserError, atomic_file, setup_compute, write_json
from pipeline.config import DuringTrainConfig, EvaluateConfig
from pipeline.data import read_conversations
from pipeline.generate import generate
from pipeline.backend import load_model
from pipeline.judge import MAX_CHARS, summarize_verdicts, verdicts
from pipeline.metrics import RATES, answer_kind, long_scores, paired, score, scores_for, summarize
from pipeline.model import Transformer
from pipeline.pack import load_packed
from pipeline.template import layout, render, render_prompt
from pipeline.tokenizer import load_tokenizer
from pipeline.train import evaluate_loss


# ---- generation -------------------------------------------------------------------------------------------
def answer(model, tok, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
           compute: Compute) -> list[tuple[str, bool]]:
    """Greedy answers to conversations (rendered up to the assistant header): (text, stopped at the end token)."""
    return answer_ids(model, tok, [render_prompt(p, tok) for p in prompts], max_new_tokens, batch_size, compute)


def answer_ids(model, tok, encoded: list[list[int]], max_new_tokens: int | list[int], batch_size: int,
               compute: Compute) -> list[tuple[str, bool]]:
    """max_new_tokens: one budget for all, or one per prompt (a batch decodes to its largest; each answer is then
    cut to its own budget, and stopped only when its end token came within it: greedy rows do not depend on the
    batch)."""
    ends = layout(tok).ends  # every id that ends an answer
    budget = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: (budget[i], len(encoded[i])))  # alike budgets, lengths
    results: list = [None] * len(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not sys.stderr.isatty()):
        idx = order[start : start + batch_size]
        with compute.autocast():
            outs = generate(model, [encoded[i] for i in idx], max(budget[i] for i in idx), stop_id=ends)
        for i, out in zip(idx, outs):
            out = out[: budget[i]]
            stopped = bool(out) and out[-1] in ends
            results[i] = (tok.decode(out[:-1] if stopped else out).strip(), stopped)
    return results


def gold_spans(tok, conversations: list[list[dict]]) -> list[tuple[list[int], int, int]]:
    """Each held-out conversation rendered whole: (ids, start, end) of its last answer, the gold answer with its
    end token, as the model would be trained to write it."""
    out = []
    for conv in conversations:
        ids, mask = render(conv, tok)
        out.append((ids, *last_answer(ids, mask)))
    return out


def budgets(spans: list[tuple[list[int], int, int]], cfg: EvaluateConfig) -> int | list[int]:
    """The generation budget: evaluate.max_new_tokens, or under `auto` per example budget.factor x its gold
    answer's tokens (end token included), within [budget.floor, budget.cap]."""
    if cfg.max_new_tokens != "auto":
        return cfg.max_new_tokens
    b = cfg.budget
    return [min(b.cap, max(b.floor, math.ceil(b.factor * (end - start)))) for _, start, end in spans]


@torch.no_grad()
def answer_losses(model, spans: list[tuple[list[int], int, int]], compute: Compute) -> list[float]:
    """The mean loss (nats per token) of each gold answer with its end token, given the conversation before it: the
    masked loss training minimises, on held-out answers. A conversation longer than the model's context keeps its
    last tokens; an answer longer than that is scored on the part that fits."""
    model.eval()
    limit, out = model.arch.max_seq_len, []
    for ids, start, end in tqdm(spans, desc="answer loss", disable=not sys.stderr.isatty()):
        if end <= start:
            out.append(math.nan)
            continue
        first = max(0, end - limit)  # the window ids[first:end]; position t predicts t + 1
        x = torch.tensor([ids[first:end]], device=compute.device)
        with compute.autocast():
            logits = model(x)[0].float()
        targets = torch.arange(max(start, first + 1), end, device=compute.device)
        nll = torch.nn.functional.cross_entropy(logits[targets - first - 1], x[0, targets - first])
        out.append(float(nll))
    return out


def generation_rows(model, tok, conversations: list[list[dict]], cfg: EvaluateConfig, compute: Compute,
                    name: str, kind: str = "short") -> list[dict]:
    """One prediction row per held-out conversation: the last assistant turn is the gold answer. Every row has the
    scores of both answer kinds (long ones only for long answers: they take time), its budget and the gold
    answer's loss."""
    spans = gold_spans(tok, conversations)
    budget = budgets(spans, cfg)
    answers = answer(model, tok, [c[:-1] for c in conversations], budget, cfg.batch_size, compute)
    losses = answer_losses(model, spans, compute)
    rows = []
    for i, (conv, (text, stopped)) in enumerate(zip(conversations, answers)):
        gold = conv[-1]["content"]
        rows.append({"example": i, "model": name, "context": json.dumps(conv[:-2]), "prompt": conv[-2]["content"],
                     "gold": gold, "output": text, "budget": budget[i] if isinstance(budget, list) else budget,
                     "answer_loss": losses[i]} | score(text, gold, stopped)
                    | (long_scores(text, gold) if kind == "long" else {}))
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


def written_answer(messages: list[dict], text: str, tok: Tokenizer) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the prompt for the next assistant turn after `messages`, and the ids the renderer
    gives that turn's content `text` (its end token left out): what the model was trained to write there. In the
    markers format content is encoded with a prefix space (" b"); in ChatML it follows "assistant\n" ("b")."""
    prompt = render_prompt(messages, tok)
    ids, mask = render(messages + [{"role": "assistant", "content": text}], tok)
    a, b = last_answer(ids, mask)
    assert ids[:a] == prompt, f"the assistant header merged with {text!r}: no answer ids of its own"
    return prompt, [t for t in ids[a:b] if t not in layout(tok).ends]


def mc_rows(model, tok, conversations: list[list[dict]], batch_size: int, compute: Compute, name: str) -> list[dict]:
    """SPEC §5 categorical evaluation: at the answer position (the assistant header that ends the prompt) only the
    option letters are compared, and the most likely one is the choice; correct when it is the gold letter.
    A letter is scored by its log-probability as the model would write it (`written_answer`): with single-token
    letters that is the letter's logit minus a constant shared by all letters, so the argmax is the argmax of the
    letter logits; a letter split into several tokens is scored by their summed log-probability."""
    model.eval()
    rows, pairs, spans = [], [], []
    for i, conv in enumerate(conversations):
        letters, gold = option_letters(conv[-2]["content"]), conv[-1]["content"].strip()
        if gold not in letters:
            raise UserError(f"multiple-choice question {i + 1}: gold {gold!r} is not one of its options {letters}; "
                            "fix the question file (evaluate.mc)")
        spans.append((len(pairs), letters, gold))
        pairs += [written_answer(conv[:-1], x, tok) for x in letters]
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


# ---- the judge --------------------------------------------------------------------------------------------
def model_judge(folder: str, prompt: str, compute: Compute, batch_size: int
                ) -> Callable[[list[tuple[str, str, str]]], list[str]]:
    """prefer() backed by the model in `folder`: the judging prompt filled in as a user turn, then the log-probability
    of "A" and of "B" as the model would write them as its answer; the higher wins, equal scores tie."""
    try:
        model, tok = load_model(folder).to(compute.device).eval(), load_tokenizer(folder)
    except Exception as e:  # any reason the folder is not a model: one line naming the param
        raise UserError(f"evaluate.judge.model={folder!r} cannot be loaded as a judge: {e}") from e
    limit = model.arch.max_seq_len

    def prefer(triples: list[tuple[str, str, str]]) -> list[str]:
        pairs = []
        for question, a, b in triples:
            text = prompt.format(question=question, answer_a=a[:MAX_CHARS], answer_b=b[:MAX_CHARS])
            messages = [{"role": "user", "content": text}]
            for letter in ("A", "B"):
                context, answer = written_answer(messages, letter, tok)
                pairs.append((context[-(limit - len(answer)) :], answer))  # the instruction is at the end
        scores: list[float] = []
        for start in range(0, len(pairs), batch_size):
            scores += continuation_logprobs(model, pairs[start : start + batch_size], compute)
        return ["A" if a > b else "B" if b > a else "tie" for a, b in zip(scores[::2], scores[1::2])]

    return prefer


# ---- during training --------------------------------------------------------------------------------------
def last_answer(ids, mask) -> tuple[int, int]:
    """(start, end) of the last run of trained positions of a rendered conversation: its last answer and end token
    (the trained positions are where the renderer put the answers, whatever the chat format)."""
    trained = np.flatnonzero(np.asarray(mask))
    if not len(trained):
        return 0, 0
    breaks = np.flatnonzero(np.diff(trained) > 1)
    return int(trained[breaks[-1] + 1] if len(breaks) else trained[0]), int(trained[-1]) + 1


def dev_prompts(arrays: dict, tok, n: int) -> list[tuple[list[int], str]]:
    """The first n conversations of packed rows as (prompt ids up to where the last answer begins, gold answer text):
    the packed dev split is all the training stage has, and it holds the rendered conversations whole, with the
    labels that say where the answers are."""
    lay = layout(tok)
    header = lay.header_ids("assistant")
    out = []
    for ids, labels, doc in zip(arrays["ids"], arrays["labels"], arrays["doc"]):
        for d in dict.fromkeys(doc[doc >= 0].tolist()):
            seg, trained = ids[doc == d], labels[doc == d] != IGNORE_INDEX
            a, b = last_answer(seg, trained)
            if a == 0 or (header and seg[max(0, a - len(header)) : a].tolist() != header):
                continue  # nothing trained, or the header merged with the answer (the prompt would differ)
            gold = [t for t in seg[a:b].tolist() if t not in lay.ends]
            out.append((seg[:a].tolist(), tok.decode(gold).strip()))
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
    with atomic_file(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), tmp)


def without_prompt(conversations: list[list[dict]], path: str, on_error: str) -> list[list[dict]]:
    """The held-out conversations whose last answer follows a user turn: the others (real dumps hold answers with
    nothing before them) give no prompt to answer. They fail or are left out, as render.on_error says."""
    bad = [i for i, c in enumerate(conversations) if not any(m["role"] == "user" for m in c[:-1])]
    if bad and on_error == "fail":
        raise UserError(f"{path}: held-out conversation {bad[0] + 1} has no user turn before its last answer, so "
                        "there is no prompt to answer; fix it or set render.on_error: skip")
    if bad:
        print(f"evaluate: {len(bad)} held-out conversations left out: no user turn before the last answer")
    left_out = set(bad)
    return [c for i, c in enumerate(conversations) if i not in left_out]


def evaluate_pair(cfg: EvaluateConfig, models: dict[str, str], heldout: str, mc: str, dev: str, metrics_path: str,
                  predictions_dir: str, on_error: str = "fail", backend: str = "auto",
                  trust_remote_code: bool = False) -> dict:
    """Run the same harness on each model folder (base first: the 'before' row) -> metrics.json grouped by
    model (every rate with n and a bootstrap 95% interval), a paired comparison of the second model against
    the first, and every prediction in predictions_dir/{generation,mc}.parquet. Bad rows of the held-out and
    multiple-choice files fail or are skipped as render.on_error says (`on_error`)."""
    conversations = without_prompt(read_conversations(heldout, on_error), heldout, on_error)
    questions = read_conversations(mc, on_error) if cfg.multiple_choice else []
    if cfg.limit:
        conversations, questions = conversations[: cfg.limit], questions[: cfg.limit]
    if cfg.judge.model and not Path(cfg.judge.model).exists():  # before the models answer, not after
        raise UserError(f"evaluate.judge.model={cfg.judge.model!r} does not exist; point it at a model folder or "
                        "leave it empty for no judge")
    kind = answer_kind([c[-1]["content"] for c in conversations], cfg.answers)
    keys = [*scores_for(kind), "answer_loss"]
    print(f"evaluate: {len(conversations)} held-out answers scored as {kind} answers, budget {cfg.max_new_tokens}"
          + (f", {len(questions)} multiple-choice questions" if cfg.multiple_choice else ", no multiple choice"))
    compute = setup_compute(cfg.device, cfg.dtype)
    dev_data = load_packed(dev)
    metrics, gen, choice = {"answers": kind}, {}, {}
    for name, folder in models.items():
        model = load_model(folder, backend, trust_remote_code=trust_remote_code).to(compute.device)
        tok = load_tokenizer(folder)
        gen[name] = generation_rows(model, tok, conversations, cfg, compute, name, kind)
        metrics[name] = summarize(gen[name], keys, cfg.n_boot, cfg.seed)
        if cfg.multiple_choice:
            choice[name] = mc_rows(model, tok, questions, cfg.batch_size, compute, name)
            metrics[name] |= summarize(choice[name], ["mc_accuracy"], cfg.n_boot, cfg.seed, prefix="mc_")
        metrics[name]["dev_loss"] = evaluate_loss(model, dev_data, cfg.batch_size, compute)
        metrics[name]["dev_ppl"] = math.exp(min(50.0, metrics[name]["dev_loss"]))
        print(f"evaluate {name}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics[name].items()))
    if len(models) == 2:
        a, b = models
        key = f"{b}_minus_{a}"
        metrics[key] = paired(gen[a], gen[b], keys, cfg.n_boot, cfg.seed)
        if cfg.multiple_choice:
            metrics[key] |= paired(choice[a], choice[b], ["mc_accuracy"], cfg.n_boot, cfg.seed, prefix="mc_")
        if cfg.judge.model:
            print(f"evaluate: judging {a} vs {b} answers with {cfg.judge.model}, both orders")
            prefer = model_judge(cfg.judge.model, cfg.judge.prompt, compute, cfg.batch_size)
            wins = verdicts([(ra["prompt"], ra["output"], rb["output"]) for ra, rb in zip(gen[a], gen[b])], prefer)
            for ra, rb, w in zip(gen[a], gen[b], wins):
                ra["judge_win"], rb["judge_win"] = 1.0 - w, w
            metrics[key] |= summarize_verdicts(wins, cfg.n_boot, cfg.seed)
    write_json(metrics_path, metrics)
    Path(predictions_dir).mkdir(parents=True, exist_ok=True)
    write_parquet(f"{predictions_dir}/generation.parquet", [r for rows in gen.values() for r in rows])
    if cfg.multiple_choice:
        write_parquet(f"{predictions_dir}/mc.parquet", [r for rows in choice.values() for r in rows])
    return metrics
