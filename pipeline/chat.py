"""The chat format, in one place: special tokens, the byte-level BPE tokenizer, `render` (ids + loss mask)
for training and evaluation, and the Jinja template exported with the model, which renders the same text.

A turn is <|role|> + content + <|end|>, with no newlines around markers. An assistant turn that calls tools writes
each call after its content as `<tool_call>{"name": ..., "arguments": ...}</tool_call>` (plain text); a tool result
is a <|tool|> turn. Trained (render.train_on=all_assistant, the default): assistant content, its tool calls and its
closing <|end|>. Never trained: role markers (the <|assistant|> marker included) and tool results."""
import dataclasses
import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, USER, ASSISTANT, SYSTEM, END, TOOL = "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|tool|>"
SPECIAL_TOKENS = [PAD, USER, ASSISTANT, SYSTEM, END, TOOL]  # ids 0..5, in this order; 0..4 are required
REQUIRED_TOKENS = SPECIAL_TOKENS[:5]  # tokenizers made before the tool role have no <|tool|>: fine without tools
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}
IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant", "last_assistant", "everything")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- if call['function'] is defined -%}{%- set fn = call['function'] -%}{%- else -%}{%- set fn = call -%}"
    "{%- endif -%}"
    "<tool_call>{\"name\": {{ fn['name'] | tojson }}, \"arguments\": "
    "{%- if fn['arguments'] is string -%}{{ ' ' + fn['arguments'] }}"
    "{%- elif fn['arguments'] is defined -%}{{ ' ' + fn['arguments'] | tojson }}"
    "{%- else -%}{{ ' {}' }}{%- endif -%}"
    "{{ '}' }}</tool_call>"
    "{%- endfor -%}"
    "{%- endif -%}"
    "<|end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = 2048  # byte-level BPE vocabulary, chat markers included

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} is below the 256 bytes + chat markers")


def train_tokenizer(texts, vocab_size: int) -> Tokenizer:
    """Byte-level BPE with the chat markers reserved as single special ids; digits split one by one.
    Each text segment gets a prefix space, so an answer right after <|assistant|> is spelled with the same
    tokens as in the middle of a pretraining sentence ("ĠBrodren", not "B" "rod" "ren")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=True), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: Tokenizer) -> None:
    """The chat markers are single special ids 0..4 (and <|tool|> is 5 when present)."""
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got is None and t in REQUIRED_TOKENS:
            raise ValueError(f"tokenizer lacks the chat marker {t} as a single token")
        if got is not None and got != i:
            raise ValueError(f"tokenizer must reserve {t} as id {i}, found {got}")


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"pad": tok.token_to_id(PAD), "eos": tok.token_to_id(END), "end": tok.token_to_id(END),
            "user": tok.token_to_id(USER), "assistant": tok.token_to_id(ASSISTANT),
            "system": tok.token_to_id(SYSTEM), "tool": tok.token_to_id(TOOL)}


def load_tokenizer(path: str) -> Tokenizer:
    """tokenizer.json (file or model folder), with marker-like text inside content kept as plain text."""
    p = Path(path)
    tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    check_tokenizer(tok)
    tok.encode_special_tokens = True  # content is encoded alone: "<|assistant|>" typed by a user stays text
    return tok


def save_tokenizer(tok: Tokenizer, folder: str) -> None:
    """tokenizer.json plus tokenizer_config.json carrying the chat template, for transformers."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(folder) / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
        "eos_token": END,
        "pad_token": PAD,
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def validate(messages) -> str | None:
    """Why a conversation cannot be rendered, or None (the rules are in pipeline.data.validate)."""
    from pipeline.data import validate as _validate

    return _validate(messages)


def turn_text(m: dict) -> str:
    """What goes between a turn's marker and its <|end|>: the content, then any tool calls as plain text."""
    text = m.get("content") or ""
    for call in m.get("tool_calls") or ():
        fn = call.get("function", call)
        args = fn.get("arguments", {})
        args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
        text += f'<tool_call>{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {args}}}</tool_call>'
    return text


def _trained_turns(conv: list[dict], train_on: str) -> list[bool]:
    if train_on == "everything":
        return [m["role"] != "tool" for m in conv]
    trained = [m["role"] == "assistant" for m in conv]
    if train_on == "last_assistant":
        last = max(i for i, t in enumerate(trained) if t)
        trained = [i == last for i in range(len(conv))]
    return trained


def render_flat(conversations: list[list[dict]], tok: Tokenizer, train_on: str = "all_assistant"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated conversations -> (ids int32, mask bool, offsets int64), all conversations end to end;
    conversation k is ids[offsets[k]:offsets[k+1]]. Turn texts go through one encode_batch call."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    texts = [turn_text(m) for conv in conversations for m in conv]
    encoded = tok.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    end = tok.token_to_id(END)
    marker = {role: tok.token_to_id(t) for role, t in ROLES.items()}
    ids, mask, offsets, k = [], [], [0], 0
    for conv in conversations:
        for m, trained in zip(conv, _trained_turns(conv, train_on)):
            content = encoded[k].ids
            k += 1
            if marker[m["role"]] is None:
                raise ValueError(f"the tokenizer has no {ROLES[m['role']]} marker (made before the tool role); "
                                 "retrain it (the tokenizer stage) to use tool turns")
            ids.append(marker[m["role"]])
            ids.extend(content)
            ids.append(end)
            mask.append(trained and train_on == "everything")
            mask.extend([trained] * (len(content) + 1))
        offsets.append(len(ids))
    return np.array(ids, np.int32), np.array(mask, np.bool_), np.array(offsets, np.int64)


def render_many(conversations: list[list[dict]], tok: Tokenizer, train_on: str = "all_assistant"
                ) -> list[tuple[list[int], list[bool]]]:
    """Render validated conversations to (ids, mask); mask[t] is True where ids[t] is trained.
    Worked example, `[user: "Hi", assistant: "Yo"]` (train_on=all_assistant):
        ids   <|user|> Hi <|end|> <|assistant|> Yo <|end|>
        mask    0      0    0         0          1    1
    Markers are added as ids, never parsed from text; train_on=last_assistant trains only the last assistant
    turn, everything trains every token but tool results (for ablations)."""
    ids, mask, off = render_flat(conversations, tok, train_on)
    return [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]


def render(conversation: list[dict], tok: Tokenizer, train_on: str = "all_assistant") -> tuple[list[int], list[bool]]:
    return render_many([conversation], tok, train_on)[0]


def render_prompt(messages: list[dict], tok: Tokenizer) -> list[int]:
    """A prompt for generation: the conversation rendered up to and including <|assistant|>."""
    ids = render(messages, tok)[0] if messages else []
    return ids + [tok.token_to_id(ASSISTANT)]


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The rendered conversation as text, as the exported Jinja template writes it."""
    text = "".join(f"{ROLES[m['role']]}{turn_text(m)}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def labels_from(ids, mask) -> list[int]:
    return [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


@dataclasses.dataclass
class RenderConfig:
    on_error: str = "fail"  # a malformed row: fail (file:line: reason) | skip (dropped and counted by reason)
    train_on: str = "all_assistant"  # trained turns: all_assistant | last_assistant | everything (ablations)
    batch_size: int = 4096  # conversations per encode_batch call and per parquet row group

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"render.on_error must be 'fail' or 'skip', got {self.on_error!r}")
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"render.train_on must be one of {TRAIN_ON}, got {self.train_on!r}")
        if self.batch_size < 1:
            raise ValueError(f"render.batch_size must be >= 1, got {self.batch_size}")


def iter_conversations(path: str, on_error: str, counts: dict | None = None):
    """Stream (source, 0-based row, messages) of the valid rows under `path` (a file or a folder of sources).
    A bad row raises `file:line: reason` (on_error='fail') or is counted in `counts` (on_error='skip'):
    counts[source] = {"rows_read", "rows_kept", "rows_dropped", "dropped": {reason: n}, "empty_files"}."""
    from pipeline.data import location, read_rows

    counts = {} if counts is None else counts
    for source, row, messages, reason in read_rows(path):
        c = counts.setdefault(source, {"rows_read": 0, "rows_kept": 0, "rows_dropped": 0, "dropped": {},
                                       "empty_files": 0})
        if reason == "empty_file":
            if on_error == "fail":
                raise ValueError(f"{location(path, source, 0).rsplit(':', 1)[0]}: empty file")
            c["empty_files"] += 1
            continue
        c["rows_read"] += 1
        if reason is None:
            c["rows_kept"] += 1
            yield source, row, messages
        elif on_error == "fail":
            raise ValueError(f"{location(path, source, row)}: {reason}")
        else:
            c["rows_dropped"] += 1
            c["dropped"][reason] = c["dropped"].get(reason, 0) + 1


def read_conversations(path: str, on_error: str) -> tuple[list[list[dict]], list[int], dict[str, int], int]:
    """All valid conversations under `path` -> (conversations, 0-based source rows, dropped count by reason,
    rows read). A bad row raises `file:line: reason` or, with on_error='skip', is counted."""
    counts: dict = {}
    conversations, rows = [], []
    for _, row, messages in iter_conversations(path, on_error, counts):
        conversations.append(messages)
        rows.append(row)
    dropped: dict[str, int] = {}
    for c in counts.values():
        for reason, n in c["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    return conversations, rows, dropped, sum(c["rows_read"] for c in counts.values())


class MaskStats:
    """Masking statistics per source and per role, accumulated batch by batch (vectorised over tokens).
    The assistant <|end|> count walks the ids (role markers), independently of the mask it checks."""

    def __init__(self, tok: Tokenizer):
        self.end = tok.token_to_id(END)
        self.role_of = {tok.token_to_id(t): r for r, t in ROLES.items() if tok.token_to_id(t) is not None}
        self.stats: dict[str, dict] = {}

    def add(self, source: str, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
        s = self.stats.setdefault(source, {"tokens": 0, "trained_tokens": 0, "fully_masked_rows": 0,
                                           "assistant_ends": 0, "assistant_ends_trained": 0,
                                           "roles": {r: {"tokens": 0, "trained_tokens": 0} for r in ROLES}})
        s["tokens"] += len(ids)
        s["trained_tokens"] += int(mask.sum())
        per_row = np.add.reduceat(mask.astype(np.int64), offsets[:-1]) if len(ids) else np.zeros(0)
        s["fully_masked_rows"] += int((per_row == 0).sum())
        is_marker = np.isin(ids, list(self.role_of))
        last_marker = np.maximum.accumulate(np.where(is_marker, np.arange(len(ids)), 0)) if len(ids) else ids
        role_id = ids[last_marker]  # every conversation starts with a marker, so this never crosses rows
        for marker, role in self.role_of.items():
            in_role = role_id == marker
            s["roles"][role]["tokens"] += int(in_role.sum())
            s["roles"][role]["trained_tokens"] += int((in_role & mask).sum())
        ends = (ids == self.end) & (role_id == next(m for m, r in self.role_of.items() if r == "assistant"))
        s["assistant_ends"] += int(ends.sum())
        s["assistant_ends_trained"] += int((ends & mask).sum())


def _summary(c: dict, s: dict | None) -> dict:
    s = s or {"tokens": 0, "trained_tokens": 0, "fully_masked_rows": 0, "assistant_ends": 0,
              "assistant_ends_trained": 0, "roles": {r: {"tokens": 0, "trained_tokens": 0} for r in ROLES}}
    out = {"rows_read": c["rows_read"], "rows_kept": c["rows_kept"], "rows_dropped": c["rows_dropped"],
           "dropped": dict(sorted(c["dropped"].items())), "empty_files": c["empty_files"],
           "tokens": s["tokens"], "trained_tokens": s["trained_tokens"],
           "trained_fraction": s["trained_tokens"] / max(1, s["tokens"]),
           "assistant_end_trained_fraction": s["assistant_ends_trained"] / max(1, s["assistant_ends"]),
           "end_share_of_trained": s["assistant_ends_trained"] / max(1, s["trained_tokens"]),
           "fully_masked_rows": s["fully_masked_rows"]}
    out["roles"] = {r: {"tokens": v["tokens"], "trained_fraction": v["trained_tokens"] / max(1, v["tokens"])}
                    for r, v in s["roles"].items() if v["tokens"]}
    return out


def render_report(rendered: list[tuple[list[int], list[bool]]], tok: Tokenizer, n_read: int,
                  dropped: dict[str, int], counts: dict | None = None, stats: MaskStats | None = None) -> dict:
    """Masking statistics, tracked as DVC metrics so a masking regression shows in `dvc metrics diff`: totals,
    then per source (`sources.<name>.*`) with per-role trained fractions."""
    if stats is None:
        stats = MaskStats(tok)
        if rendered:
            lengths = [len(ids) for ids, _ in rendered]
            stats.add("all", np.array([i for ids, _ in rendered for i in ids], np.int32),
                      np.array([m for _, mask in rendered for m in mask], np.bool_),
                      np.concatenate([[0], np.cumsum(lengths)]))
    if counts is None:
        counts = {"all": {"rows_read": n_read, "rows_kept": len(rendered), "rows_dropped": sum(dropped.values()),
                          "dropped": dropped, "empty_files": 0}}
    per = {src: _summary(c, stats.stats.get(src)) for src, c in sorted(counts.items())}
    total_counts = {"rows_read": 0, "rows_kept": 0, "rows_dropped": 0, "dropped": {}, "empty_files": 0}
    total_stats = {"tokens": 0, "trained_tokens": 0, "fully_masked_rows": 0, "assistant_ends": 0,
                   "assistant_ends_trained": 0, "roles": {r: {"tokens": 0, "trained_tokens": 0} for r in ROLES}}
    for c in counts.values():
        for k in ("rows_read", "rows_kept", "rows_dropped", "empty_files"):
            total_counts[k] += c[k]
        for reason, n in c["dropped"].items():
            total_counts["dropped"][reason] = total_counts["dropped"].get(reason, 0) + n
    for s in stats.stats.values():
        for k in ("tokens", "trained_tokens", "fully_masked_rows", "assistant_ends", "assistant_ends_trained"):
            total_stats[k] += s[k]
        for r, v in s["roles"].items():
            total_stats["roles"][r]["tokens"] += v["tokens"]
            total_stats["roles"][r]["trained_tokens"] += v["trained_tokens"]
    report = _summary(total_counts, total_stats)
    assert report["rows_read"] == report["rows_kept"] + report["rows_dropped"], "rows read != kept + dropped"
    report["sources"] = per
    return report


def render_split(path: str, tok: Tokenizer, cfg: RenderConfig, out: str, progress: str = "") -> dict:
    """A file or folder of sources -> parquet of (input_ids, labels, source, source_row), streamed: conversations
    are tokenized cfg.batch_size at a time and each batch is one row group. Returns the masking report."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from pipeline.pack import RENDERED_SCHEMA

    counts: dict = {}
    stats = MaskStats(tok)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    writer = pq.ParquetWriter(out, RENDERED_SCHEMA)
    bar = tqdm(desc=progress or f"render {path}", unit=" rows", disable=None, mininterval=1.0)

    def flush(batch):
        ids, mask, off = render_flat([m for _, _, m in batch], tok, cfg.train_on)
        sources = [s for s, _, _ in batch]
        for src in dict.fromkeys(sources):  # per-source statistics, in order of appearance
            sel = [k for k, s in enumerate(sources) if s == src]
            if len(sel) == len(batch):
                stats.add(src, ids, mask, off)
            else:
                parts = [(off[k], off[k + 1]) for k in sel]
                lens = np.array([b - a for a, b in parts])
                stats.add(src, np.concatenate([ids[a:b] for a, b in parts]),
                          np.concatenate([mask[a:b] for a, b in parts]), np.concatenate([[0], np.cumsum(lens)]))
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
        offsets = pa.array(off.astype(np.int32))
        writer.write_table(pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
            "source": pa.array(sources, pa.string()),
            "source_row": pa.array([r for _, r, _ in batch], pa.int64()),
        }, schema=RENDERED_SCHEMA))
        bar.update(len(batch))

    try:
        batch = []
        for item in iter_conversations(path, cfg.on_error, counts):
            batch.append(item)
            if len(batch) == cfg.batch_size:
                flush(batch)
                batch = []
        if batch:
            flush(batch)
    finally:
        writer.close()
        bar.close()
    report = render_report([], tok, 0, {}, counts=counts, stats=stats)
    if report["rows_kept"] == 0:
        raise ValueError(f"{path}: no usable conversation (read {report['rows_read']}, dropped {report['dropped']})")
    return report


if __name__ == "__main__":  # `python -m pipeline.chat MODEL_DIR`: the terminal chat of pipeline/chat_cli.py
    from pipeline.chat_cli import main

    main()
