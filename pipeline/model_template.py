"""A model's own chat template: the Jinja `chat_template` of its tokenizer_config.json, rendered as transformers
renders it (a sandbox with the same filters and globals), and where each message lands in the rendered text, which
is what the training mask is derived from (pipeline/template.py turns it into ids and masks).

Where a message lands is read from the template itself, never from a per-family table: the text a conversation
renders to with messages 0..j is the prefix of the whole rendering that ends with message j, and the prompt for
answer k (messages 0..k-1 with the generation prompt) is the prefix that ends where answer k begins. The trained
text of answer k runs from there to the end of the first end-of-turn token after it, inclusive; headers, role names,
BOS, injected system prompts and date lines, other turns, and the newline after the end token are not trained."""
import dataclasses
import functools
import json
import re

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.common import UserError

FIXED_DATE = "26 Jul 2024"  # strftime_now's answer: templates that write today's date render the same every day
EMPTY_THINK = re.compile(r"(<think>)?\s*</think>\s*")  # an empty thinking block (its opening may end the prompt)
OPENED = re.compile(r"<think>\s*$")
SENTINEL = "\ue000answer\ue000"  # no whitespace: templates that trim content keep it whole


class _Generation(jinja2.ext.Extension):
    """The {% generation %} ... {% endgeneration %} tag some templates mark answers with: its body, as written."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    import datetime

    return datetime.datetime.strptime(FIXED_DATE, "%d %b %Y").strftime(fmt)


@functools.lru_cache(maxsize=8)
def compile_template(text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise, strftime_now=_strftime_now)
    return env.from_string(text)


class Unlocatable(Exception):
    """An answer the template's output does not let us place (reason: snake_case; detail: the template's own
    message, when it refused the conversation with raise_exception)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass
class Row:
    """One rendered training row: its text, the character spans of trained text, and the message each character
    belongs to (an index into the conversation, by the start of each message's span)."""
    text: str
    trained: list[tuple[int, int]]
    message_starts: list[int]  # message j's text begins at message_starts[j] (its header, injected text included)
    roles: list[str]
    closing_at: int  # where the text the template writes after the last message begins (len(text): none)


@dataclasses.dataclass(frozen=True)
class OwnTemplate:
    """A model's chat template with the special-token strings its variables name, and its end-of-turn tokens."""
    source: str
    variables: tuple  # (("bos_token", "<s>"), ("eos_token", "</s>"), ...)
    ends: tuple[str, ...]  # the end-of-turn token strings (the model's eos ids), the primary one first
    thinking: str = "context"  # tokenizer.thinking: an empty <think></think> before an answer is context | trained

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        try:
            return compile_template(self.source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        tools=None, documents=None, **dict(self.variables))
        except jinja2.exceptions.TemplateError as e:
            raise Unlocatable("template_refused", str(e)) from None

    def answer_start(self, text: str, start: int) -> int:
        """Where the trained text of an answer whose prompt ends at `start` begins: there, or under thinking: context
        after an empty thinking block the template wrote first (Qwen3 writes `<think>\\n\\n</think>\\n\\n` before an
        answer with no reasoning; Qwen3.5's prompt opens the block itself): context the model is given, not an
        answer it learns to write."""
        m = EMPTY_THINK.match(text, start)
        if self.thinking == "context" and m and (m.group(1) or OPENED.search(text, 0, start)):
            return m.end()
        return start

    def prompt(self, messages: list[dict]) -> str:
        """The generation prompt after `messages`: the template's (add_generation_prompt), and under thinking: context
        with the empty thinking block the template writes before an answer, as that answer was trained."""
        text = self.render(messages, add_generation_prompt=True)
        if self.thinking != "context":
            return text
        try:
            probe = self.render(messages + [{"role": "assistant", "content": SENTINEL}])
        except Unlocatable:
            return text
        at, start = probe.find(SENTINEL), self.answer_start(probe, len(text))
        return probe[:start] if probe.startswith(text) and len(text) < start <= at else text

    def _end_after(self, text: str, start: int) -> int:
        """The end of the first end-of-turn token at or after `start` in text."""
        hits = [(text.find(e, start), e) for e in self.ends]
        hits = [(i, e) for i, e in hits if i >= 0]
        if not hits:
            raise Unlocatable("no_end_token_after_answer")
        i, e = min(hits)
        return i + len(e)

    def closing(self) -> str:
        """What the template writes after the last message, and not after others (Phi-3 closes a rendering with
        eos): a rendering of a leading part of a conversation ends with it, where the whole goes on instead."""
        return _closing(self)

    def _closing_at(self, text: str) -> int:
        close = self.closing()
        return len(text) - len(close) if close and text.endswith(close) else len(text)

    def _end_in(self, full: str, part: str) -> int | None:
        """Where the rendering `part` of a leading part of the conversation ends inside the rendering `full`."""
        if full.startswith(part):
            return len(part)
        close = self.closing()
        if close and part.endswith(close) and full.startswith(part[: len(part) - len(close)]):
            return len(part) - len(close)
        return None

    def rows(self, conversation: list[dict], trained_turns: list[bool]) -> list[Row]:
        """The training rows of a conversation. One row, the whole rendering, when every leading part of the
        conversation renders as a leading part of it (most templates); otherwise (a template that rewrites history, as
        Qwen3 drops the reasoning of earlier answers) one row per trained answer: its prompt as the template renders
        it at that point of the conversation, and that answer. Every answer is trained on the text it is served."""
        full = self.render(conversation)
        parts = [self.render(conversation[: j + 1]) for j in range(len(conversation))]
        # an answer that opens the conversation has no prompt (real dumps hold such cut-off conversations): context
        answers = {k: self.render(conversation[:k], add_generation_prompt=True)
                   for k, m in enumerate(conversation) if m["role"] == "assistant" and trained_turns[k] and k > 0}
        if not answers:
            raise Unlocatable("no_answer_after_a_prompt")
        for k, prompt in answers.items():
            if self._end_in(parts[k], prompt) != len(prompt):
                raise Unlocatable("answer_not_after_its_prompt")
        roles = [m["role"] for m in conversation]
        if all(self._end_in(full, parts[k]) is not None and self._end_in(full, prompt) == len(prompt)
               for k, prompt in answers.items()):
            trained = [(self.answer_start(full, len(prompt)), self._end_after(full, len(prompt)))
                       for prompt in answers.values()]
            return [Row(full, trained, self.message_starts(full, parts), roles, self._closing_at(full))]
        return [Row(parts[k], [(self.answer_start(parts[k], len(prompt)), self._end_after(parts[k], len(prompt)))],
                    self.message_starts(parts[k], parts[: k + 1]), roles[: k + 1], self._closing_at(parts[k]))
                for k, prompt in answers.items()]

    def message_starts(self, text: str, parts: list[str]) -> list[int]:
        """Where each message's text begins in `text`, given the renderings `parts` of the leading parts of its
        conversation (messages 0..j): where the part before it ends. A part the template writes otherwise than as a
        leading part of the whole (Qwen2.5 closes a group of tool results only after the last of them; Qwen3 drops
        earlier reasoning) is placed where the two first differ."""
        starts = [0]
        for part in parts[:-1]:
            end = self._end_in(text, part)
            if end is None:
                end = next((i for i, (a, b) in enumerate(zip(text, part)) if a != b), min(len(text), len(part)))
            starts.append(max(starts[-1], end))
        return starts

    def header_text(self, role: str) -> str:
        """The text a turn of `role` begins with, read from renderings (empty where the template writes none, as
        Mistral's before an answer): the generation prompt for the assistant, the text before a user's content."""
        if role == "assistant":
            ask = [{"role": "user", "content": "a"}]
            asking = self.prompt(ask)
            return asking[self._end_in(asking, self.render(ask)) or len(asking):]
        sentinel = "\ue000sentinel\ue000"  # no whitespace: templates that trim content keep it whole
        before = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
        text = self.render(before + [{"role": role, "content": sentinel}])
        return text[self._end_in(text, self.render(before)) or 0: text.index(sentinel)]


@functools.lru_cache(maxsize=8)
def _closing(own: OwnTemplate) -> str:
    probe = [{"role": "user", "content": "a"}]
    plain, asking = own.render(probe), own.render(probe, add_generation_prompt=True)
    i = 0
    while i < min(len(plain), len(asking)) and plain[i] == asking[i]:
        i += 1
    for token in set(own.ends) | {v for _, v in own.variables}:  # "<|" of "<|endoftext|>" vs "<|assistant|>":
        at = plain.find(token, max(0, i - len(token) + 1))  # never cut inside a token the template writes whole
        if 0 <= at < i:
            i = at
    return plain[i:]


def own_template(tokenizer_config: dict, end_tokens: list[str], where: str, thinking: str = "context"
                 ) -> OwnTemplate:
    """The template of a tokenizer_config.json (a string, or the `default` of a list of named ones)."""
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        source = next((t["template"] for t in source if t.get("name") == "default"), None)
    if not isinstance(source, str) or not source:
        raise UserError(f"{where}: no chat_template; chat_format template needs the model's own template (its "
                        "tokenizer_config.json); use markers or chatml")
    variables = {k: v if isinstance(v, str) else (v or {}).get("content")
                 for k, v in tokenizer_config.items() if k.endswith("_token")}
    return OwnTemplate(source, tuple(sorted((k, v) for k, v in variables.items() if v)),
                       tuple(dict.fromkeys(end_tokens)), thinking)
