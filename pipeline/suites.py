"""General-ability suites: JSONL files of multiple-choice and exact-answer questions (docs/evaluation.md: Suites),
each asked of a model through its chat template or as plain few-shot text, and scored by the log-likelihood of each
choice (summed over the choice's tokens, and per byte), by the letter the model writes, and by the final answer
extracted from what it writes. Per-question rows; the evaluate stage summarises them per suite for base and fine-tuned."""
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.common import Compute, UserError
from pipeline.evaluate import answer_ids
from pipeline.metrics import normalize
from pipeline.template import chat_format, render_text, text_tokenizer

RESERVED = ("answers", "base", "sft", "sft_minus_base", "harness", "regressions")  # other groups of metrics.json
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MARKER = "####"  # GSM8K's: the final answer follows it, in the gold answer and in a generated one
LETTER_ASK = "Answer with the letter of the right option."
CHOICE_SCORES = ("acc", "acc_norm", "letter_acc")  # per multiple-choice question
EXACT_SCORES = ("exact_acc",)  # per exact-answer question
KEYS = {"question", "choices", "answer", "id"}
FIX = "fix the row, or set render.on_error: skip to leave bad rows out and count them"


@dataclass(frozen=True)
class Question:
    line: int  # 1-based line of the suite file
    question: str
    choices: tuple[str, ...]  # empty: an exact-answer question
    gold: int | str  # the right choice's index, or the exact answer (the text after MARKER when it has one)

    @property
    def kind(self) -> str:
        return "choice" if self.choices else "exact"


# ---- reading ----------------------------------------------------------------------------------------------
def suite_files(path: str) -> dict[str, Path]:
    """evaluate.suites: a .jsonl file or a folder of them -> {suite name (the file's stem): file}."""
    p = Path(path)
    files = sorted(f for f in p.iterdir() if f.suffix == ".jsonl" and not f.name.startswith(".")) if p.is_dir() \
        else [p]
    if not p.exists():
        raise UserError(f"{path}: no such file or folder; point evaluate.suites at a suite file (.jsonl) or a folder "
                        "of them")
    if not p.is_dir() and p.suffix != ".jsonl":
        raise UserError(f"{path}: a suite is a .jsonl file (docs/evaluation.md: Suites); fix evaluate.suites")
    taken = [f.stem for f in files if f.stem in RESERVED]
    if taken:
        raise UserError(f"{path}: suite name {taken[0]!r} is a group metrics.json already has; rename the file")
    return {f.stem: f for f in files}


def parse_row(row) -> Question | str:
    """A parsed JSON row as a Question, or the reason it is not one (snake_case, a detail after a colon)."""
    if not isinstance(row, dict):
        return "not_an_object"
    if set(row) - KEYS:
        return f"unknown_keys: {sorted(set(row) - KEYS)} (known: {sorted(KEYS)})"
    question, choices, answer = row.get("question"), row.get("choices"), row.get("answer")
    if not isinstance(question, str) or not question.strip():
        return "no_question"
    if answer is None or isinstance(answer, bool):
        return "no_answer"
    if choices is None:
        if not isinstance(answer, (str, int, float)) or not str(answer).strip():
            return "no_answer"
        gold = str(answer).rsplit(MARKER, 1)[-1].strip()
        return Question(0, question, (), gold) if gold else "no_answer"
    if not isinstance(choices, list) or len(choices) < 2 or len(choices) > len(LETTERS) \
            or not all(isinstance(c, str) and c.strip() for c in choices):
        return f"bad_choices: need a list of 2 to {len(LETTERS)} non-empty strings"
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in LETTERS:
        answer = LETTERS.index(answer.strip().upper())
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        return f"bad_answer: {answer!r} is not an index (0..{len(choices) - 1}) or a letter of the choices"
    return Question(0, question, tuple(choices), answer)


def read_suite(path: Path, on_error: str) -> tuple[list[Question], dict[str, int]]:
    """The questions of a suite file, in order, and the bad rows left out by reason. A bad row ends the stage with
    `file:line: reason` (on_error=fail) or is left out and counted (skip)."""
    questions, dropped = [], {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                parsed = parse_row(json.loads(line))
            except json.JSONDecodeError as e:
                parsed = f"bad_json: {e.msg}"
            if isinstance(parsed, Question):
                questions.append(Question(n, parsed.question, parsed.choices, parsed.gold))
            elif on_error == "fail":
                raise UserError(f"{path}:{n}: {parsed}; {FIX}")
            else:
                reason = parsed.split(":")[0]
                dropped[reason] = dropped.get(reason, 0) + 1
    if not questions:
        raise UserError(f"{path}: no usable question (left out: {dropped}); add rows (docs/evaluation.md: Suites)")
    return questions, dropped


def split_shots(questions: list[Question], fewshot: int, limit: int) -> tuple[dict, list[Question]]:
    """The solved examples ({kind: the first `fewshot` questions of that kind}) and the scored questions: the rest,
    in file order, the first `limit` of them (0: all)."""
    shots = {k: [q for q in questions if q.kind == k][:fewshot] for k in ("choice", "exact")}
    used = {q.line for s in shots.values() for q in s}
    scored = [q for q in questions if q.line not in used]
    return shots, scored[:limit] if limit else scored


# ---- prompts ----------------------------------------------------------------------------------------------
def options(q: Question) -> str:
    return "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(q.choices))


def exchange(q: Question, how: str) -> tuple[str, str]:
    """(what is asked, the right answer) of a question asked `how`: choice (the question alone; answered by the
    choice's text), letter (the question with its options; answered by a letter) or exact."""
    if how == "choice":
        return q.question, q.choices[q.gold]
    if how == "letter":
        return f"{q.question}\n{options(q)}\n{LETTER_ASK}", LETTERS[q.gold]
    return q.question, str(q.gold)


def context(q: Question, how: str, shots: list[Question], prompting: str, tok) -> str:
    """The text before the answer. chat: the model's chat template with the generation prompt, solved examples as
    earlier exchanges; plain: `Question: ...\\nAnswer: ...` blocks, the last one open."""
    turns = [exchange(s, how) for s in shots] + [(exchange(q, how)[0], None)]
    if prompting == "chat":
        messages = [{"role": r, "content": t} for asked, answer in turns
                    for r, t in (("user", asked), ("assistant", answer)) if t is not None]
        return render_text(messages, add_generation_prompt=True, fmt=chat_format(tok))
    return "".join(f"Question: {a}\nAnswer:" + (f" {b}\n\n" if b is not None else "") for a, b in turns)


def encoder(tok, prompting: str):
    """text -> ids as the model's tokenizer reads a rendered text: special tokens the chat template writes are parsed
    as such; plain text gets what the tokenizer adds itself (a BOS), as transformers' tokenizer does."""
    parsing = text_tokenizer(tok)
    return lambda text: parsing.encode(text, add_special_tokens=prompting == "plain").ids


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split at the character boundary, as lm-eval does: the whitespace that ends the
    context moves to the continuation, the whole text is encoded once, and the continuation is what follows the
    context's own ids (a token that merges across the boundary counts as the continuation's)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


# ---- scoring ----------------------------------------------------------------------------------------------
@torch.no_grad()
def loglikelihoods(model, pairs: list[tuple[list[int], list[int]]], batch_size: int, compute: Compute,
                   progress: str = "") -> list[tuple[float, bool]]:
    """(log P(continuation | context) summed over the continuation's tokens, whether greedy decoding writes exactly
    the continuation) per (context ids, continuation ids). The model reads context + continuation less its last token,
    so pairs that give the same input (one-token choices after one prompt) share one forward; inputs go longest first
    in right-padded batches (causal attention: pads after a row change nothing in it), and only the continuation's
    positions go through the output layer. A pair longer than the model's context keeps its last max_seq_len + 1
    tokens, as lm-eval does."""
    model.eval()
    limit, device = model.arch.max_seq_len, compute.device
    users: dict[tuple, list[int]] = {}  # model input -> the pairs it scores
    for i, (ctx, cont) in enumerate(pairs):
        assert ctx and 0 < len(cont) <= limit, f"pair {i}: empty context or continuation too long"
        users.setdefault(tuple((ctx + cont)[-(limit + 1):][:-1]), []).append(i)  # position t predicts t + 1
    inputs = sorted(users, key=len, reverse=True)
    out: list = [None] * len(pairs)
    for start in tqdm(range(0, len(inputs), batch_size), desc=progress or "log-likelihood",
                      disable=not sys.stderr.isatty()):
        seqs = inputs[start : start + batch_size]
        width = len(seqs[0])
        ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in seqs], device=device)  # (B, T)
        pos = torch.arange(width, device=device).expand(len(seqs), width)
        doc = torch.tensor([[0] * len(s) + [-1] * (width - len(s)) for s in seqs], device=device)  # -1: padding
        rows, cols, targets, owners = [], [], [], []
        for r, s in enumerate(seqs):
            for i in users[s]:
                n = len(pairs[i][1])
                rows += [r] * n
                cols += range(len(s) - n, len(s))
                targets += pairs[i][1]
                owners.append((i, n))
        with compute.autocast():
            h = model.states(ids, pos, doc)  # (B, T, D), on either backend
            logits = model.logits(h[rows, cols])  # (N, V) fp32: the continuation positions only
        logprobs = logits.log_softmax(-1)
        target = torch.tensor(targets, device=device)
        picked = logprobs.gather(1, target[:, None])[:, 0].tolist()
        greedy = (logprobs.argmax(-1) == target).tolist()
        at = 0
        for i, n in owners:
            out[i] = (float(sum(picked[at : at + n])), all(greedy[at : at + n]))
            at += n
    return out


def letter_of(output: str, n: int) -> int | None:
    """The option a written answer picks: its first word when that is one letter (`b`, `B)`, `(C).`), else the first
    capital letter standing alone that labels an option; None when it names none."""
    words = output.strip().split()
    first = words[0].strip("()[].:,*") if words else ""
    if len(first) == 1 and first.upper() in LETTERS[:n]:
        return LETTERS.index(first.upper())
    hit = next((m for m in re.findall(r"\b([A-Z])\b", output) if m in LETTERS[:n]), None)
    return None if hit is None else LETTERS.index(hit)


NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def as_number(text: str) -> float | None:
    text = text.strip().rstrip(".").replace(",", "").removeprefix("$")
    return float(text) if re.fullmatch(r"-?\d+(?:\.\d+)?", text) else None


def extract(output: str, gold: str) -> str:
    """The final answer in a written answer: the text after the last MARKER (to the end of its line); else, for a
    number gold, the last number written; else the whole answer."""
    if MARKER in output:
        after = output.rsplit(MARKER, 1)[1].strip()
        return after.splitlines()[0].strip() if after else ""
    if as_number(gold) is not None:
        numbers = NUMBER.findall(output)
        return numbers[-1] if numbers else ""
    return output.strip()


def exact_correct(output: str, gold: str) -> float:
    """1.0 when the extracted answer is the gold one: numbers by value (1,000 = 1000.0), text after normalising."""
    got, want = extract(output, gold), as_number(gold)
    if want is not None:
        return float(as_number(got) == want)
    return float(bool(normalize(got)) and normalize(got) == normalize(gold))


def cut(text: str, prompting: str) -> str:
    """A plain few-shot answer ends where the model starts the next block of the pattern."""
    if prompting != "plain":
        return text
    for stop in ("\n\n", "\nQuestion:"):
        text = text.split(stop, 1)[0]
    return text.strip()


def score_suite(model, tok, questions: list[Question], shots: dict, prompting: str, max_new_tokens: int,
                batch_size: int, compute: Compute, suite: str, name: str) -> list[dict]:
    """One row per question: a multiple-choice one gets acc (the choice of highest summed log-likelihood is the
    gold one), acc_norm (the same per byte of each choice) and letter_acc (the letter it writes, greedily, to the
    question with its options listed); an exact-answer one gets exact_acc (extract())."""
    encode = encoder(tok, prompting)
    lead = "" if prompting == "chat" else " "  # plain text: the answer follows `Answer:` after a space
    choice = [q for q in questions if q.kind == "choice"]
    pairs, first = [], []
    for q in choice:
        ctx = context(q, "choice", shots["choice"], prompting, tok)
        first.append(len(pairs))
        pairs += [encode_pair(encode, ctx, lead + c) for c in q.choices]
    scores = loglikelihoods(model, pairs, batch_size, compute, f"{suite} {name}: choices")
    asked = [(q, "letter" if q.kind == "choice" else "exact") for q in questions]
    prompts = [encode(context(q, how, shots[q.kind], prompting, tok)) for q, how in asked]
    written = answer_ids(model, tok, prompts, max_new_tokens, batch_size, compute) if prompts else []
    rows, k = [], 0
    for q, (text, _) in zip(questions, written):
        text = cut(text, prompting)
        row = {"suite": suite, "model": name, "line": q.line, "kind": q.kind, "question": q.question,
               "output": text, "prompting": prompting}
        if q.kind == "choice":
            lls = np.array([s for s, _ in scores[first[k] : first[k] + len(q.choices)]])
            size = np.array([len(c.encode("utf-8")) for c in q.choices], dtype=np.float64)
            picked = letter_of(text, len(q.choices))
            row |= {"gold": LETTERS[q.gold], "choice_logprobs": json.dumps(np.round(lls, 4).tolist()),
                    "acc": float(np.argmax(lls) == q.gold), "acc_norm": float(np.argmax(lls / size) == q.gold),
                    "letter_acc": float(picked == q.gold)}
            k += 1
        else:
            row |= {"gold": str(q.gold), "extracted": extract(text, str(q.gold)),
                    "exact_acc": exact_correct(text, str(q.gold))}
        rows.append(row)
    return rows
