"""The chat format, in one place: chat formats (special tokens and turn layout), `render` (ids + loss mask) for
training, evaluation and chat, and the Jinja template exported with the model, which renders the same text.

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
from typing import NamedTuple

import numpy as np
from tokenizers import Tokenizer

from pipeline.common import UserError
from pipeline.config import CHAT_FORMATS, TRAIN_ON
from pipeline.model_template import OwnTemplate, Row, Unlocatable

PAD, USER, ASSISTANT, SYSTEM, END, TOOL = "<|pad|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>", "<|tool|>"
SPECIAL_TOKENS = [PAD, USER, ASSISTANT, SYSTEM, END, TOOL]  # ids 0..5, in this order; 0..4 are required
REQUIRED_TOKENS = SPECIAL_TOKENS[:5]  # tokenizers made before the tool role have no <|tool|>: fine without tools
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}


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
assert tuple(FORMATS) == CHAT_FORMATS, "pipeline/config.py names the formats defined here"


@dataclasses.dataclass(frozen=True)
class TemplateFormat:
    """A model's own Jinja chat template as a chat format (tokenizer.chat_format: template), with the attributes of
    ChatFormat that describe a format to its users: its end token, the text a role's turn begins with."""
    own: OwnTemplate
    name: str = "template"

    @property
    def end(self) -> str:
        return self.own.ends[0]

    def header(self, role: str) -> str:
        return self.own.header_text(role)

    def describe(self) -> str:
        return "the model's own chat template (the Jinja `chat_template` of its tokenizer_config.json)"


def _has_special(tok: Tokenizer, text: str) -> bool:
    i = tok.token_to_id(text)
    return i is not None and text in {t.content for t in tok.get_added_tokens_decoder().values()}


def chat_format(tok: Tokenizer) -> ChatFormat | TemplateFormat:
    """The format a tokenizer speaks: the model's own template when load_tokenizer attached one (`own_template`),
    else from its special tokens: markers when it has <|user|> <|assistant|> <|end|>, chatml when it has
    <|im_start|> <|im_end|>."""
    own = getattr(tok, "own_template", None)
    return TemplateFormat(own) if own is not None else _detect(tok)


@functools.lru_cache(maxsize=32)
def _detect(tok: Tokenizer) -> ChatFormat:
    for fmt in FORMATS.values():
        if all(_has_special(tok, t) for t in fmt.required):
            return fmt
    raise UserError("the tokenizer speaks no known chat format: it needs <|user|> <|assistant|> <|system|> <|end|> "
                    "<|pad|> (markers) or <|im_start|> <|im_end|> (chatml) as single special tokens; use a model "
                    "whose tokenizer has them, or let the tokenizer stage train one (base.init_from empty)")


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

    @property
    def ends(self) -> list[int]:
        """Every id that ends an answer (generation stops at any of them)."""
        return [self.end]

    def header_ids(self, role: str) -> list[int]:
        if self.lead[role] is None:
            raise UserError(f"the tokenizer has no {self.fmt.header(role).strip()} marker (made before the tool "
                             "role); retrain it (the tokenizer stage) to use tool turns")
        return self.lead[role] + self.tail_ids[role]

    def starts(self, ids: np.ndarray, role: str) -> np.ndarray:
        """Positions in `ids` where a turn of `role` begins (its key ids match there)."""
        return find(ids, self.key[role])


def find(ids: np.ndarray, key: list[int] | None) -> np.ndarray:
    """Positions in `ids` where the ids `key` begin."""
    if not key or len(ids) < len(key):
        return np.zeros(0, np.int64)
    hit = np.ones(len(ids) - len(key) + 1, bool)
    for j, k in enumerate(key):
        hit &= ids[j : len(ids) - len(key) + 1 + j] == k
    return np.flatnonzero(hit)


@dataclasses.dataclass
class TemplateLayout:
    """A model's own template bound to its tokenizer's ids: its end ids, padding, and the ids a role's turn begins
    with (read from renderings; empty where the template writes none)."""
    fmt: TemplateFormat
    ends: list[int]
    pad: int
    headers: dict  # role -> ids
    after_end: tuple = ()

    @property
    def end(self) -> int:
        return self.ends[0]

    def header_ids(self, role: str) -> list[int]:
        return self.headers[role]

    def starts(self, ids: np.ndarray, role: str) -> np.ndarray:
        return find(ids, self.headers[role])


def text_tokenizer(tok: Tokenizer) -> Tokenizer:
    """The tokenizer that encodes a template's rendered text: special tokens written by the template (BOS, headers,
    end tokens) are parsed as such. Content never holds one: own_rows refuses such a conversation."""
    parsing = getattr(tok, "parsing", None)
    if parsing is None:
        parsing = tok.parsing = Tokenizer.from_str(tok.to_str())
        parsing.encode_special_tokens = False
    return parsing


@functools.lru_cache(maxsize=32)
def layout(tok: Tokenizer, fmt: ChatFormat | None = None) -> Layout | TemplateLayout:
    fmt = fmt or chat_format(tok)
    if isinstance(fmt, TemplateFormat):
        encode = lambda text: text_tokenizer(tok).encode(text, add_special_tokens=False).ids  # noqa: E731
        headers = {}
        for role in ROLES:
            try:
                headers[role] = encode(fmt.header(role)) if role in ("user", "assistant") else []
            except Unlocatable:
                headers[role] = []
        ends = [tok.token_to_id(e) for e in fmt.own.ends]
        pad = tok.token_to_id(dict(fmt.own.variables).get("pad_token") or "") or ends[0]
        return TemplateLayout(fmt, ends, pad, headers)
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


def chat_template(fmt: ChatFormat | TemplateFormat = MARKERS) -> str:
    """The Jinja chat template that writes `render_text` for this format (transformers' apply_chat_template): ours,
    or the model's own, unchanged."""
    if isinstance(fmt, TemplateFormat):
        return fmt.own.source
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


class Rendered(NamedTuple):
    """Rendered rows end to end: row k is ids[offsets[k]:offsets[k+1]], mask[t] True where ids[t] is trained; each
    row comes from conversation conv[k] of the input (a model's own template may make several rows of one); roles
    holds each token's role (an index into ROLES) where the renderer knows it (own templates), else None."""
    ids: np.ndarray  # int32
    mask: np.ndarray  # bool
    offsets: np.ndarray  # int64
    conv: np.ndarray  # int64
    roles: np.ndarray | None  # int8


def own_rows(conversation: list[dict], tok: Tokenizer, train_on: str = "all_assistant") -> list[Row]:
    """The training rows of a conversation under the model's own template (pipeline/model_template.py); raises
    Unlocatable with the reason when its answers cannot be placed, or when a message holds the exact text of a special
    token (the whole rendered text is parsed for them, so it would become that token)."""
    specials = [t.content for t in tok.get_added_tokens_decoder().values() if t.special]
    for m in conversation:
        text = (m.get("content") or "") + json.dumps(m.get("tool_calls") or "", ensure_ascii=False)
        if any(s in text for s in specials):
            raise Unlocatable("special_token_in_content")
    own = tok.own_template
    if train_on == "everything":  # every message's text but tool results: the whole rendering, one row
        full = own.render(conversation)
        starts = own.message_starts(full, [own.render(conversation[: j + 1]) for j in range(len(conversation))])
        spans = [(a, b) for a, b, m in zip(starts, starts[1:] + [len(full)], conversation) if m["role"] != "tool"]
        return [Row(full, spans, starts, [m["role"] for m in conversation], len(full))]
    return own.rows(conversation, _trained_turns(conversation, train_on))


def tokenize_rows(rows: list[list[Row]], tok: Tokenizer) -> Rendered:
    """Rows of own_rows (per conversation) -> Rendered: each row's text encoded once, special tokens parsed; a token
    is trained when it starts inside a trained span, and belongs to the message whose text it starts in."""
    flat = [(k, row) for k, conv_rows in enumerate(rows) for row in conv_rows]
    encoded = text_tokenizer(tok).encode_batch([row.text for _, row in flat], add_special_tokens=False) if flat else []
    role_code = {role: i for i, role in enumerate(ROLES)}
    ids, masks, roles, offsets = [], [], [], [0]
    for (_, row), enc in zip(flat, encoded):
        start = np.array([a for a, _ in enc.offsets], np.int64)
        mask = np.zeros(len(start), np.bool_)
        for a, b in row.trained:
            mask |= (start >= a) & (start < b)
        message = np.searchsorted(np.array(row.message_starts), start, side="right") - 1
        role = np.array([role_code[r] for r in row.roles], np.int8)[np.maximum(message, 0)]
        roles.append(np.where(start >= row.closing_at, -1, role).astype(np.int8))  # -1: after every message
        ids.append(np.array(enc.ids, np.int32))
        masks.append(mask)
        offsets.append(offsets[-1] + len(enc.ids))
    cat = lambda parts, dtype: np.concatenate(parts) if parts else np.zeros(0, dtype)  # noqa: E731
    return Rendered(cat(ids, np.int32), cat(masks, np.bool_), np.array(offsets, np.int64),
                    np.array([k for k, _ in flat], np.int64), cat(roles, np.int8))


def render_flat(conversations: list[list[dict]], tok: Tokenizer, train_on: str = "all_assistant") -> Rendered:
    """Validated conversations -> Rendered rows, all end to end. Our formats: one row a conversation, turn texts
    through one encode_batch call; a model's own template: own_rows, then tokenize_rows."""
    assert train_on in TRAIN_ON, f"train_on must be one of {TRAIN_ON}, got {train_on!r}"
    if getattr(tok, "own_template", None) is not None:
        try:
            return tokenize_rows([own_rows(c, tok, train_on) for c in conversations], tok)
        except Unlocatable as e:
            raise UserError(f"the model's chat template: {e}") from None
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
    return Rendered(np.array(ids, np.int32), mask, np.array(offsets, np.int64), np.arange(len(conversations)), None)


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
    ids, mask, off, conv, _ = render_flat(conversations, tok, train_on)
    rows = [(ids[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(off[:-1], off[1:])]
    return [rows[k] for k in np.flatnonzero(np.r_[conv[1:] != conv[:-1], True])] if len(rows) else rows  # the last


def render(conversation: list[dict], tok: Tokenizer, train_on: str = "all_assistant") -> tuple[list[int], list[bool]]:
    """One conversation rendered (with a template that rewrites history, its last row: the whole conversation as
    the last answer is served)."""
    return render_many([conversation], tok, train_on)[0]



def render_prompt(messages: list[dict], tok: Tokenizer) -> list[int]:
    """A prompt for generation: the conversation rendered up to and including the assistant's header (a model's own
    template: rendered with add_generation_prompt, as apply_chat_template(..., tokenize=True) gives it)."""
    own = getattr(tok, "own_template", None)
    if own is not None:
        try:
            text = own.prompt(messages)
        except Unlocatable as e:
            raise UserError(f"the model's chat template: {e}") from None
        return text_tokenizer(tok).encode(text, add_special_tokens=False).ids
    ids = render(messages, tok)[0] if messages else []
    return ids + layout(tok).header_ids("assistant")


def render_text(messages: list[dict], add_generation_prompt: bool = False,
                fmt: ChatFormat | TemplateFormat = MARKERS) -> str:
    """The rendered conversation as text, as the exported Jinja template writes it."""
    if isinstance(fmt, TemplateFormat):
        return fmt.own.render(messages, add_generation_prompt)
    text = "".join(f"{fmt.header(m['role'])}{turn_text(m)}{fmt.end}{fmt.after_end}" for m in messages)
    return text + (fmt.header("assistant") if add_generation_prompt else "")

