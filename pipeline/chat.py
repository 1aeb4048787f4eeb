"""The chat format, in one place: special tokens, the byte-level BPE tokenizer, `render` (ids + loss mask)
for training and evaluation, and the Jinja template exported with the model, which renders the same text.

A turn is <|role|> + content + <|end|>, with no newlines around markers. Trained: assistant content and the
assistant's closing <|end|>. Not trained: everything else, the <|assistant|> marker included."""
import dataclasses
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, USER, ASSISTANT, SYSTEM, END = "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"
SPECIAL_TOKENS = [PAD, USER, ASSISTANT, SYSTEM, END]  # ids 0..4, in this order
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE_INDEX = -100

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role: ' + message['role']) }}"
    "{%- endif -%}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
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
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) is None:
            raise ValueError(f"tokenizer lacks the chat marker {t} as a single token")
    if tok.token_to_id(PAD) != 0:
        raise ValueError("tokenizer must reserve <|pad|> as id 0")


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"pad": tok.token_to_id(PAD), "eos": tok.token_to_id(END), "end": tok.token_to_id(END),
            "user": tok.token_to_id(USER), "assistant": tok.token_to_id(ASSISTANT),
            "system": tok.token_to_id(SYSTEM)}


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
    """Why a conversation cannot be rendered, or None. Accepted: system first (optional), then user and
    assistant turns, ending on an assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "messages_not_a_nonempty_list"
    for m in messages:
        if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m or "content" not in m:
            return "message_not_role_content"
        if m["role"] not in ROLES:
            return "unknown_role"
        if not isinstance(m["content"], str) or not m["content"].strip():
            return "empty_or_non_string_content"
    if any(m["role"] == "system" for m in messages[1:]):
        return "system_not_first"
    if messages[-1]["role"] != "assistant":
        return "does_not_end_on_assistant"
    return None


def render_many(conversations: list[list[dict]], tok: Tokenizer) -> list[tuple[list[int], list[bool]]]:
    """Render validated conversations to (ids, mask); mask[t] is True where ids[t] is trained.
    Worked example, `[user: "Hi", assistant: "Yo"]`:
        ids   <|user|> Hi <|end|> <|assistant|> Yo <|end|>
        mask    0      0    0         0          1    1
    Contents go through encode_batch together (fast); markers are added as ids, never parsed from text."""
    contents = [m["content"] for conv in conversations for m in conv]
    encoded = tok.encode_batch(contents, add_special_tokens=False) if contents else []
    end = tok.token_to_id(END)
    marker = {role: tok.token_to_id(t) for role, t in ROLES.items()}
    out, k = [], 0
    for conv in conversations:
        ids, mask = [], []
        for m in conv:
            content = encoded[k].ids
            k += 1
            trained = m["role"] == "assistant"
            ids += [marker[m["role"]], *content, end]
            mask += [False] + [trained] * (len(content) + 1)
        out.append((ids, mask))
    return out


def render(conversation: list[dict], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    return render_many([conversation], tok)[0]


def render_prompt(messages: list[dict], tok: Tokenizer) -> list[int]:
    """A prompt for generation: the conversation rendered up to and including <|assistant|>."""
    ids = render(messages, tok)[0] if messages else []
    return ids + [tok.token_to_id(ASSISTANT)]


def render_text(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The rendered conversation as text, as the exported Jinja template writes it."""
    text = "".join(f"{ROLES[m['role']]}{m['content']}{END}" for m in messages)
    return text + (ASSISTANT if add_generation_prompt else "")


def labels_from(ids: list[int], mask: list[bool]) -> list[int]:
    return [i if m else IGNORE_INDEX for i, m in zip(ids, mask)]


@dataclasses.dataclass
class RenderConfig:
    on_error: str = "fail"  # a malformed row: fail (file:line: reason) | skip (dropped and counted by reason)

    def __post_init__(self):
        if self.on_error not in ("fail", "skip"):
            raise ValueError(f"render.on_error must be 'fail' or 'skip', got {self.on_error!r}")


def read_conversations(path: str, on_error: str) -> tuple[list[list[dict]], list[int], dict[str, int], int]:
    """JSONL rows {"messages": [...]} -> (conversations, 0-based source lines, dropped count by reason,
    rows read). A bad row raises `file:line: reason` or, with on_error='skip', is counted."""
    conversations, rows, dropped, n_read = [], [], {}, 0
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f):
            n_read += 1
            try:
                row = json.loads(line)
                reason = validate(row.get("messages")) if isinstance(row, dict) else "row_not_an_object"
            except json.JSONDecodeError:
                reason = "invalid_json"
            if reason is None:
                conversations.append(row["messages"])
                rows.append(line_no)
            elif on_error == "fail":
                raise ValueError(f"{path}:{line_no + 1}: {reason}")
            else:
                dropped[reason] = dropped.get(reason, 0) + 1
    return conversations, rows, dropped, n_read


def render_report(rendered: list[tuple[list[int], list[bool]]], tok: Tokenizer, n_read: int,
                  dropped: dict[str, int]) -> dict:
    """Masking statistics, tracked as DVC metrics so a masking regression shows in `dvc metrics diff`.
    The assistant <|end|> count walks the ids (role markers), independently of the mask it checks."""
    end, assistant = tok.token_to_id(END), tok.token_to_id(ASSISTANT)
    markers = {tok.token_to_id(t) for t in ROLES.values()}
    tokens = trained = assistant_ends = assistant_ends_trained = 0
    for ids, mask in rendered:
        tokens += len(ids)
        trained += sum(mask)
        role = None
        for i, m in zip(ids, mask):
            if i in markers:
                role = i
            elif i == end and role == assistant:
                assistant_ends += 1
                assistant_ends_trained += m
    return {
        "rows_read": n_read, "rows_kept": len(rendered), "rows_dropped": sum(dropped.values()),
        "dropped": dict(sorted(dropped.items())), "tokens": tokens, "trained_tokens": trained,
        "trained_fraction": trained / max(1, tokens),
        "assistant_end_trained_fraction": assistant_ends_trained / max(1, assistant_ends),
        "end_share_of_trained": assistant_ends_trained / max(1, trained),
    }


def render_split(path: str, tok: Tokenizer, cfg: RenderConfig, out: str) -> dict:
    """One JSONL file -> parquet of (input_ids, labels, source_row); returns its masking report."""
    from pipeline.pack import write_rendered

    conversations, rows, dropped, n_read = read_conversations(path, cfg.on_error)
    rendered = render_many(conversations, tok)
    write_rendered(out, [ids for ids, _ in rendered], [labels_from(ids, m) for ids, m in rendered], rows)
    return render_report(rendered, tok, n_read, dropped)


if __name__ == "__main__":  # `python -m pipeline.chat MODEL_DIR`: the terminal chat of pipeline/chat_cli.py
    from pipeline.chat_cli import main

    main()
