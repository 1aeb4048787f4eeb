"""Reading conversations as they come: JSONL, JSON arrays and parquet files (or a folder of them, one source per
file), with rows in the `messages` form, as `prompt`/`completion` pairs or ShareGPT `conversations`.

Every row is normalised to a list of messages {"role", "content"[, "tool_calls"][, "tool_call_id"]} and validated.
A row that cannot be used gets a reason (a short snake_case string); nothing is repaired or altered. Reading is
streamed: JSONL line by line, parquet batch by batch (a JSON array is parsed whole, as JSON requires)."""
import json
import re
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.common import UserError

FORMATS = (".jsonl", ".json", ".parquet")
ROLE_NAMES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "tool": "tool", "observation": "tool",
                  # real ShareGPT dumps also hold the answers of other chat assistants: assistant turns all the same
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
MESSAGE_KEYS = {"role", "content", "tool_calls", "tool_call_id", "name"}


class EmptyFile(Exception):
    """A file with no rows at all."""


class BadRow(Exception):
    """A row that cannot be used; `reason` is its snake_case reason, `detail` what a message adds to it."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def source_files(path: str) -> list[Path]:
    """A file, or the supported files of a folder (sorted; each is one source, named by its stem)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix in FORMATS and not f.name.startswith("."))
        if not files:
            raise UserError(f"{path}: no {'/'.join(FORMATS)} files in this folder")
        stems = [f.stem for f in files]
        if len(set(stems)) != len(stems):
            raise UserError(f"{path}: two files share a name ({stems}); source names must be unique")
        return files
    if not p.exists():
        raise UserError(f"{path}: no such file or folder; fix the path in params.yaml (data.*)")
    if p.suffix not in FORMATS:
        raise UserError(f"{path}: unsupported format {p.suffix!r}; use one of {FORMATS}")
    return [p]


def _raw_rows(path: Path):
    """(1-based row number, parsed row or BadRow) in file order. An empty file raises ValueError."""
    if path.suffix == ".parquet":
        f = pq.ParquetFile(path)
        if f.metadata.num_rows == 0:
            raise EmptyFile(f"{path}: empty file")
        n = 0
        for batch in f.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                n += 1
                yield n, row
        return
    if path.suffix == ".json":
        data = path.read_bytes()
        if not data.strip():
            raise EmptyFile(f"{path}: empty file")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path}:1: invalid_utf8") from None
        if text.startswith("\ufeff"):
            raise UserError(f"{path}:1: byte_order_mark (save the file as UTF-8 without a BOM)")
        yield from _array_rows(path, text)
        return
    empty = True
    with open(path, "rb") as f:
        for n, line in enumerate(f, start=1):
            empty = False
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                yield n, BadRow("invalid_utf8")
                continue
            if n == 1 and text.startswith("\ufeff"):
                yield n, BadRow("byte_order_mark")
            elif not text.strip():
                yield n, BadRow("blank_line")
            else:
                try:
                    yield n, json.loads(text)  # a CRLF line ending is JSON whitespace: the row is unchanged
                except json.JSONDecodeError:
                    yield n, BadRow("invalid_json")
    if empty:
        raise EmptyFile(f"{path}: empty file")


_SPACE = re.compile(r"\s*")


def _array_rows(path: Path, text: str):
    """(1-based row, parsed row or BadRow) of a JSON array, parsed one row at a time (the text is held once, never
    the whole array of rows as well). A file cut off inside the array (a download that stopped, a dump cut at a size
    limit) keeps every complete row before the cut and yields what follows as one BadRow `truncated_json`; a row
    that does not parse mid-file yields the rest as one `invalid_json` (the array cannot be resynchronised)."""
    decoder, i = json.JSONDecoder(), _SPACE.match(text).end()
    if not text.startswith("[", i):
        raise UserError(f"{path}:1: json_not_an_array (a .json file holds one array of rows)")
    closed = text.rstrip().endswith("]")
    n, i = 0, _SPACE.match(text, i + 1).end()
    while not text.startswith("]", i):
        try:
            row, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            line = text.count("\n", 0, i) + 1
            if closed:
                yield n + 1, BadRow("invalid_json", f"line {line}: {e.msg}; the rest of the array is not read")
            else:
                yield n + 1, BadRow("truncated_json", f"line {line}: the file ends inside row {n + 1}, cut off")
            return
        n += 1
        yield n, row
        i = _SPACE.match(text, end).end()
        if text.startswith(",", i):
            i = _SPACE.match(text, i + 1).end()
        elif not text.startswith("]", i):
            reason = "invalid_json" if closed else "truncated_json"
            yield n + 1, BadRow(reason, f"line {text.count(chr(10), 0, i) + 1}: no , or ] after row {n}")
            return
    if text[i + 1 :].strip():
        yield n + 1, BadRow("invalid_json", "text after the array's closing ]")


def _present(m: dict) -> dict:
    """A message without keys whose value is null (parquet writes absent struct fields as nulls)."""
    if None not in m.values():  # the common case: nothing to drop, no copy
        return m
    return {k: v for k, v in m.items() if v is not None or k == "content"}


def _turns(value, where: str) -> list:
    if isinstance(value, str):
        return [{"role": where, "content": value}]
    if isinstance(value, list):
        return value
    raise BadRow(f"{where}_not_a_string_or_list")


def normalise(row) -> list[dict]:
    """A row in any supported form -> its messages (not yet validated)."""
    if not isinstance(row, dict):
        raise BadRow("row_not_an_object")
    forms = [k for k in ("messages", "conversations", "prompt") if row.get(k) is not None]
    if len(forms) > 1:
        raise BadRow("ambiguous_row_has_" + "_and_".join(forms))
    if not forms:
        raise BadRow("no_messages_conversations_or_prompt")
    if forms[0] == "messages":
        msgs = row["messages"]
        if not isinstance(msgs, list):
            raise BadRow("messages_not_a_list")
        return [_present(m) if isinstance(m, dict) else m for m in msgs]
    if forms[0] == "conversations":
        turns = row["conversations"]
        if not isinstance(turns, list):
            raise BadRow("conversations_not_a_list")
        out = []
        for t in turns:
            if not isinstance(t, dict) or t.get("from") is None or "value" not in t:
                raise BadRow("sharegpt_turn_not_from_value")
            if t["from"] not in SHAREGPT_ROLES:
                raise BadRow("unknown_role")
            out.append({"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]})
        return out
    if row.get("completion") is None:
        raise BadRow("prompt_without_completion")
    prompt, completion = _turns(row["prompt"], "user"), _turns(row["completion"], "assistant")
    return [_present(m) if isinstance(m, dict) else m for m in prompt + completion]


def _check_tool_calls(calls) -> None:
    if not isinstance(calls, list) or not calls:
        raise BadRow("tool_calls_not_a_nonempty_list")
    for c in calls:
        fn = c.get("function", c) if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRow("tool_call_without_name")
        if not isinstance(fn.get("arguments", {}), (dict, str)):
            raise BadRow("tool_call_arguments_not_object_or_string")


def validate(messages) -> str | None:
    """Why a conversation cannot be trained on, or None. Accepted: an optional system turn first, then user,
    assistant and tool turns; an assistant turn may call tools (content may then be empty), a tool turn answers a
    tool call; at least one assistant turn, and the conversation ends on an assistant turn."""
    if not isinstance(messages, list) or not messages:
        return "messages_not_a_nonempty_list"
    prev = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return "message_not_an_object"
        if "role" not in m or m["role"] is None:
            return "missing_role"
        if m["role"] not in ROLE_NAMES:
            return "unknown_role"
        if not MESSAGE_KEYS.issuperset(m):
            return "unknown_message_key"
        if "tool_calls" in m:
            if m["role"] != "assistant":
                return "tool_calls_not_on_assistant"
            try:
                _check_tool_calls(m["tool_calls"])
            except BadRow as e:
                return e.reason
        content = m.get("content")
        if content is not None and not isinstance(content, str):
            return "content_not_a_string"
        if (content is None or not content or content.isspace()) and "tool_calls" not in m:  # isspace: as strip()
            return "content_null_or_empty"
        if m["role"] == "system" and i > 0:
            return "system_not_first"
        if m["role"] == "tool" and not (prev == "tool" or (prev == "assistant" and "tool_calls" in messages[i - 1])):
            return "tool_result_without_call"
        prev = m["role"]
    if not any(m["role"] == "assistant" for m in messages):
        return "no_assistant_turn"
    if messages[-1]["role"] != "assistant":
        return f"ends_on_{messages[-1]['role']}_turn"
    return None


def read_rows(path: str):
    """Stream every row of every source under `path`: (source, 0-based row, messages or None, reason or None,
    detail). An empty file yields one (source, -1, None, "empty_file", ""): it holds no row to count, but is
    reported."""
    for file in source_files(path):
        try:
            yield from _rows_of(file)
        except EmptyFile:
            yield file.stem, -1, None, "empty_file", ""


def _rows_of(file: Path):
    for n, row in _raw_rows(file):
        reason, detail, messages = (row.reason, row.detail, None) if isinstance(row, BadRow) else (None, "", None)
        if reason is None:
            try:
                messages = normalise(row)
                reason = validate(messages)
            except BadRow as e:
                reason = e.reason
        yield file.stem, n - 1, messages, reason, detail


def location(path: str, source: str, row: int) -> str:
    """`file:line` of a row (1-based) for messages."""
    files = {f.stem: f for f in source_files(path)}
    return f"{files.get(source, path)}:{row + 1}"


def trim_unpaired(messages: list[dict]) -> list[dict]:
    """The conversation without its unpaired turns: answers before the first user turn (no question: real dumps hold
    such cut-off conversations) and the user or tool turns after the last answer (no answer). A system turn stays."""
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    system = messages[:1] if roles[:1] == ["system"] else []
    first_user = next((i for i, r in enumerate(roles) if r == "user"), len(roles))
    last = max((i for i, r in enumerate(roles) if r == "assistant"), default=-1)
    return system + messages[first_user : last + 1]


def iter_conversations(path: str, on_error: str, counts: dict | None = None, unpaired: str = "drop",
                       prepare=None):
    """Stream (source, 0-based row, messages) of the valid rows under `path` (a file or a folder of sources).
    A bad row raises `file:line: reason` (on_error='fail') or is counted in `counts` (on_error='skip'):
    counts[source] = {"rows_read", "rows_kept", "rows_dropped", "dropped": {reason: n}, "empty_files",
    "trimmed_turns"}. A conversation that ends on a user (or tool) turn is a bad row (`ends_on_user_turn`); with
    unpaired='trim' every conversation is kept without its unpaired turns (trim_unpaired), the turns cut counted as
    trimmed_turns, and one with no answer after a user turn is a bad row (`no_answer_after_a_user_turn`).
    prepare(messages), when given, is yielded instead of the messages; a BadRow it raises makes the row a bad one
    (the render stage renders with a model's own template there, which can refuse a conversation)."""
    counts = {} if counts is None else counts
    fix = "fix the row, or set render.on_error: skip to drop bad rows and count them"
    for source, row, messages, reason, detail in read_rows(path):
        c = counts.setdefault(source, {"rows_read": 0, "rows_kept": 0, "rows_dropped": 0, "dropped": {},
                                       "empty_files": 0, "trimmed_turns": 0})
        if unpaired == "trim" and messages is not None and (reason in ("ends_on_user_turn", "ends_on_tool_turn")
                                                            or reason is None):
            kept = trim_unpaired(messages)
            if len(kept) < len(messages):  # nothing left that pairs a user turn with an answer: a bad row
                reason = validate(kept) and "no_answer_after_a_user_turn"
                if reason is None:
                    c["trimmed_turns"] += len(messages) - len(kept)
                    messages = kept
        if reason == "empty_file":
            if on_error == "fail":
                raise UserError(f"{location(path, source, 0).rsplit(':', 1)[0]}: empty file; {fix}")
            c["empty_files"] += 1
            continue
        c["rows_read"] += 1
        if reason is None and prepare is not None:
            try:
                messages = prepare(messages)
            except BadRow as e:
                reason, detail = e.reason, e.detail
        if reason is None:
            c["rows_kept"] += 1
            yield source, row, messages
        elif on_error == "fail":
            raise UserError(f"{location(path, source, row)}: {reason}{f' ({detail})' if detail else ''}; {fix}")
        else:
            c["rows_dropped"] += 1
            c["dropped"][reason] = c["dropped"].get(reason, 0) + 1


def read_conversations(path: str, on_error: str = "fail") -> list[list[dict]]:
    """All valid conversations under `path`, in order; a bad row raises `file:line: reason` (on_error='fail') or
    is skipped (on_error='skip')."""
    return [messages for _, _, messages in iter_conversations(path, on_error)]

