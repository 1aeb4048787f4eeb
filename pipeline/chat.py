"""The chat format, in one place: chat formats (special tokens and turn layout), the byte-level BPE tokenizer,
`render` (ids + loss mask) for training and evaluation, and the Jinja template exported with the model, which
renders the same text.

Two formats (`tokenizer.chat_format`); a tokenizer's own special tokens say which one it speaks (`chat_format`):
- markers (the default, SPEC §2): a turn is <|role|> + content + <|end|>, with no newlines around markers;
- chatml (SmolLM2, Qwen, ...): a turn is <|im_start|>role\n + content + <|im_end|>\n.
An assistant turn that calls tools writes each call after its content as
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` (plain text); a tool result is a turn of role tool.
Trained (render.train_on=all_assistant, the default): assistant content, its tool calls and its closing end token.
Never trained: role headers (the assistant's included), the newline after an end token, and tool results."""
import dataclasses
import functools
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


@dataclasses.dataclass(frozen=True)
class ChatFormat:
    """Where the special tokens go. A turn is `opener + role + after_role` (the header, never trained), the content,
    then `end` (trained after assistant content: the stop token) and `after_end` (never trained). The header's text
    after its special tokens is encoded together with the content, as a text-level template renders it."""
    name: str
    opener: str  # "<|" (with "|>" after the role: one special token per role) or "<|im_start|>"
    after_role: str  # "|>" or "\n"
    end: str  # end of turn; the stop id of generation and the eos of the exported model
    after_end: str  # "" or "\n"
    specials: tuple[str, ...]  # reserved when the bundled tokenizer is trained, in id order (the first is padding)
    required: tuple[str, ...]  # a tokenizer speaks this format when it has these as special tokens

    def header(self, role: str) -> str:
        return f"{self.opener}{role}{self.after_role}"

    def describe(self) -> str:
        return {"markers": "`<|role|>` + content + `<|end|>`, with no newlines around the markers",
                "chatml": "`<|im_start|>role\\n` + content + `<|im_end|>\\n` (ChatML)"}[self.name]


FORMATS = {
    "markers": ChatFormat("markers", "<|", "|>", END, "", tuple(SPECIAL_TOKENS), tuple(REQUIRED_TOKENS)),
    "chatml": ChatFormat("chatml", "<|im_start|>", "\n", "<|im_end|>", "\n",
                         ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), ("<|im_start|>", "<|im_end|>")),
}
MARKERS = FORMATS["markers"]


def _has_special(tok: Tokenizer, text: str) -> bool:
    i = tok.token_to_id(text)
    return i is not None and text in {t.content for t in tok.get_added_tokens_decoder().values()}


def chat_format(tok: Tokenizer) -> ChatFormat:
    """The format a tokenizer speaks, from its special tokens: markers when it has <|user|> <|assistant|> <|end|>,
    else chatml when it has <|im_start|> <|im_end|>."""
    return _detect(tok)


@functools.lru_cache(maxsize=32)
def _detect(tok: Tokenizer) -> ChatFormat:
    for fmt in FORMATS.values():
        if all(_has_special(tok, t) for t in fmt.required):
            return fmt
    raise ValueError("the tokenizer speaks no known chat format: it needs <|user|> <|assistant|> <|system|> <|end|> "
                     "<|pad|> (markers) or <|im_start|> <|im_end|> (chatml) as single special tokens")


@dataclasses.dataclass
class Layout:
    """A format bound to a tokenizer's ids."""
    fmt: ChatFormat
    lead: dict  # role -> the header's special ids (None: the tokenizer lacks the role's marker)
    tail: dict  # role -> the header's text after them ("" for markers; "user\n" for chatml)
    tail_ids: dict  # role -> that text encoded alone
    key: dict  # role -> the ids that open the role's turns in rendered ids (specials + the role's name)
    end: int
    after_end: list
    pad: int

    def header_ids(self, role: str) -> list[int]:
        if self.lead[role] is None:
            raise ValueError(f"the tokenizer has no {self.fmt.header(role).strip()} marker (made before the tool "
                             "role); retrain it (the tokenizer stage) to use tool turns")
        return self.lead[role] + self.tail_ids[role]

    def starts(self, ids: np.ndarray, role: str) -> np.ndarray:
        """Positions in `ids` where a turn of `role` begins (its key ids match there)."""
        key = self.key[role]
        if key is None or len(ids) < len(key):
            return np.zeros(0, np.int64)
        hit = np.ones(len(ids) - len(key) + 1, bool)
        for j, k in enumerate(key):
            hit &= ids[j : len(ids) - len(key) + 1 + j] == k
        return np.flatnonzero(hit)


@functools.lru_cache(maxsize=32)
def layout(tok: Tokenizer, fmt: ChatFormat | None = None) -> Layout:
    fmt = fmt or chat_format(tok)
    specials = [t for t in fmt.specials if tok.token_to_id(t) is not None]
    lead, tail, tail_ids, key = {}, {}, {}, {}
    for role in ROLES:
        header, ids = fmt.header(role), []
        while any(header.startswith(s) for s in specials):
            s = next(s for s in specials if header.startswith(s))
            ids.append(tok.token_to_id(s))
            header = header[len(s):]
        if not ids:  # a tokenizer made before the tool role has no <|tool|>
            lead[role] = tail[role] = tail_ids[role] = key[role] = None
            continue
        lead[role], tail[role] = ids, header
        tail_ids[role] = tok.encode(header, add_special_tokens=False).ids if header else []
        name = header[: len(header) - len(fmt.after_role)] if header.endswith(fmt.after_role) else header
        key[role] = ids + (tok.encode(name, add_special_tokens=False).ids if name else [])
    pad = next((tok.token_to_id(t) for t in (PAD, fmt.specials[0]) if tok.token_to_id(t) is not None),
               tok.token_to_id(fmt.end))
    after_end = tok.encode(fmt.after_end, add_special_tokens=False).ids if fmt.after_end else []
    return Layout(fmt, lead, tail, tail_ids, key, tok.token_to_id(fmt.end), after_end, pad)


def chat_template(fmt: ChatFormat = MARKERS) -> str:
    """The Jinja chat template that writes `render_text` for this format (transformers' apply_chat_template)."""
    lit = lambda text: "{{ " + json.dumps(text) + " }}"  # noqa: E731  (a literal that whitespace control keeps)
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] not in ['system', 'user', 'assistant', 'tool'] -%}"
        "{{ raise_exception('unknown role: ' + message['role']) }}"
        "{%- endif -%}"
        f"{lit(fmt.opener)}{{{{ message['role'] }}}}{lit(fmt.after_role)}"
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
        f"{lit(fmt.end)}{lit(fmt.after_end) if fmt.after_end else ''}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{lit(fmt.header('assistant'))}{{%- endif -%}}"
    )


CHAT_TEMPLATE = chat_template(MARKERS)


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int = 2048  # byte-level BPE vocabulary, chat markers included
    chat_format: str = "auto"  # markers | chatml | auto: the base.init_from tokenizer's own, else markers

    def __post_init__(self):
        if self.vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} is below the 256 bytes + chat markers")
        if self.chat_format not in ("auto", *FORMATS):
            raise ValueError(f"tokenizer.chat_format must be auto or one of {list(FORMATS)}, got {self.chat_format!r}")


def train_tokenizer(texts, vocab_size: int, fmt: ChatFormat = MARKERS) -> Tokenizer:
    """Byte-level BPE with the format's special tokens reserved as single ids; digits split one by one.
    Each text segment gets a prefix space, so an answer right after <|assistant|> is spelled with the same
    tokens as in the middle of a pretraining sentence ("ĠBrodren", not "B" "rod" "ren")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=True), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(fmt.specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: Tokenizer) -> ChatFormat:
    """The tokenizer speaks a known chat format; with markers, they are the special ids 0..4 (and <|tool|> is 5
    when present). Returns the format."""
    fmt = chat_format(tok)
    if fmt.name != "markers":
        return fmt
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got is None and t in REQUIRED_TOKENS:
            raise ValueError(f"tokenizer lacks the chat marker {t} as a single token")
        if got is not None and got != i:
            raise ValueError(f"tokenizer must reserve {t} as id {i}, found {got}")
    return fmt


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """pad and eos (= end: the end of an assistant turn) ids of the tokenizer's chat format."""
    lay = layout(tok)
    return {"pad": lay.pad, "eos": lay.end, "end": lay.end}


def load_tokenizer(path: str) -> Tokenizer:
    """tokenizer.json (file or model folder), with marker-like text inside content kept as plain text."""
    p = Path(path)
    tok = Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))
    check_tokenizer(tok)
    tok.encode_special_tokens = True  # content is encoded alone: "<|assistant|>" typed by a user stays text
    return tok


def save_tokenizer(tok: Tokenizer, folder: str) -> None:
    """tokenizer.json plus tokenizer_config.json carrying the chat template of its format, for transformers."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(folder) / "tokenizer.json"))
    lay = layout(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(lay.fmt),
        "eos_token": lay.fmt.end,
        "pad_token": tok.id_to_token(lay.pad),
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


def _split_header(tok: Tokenizer, lay: Layout, role: str, text: str, ids: list[int]) -> tuple[list[int], list[int]]:
    """A turn's header text and content are encoded together (as a text template is); -> (header, content) ids.
    Almost always the header's own ids come first; otherwise (a merge across the boundary, say content that starts
    with blank lines) the tokens that start inside the header text are the header."""
    head = lay.tail_ids[role]
    if ids[: len(head)] == head:
        return head, ids[len(head):]
    enc = tok.encode(text, add_special_tokens=False)
    cut = next((i for i, (a, _) in enumerate(enc.offsets) if a >= len(lay.tail[role])), len(enc.ids))
    return enc.ids[:cut], enc.ids[cut:]


def render_flat(conversations: list[list[dict]], tok: Tokenizer, train_on: str = "all_assistant"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validated conversations -> (ids int32, mask bool, offsets int64), all conversations end to end;
    conversation k is ids[offsets[k]:offsets[k+1]]. Turn texts go through one encode_batch call."""
    if train_on not in TRAIN_ON:
        raise ValueError(f"train_on must be one of {TRAIN_ON}, got {train_on!r}")
    lay = layout(tok)
    for role in {m["role"] for conv in conversations for m in conv}:
        lay.header_ids(role)  # a clear error for a role the tokenizer has no marker for
    texts = [lay.tail[m["role"]] + turn_text(m) for conv in conversations for m in conv]
    encoded = tok.encode_batch_fast(texts, add_special_tokens=False) if texts else []
    everything = train_on == "everything"
    lead, tail, end, after_end = lay.lead, lay.tail, lay.end, lay.after_end
    ids, runs, flags, offsets, k = [], [], [], [0], 0  # the mask as runs: runs[j] positions of flags[j]
    for conv in conversations:
        for m, trained in zip(conv, _trained_turns(conv, train_on)):
            role = m["role"]
            header, content = lead[role], encoded[k].ids
            if tail[role]:
                head, content = _split_header(tok, lay, role, texts[k], content)
                header = header + head
            k += 1
            ids += header
            ids += content
            ids.append(end)
            ids += after_end
            runs += (len(header), len(content) + 1, len(after_end))  # header | content and <|end|> | after it
            flags += (trained and everything, trained, trained and everything)
        offsets.append(len(ids))
    mask = np.repeat(np.array(flags, np.bool_), np.array(runs, np.int64))
    return np.array(ids, np.int32), mask, np.array(offsets, np.int64)


def render_many(conversations: list[list[dict]], tok: Tokenizer, train_on: str = "all_assistant"
                ) -> list[tuple[list[int], list[bool]]]:
    """Render validated conversations to (ids, mask); mask[t] is True where ids[t] is trained.
    Worked example, `[user: "Hi", assistant: "Yo"]` (train_on=all_assistant):
        ids   <|user|> Hi <|end|> <|assistant|> Yo <|end|>          (markers)
        mask    0      0    0         0          1    1
        ids   <|im_start|> user \\n Hi <|im_end|> \\n <|im_start|> assistant \\n Yo <|im_end|> \\n      (chatml)
        mask       0        0   0  0     0      0      0          0     0  1     1     0
    Special tokens are added as ids, never parsed from text; train_on=last_assistant trains only the last
    assistant turn, everything trains every token but tool results (for ablations)."""
    ids, mask, off = render_flat(conversations, tok, train_on)
    return [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]


def render(conversation: list[dict], tok: Tokenizer, train_on: str = "all_assistant") -> tuple[list[int], list[bool]]:
    return render_many([conversation], tok, train_on)[0]


def render_prompt(messages: list[dict], tok: Tokenizer) -> list[int]:
    """A prompt for generation: the conversation rendered up to and including the assistant's header."""
    ids = render(messages, tok)[0] if messages else []
    return ids + layout(tok).header_ids("assistant")


def render_text(messages: list[dict], add_generation_prompt: bool = False, fmt: ChatFormat = MARKERS) -> str:
    """The rendered conversation as text, as the exported Jinja template writes it."""
    text = "".join(f"{fmt.header(m['role'])}{turn_text(m)}{fmt.end}{fmt.after_end}" for m in messages)
    return text + (fmt.header("assistant") if add_generation_prompt else "")


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
    The assistant end count walks the ids (role headers), independently of the mask it checks."""

    def __init__(self, tok: Tokenizer):
        self.layout = layout(tok)
        self.end = self.layout.end
        self.stats: dict[str, dict] = {}

    def add(self, source: str, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray) -> None:
        s = self.stats.setdefault(source, {"tokens": 0, "trained_tokens": 0, "fully_masked_rows": 0,
                                           "assistant_ends": 0, "assistant_ends_trained": 0,
                                           "roles": {r: {"tokens": 0, "trained_tokens": 0} for r in ROLES}})
        s["tokens"] += len(ids)
        s["trained_tokens"] += int(mask.sum())
        per_row = np.add.reduceat(mask.astype(np.int64), offsets[:-1]) if len(ids) else np.zeros(0)
        s["fully_masked_rows"] += int((per_row == 0).sum())
        code = np.full(len(ids), -1, np.int64)  # role index at each turn's first token, then carried forward
        for r, role in enumerate(ROLES):
            code[self.layout.starts(ids, role)] = r
        last = np.maximum.accumulate(np.where(code >= 0, np.arange(len(ids)), 0)) if len(ids) else code
        role_at = code[last]  # every conversation starts with a header, so this never crosses rows
        for r, role in enumerate(ROLES):
            in_role = role_at == r
            s["roles"][role]["tokens"] += int(in_role.sum())
            s["roles"][role]["trained_tokens"] += int((in_role & mask).sum())
        ends = (ids == self.end) & (role_at == list(ROLES).index("assistant"))
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
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from pipeline.pack import RENDERED_SCHEMA

    counts: dict = {}
    stats = MaskStats(tok)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    schema = RENDERED_SCHEMA.with_metadata({"assistant_header": json.dumps(layout(tok).header_ids("assistant"))})
    writer = pq.ParquetWriter(out, schema)
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
        }, schema=schema))
        bar.update(len(batch))

    try:
        # batch k is tokenized and written in a thread (the tokenizer releases the GIL) while batch k+1 is read
        # and validated: one batch in flight, so the order, the output and the first error are as if in sequence
        with ThreadPoolExecutor(1) as pool:
            batch, pending = [], None
            try:
                for item in iter_conversations(path, cfg.on_error, counts):
                    batch.append(item)
                    if len(batch) == cfg.batch_size:
                        if pending is not None:
                            pending.result()
                        pending, batch = pool.submit(flush, batch), []
            finally:
                if pending is not None:
                    pending.result()  # an error in an earlier batch is raised first
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
