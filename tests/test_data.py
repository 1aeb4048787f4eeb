"""Formats and bad input: every supported form reads to the same messages; every bad row fails with
file:line: reason or is skipped and counted; rows read = kept + dropped."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import iter_conversations
from pipeline.render import render_split
from tests.conftest import CONVERSATIONS, config

CONV = CONVERSATIONS[2]  # user, assistant, user, assistant
SYS_CONV = CONVERSATIONS[1]  # system, user, assistant


def read(path: str, on_error: str, unpaired: str = "drop"):
    """(conversations, 0-based source rows, dropped count by reason, rows read) of a file or folder."""
    counts: dict = {}
    items = list(iter_conversations(path, on_error, counts, unpaired))
    dropped: dict = {}
    for c in counts.values():
        for reason, n in c["dropped"].items():
            dropped[reason] = dropped.get(reason, 0) + n
    return [m for _, _, m in items], [r for _, r, _ in items], dropped, sum(c["rows_read"] for c in counts.values())


def rows_in(form: str):
    if form == "messages":
        return [{"messages": CONV, "id": 7}, {"messages": SYS_CONV}]
    if form == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return [{"conversations": [{"from": names[m["role"]], "value": m["content"]} for m in c]}
                for c in (CONV, SYS_CONV)]
    return [{"prompt": CONV[:3], "completion": CONV[3:]}, {"prompt": SYS_CONV[:2], "completion": SYS_CONV[2:]}]


def write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows, indent=1))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("form", ["messages", "sharegpt", "prompt_completion"])
def test_every_format_reads_to_the_same_messages(tmp_path, fmt, form):
    path = tmp_path / f"d.{fmt}"
    write(path, rows_in(form), fmt)
    convs, rows, dropped, n_read = read(str(path), "fail")
    assert convs == [CONV, SYS_CONV] and rows == [0, 1] and dropped == {} and n_read == 2


def test_plain_prompt_completion_strings(tmp_path):
    path = tmp_path / "p.jsonl"
    write(path, [{"prompt": "What is 12 + 30?", "completion": "42"}], "jsonl")
    (conv,), _, _, _ = read(str(path), "fail")
    assert conv == [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]


def test_parquet_with_tool_calls_and_null_fields(tmp_path):
    from tests.test_template import TOOL_CONV

    path = tmp_path / "t.parquet"
    pq.write_table(pa.Table.from_pylist([{"messages": TOOL_CONV[:4] + TOOL_CONV[-1:]}]), path)
    (conv,), _, _, _ = read(str(path), "fail")  # structs get null fields; nulls read as absent
    assert conv[2]["tool_calls"][0]["function"]["name"] == "weather" and conv[2]["content"] is None
    assert "tool_calls" not in conv[1] and conv[3]["role"] == "tool"


GOOD = json.dumps({"messages": CONV})
BAD_LINES = [
    ("{not json", "invalid_json"),
    ("[1, 2]", "row_not_an_object"),
    ('{"text": "hello"}', "no_messages_conversations_or_prompt"),
    ('{"messages": "hi"}', "messages_not_a_list"),
    ('{"messages": []}', "messages_not_a_nonempty_list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}', "missing_role"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}', "unknown_role"),
    ('{"messages": [{"role": "user", "content": null}, {"role": "assistant", "content": "b"}]}',
     "content_null_or_empty"),
    ('{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]}',
     "content_null_or_empty"),
    ('{"messages": [{"role": "user", "content": ["a"]}, {"role": "assistant", "content": "b"}]}',
     "content_not_a_string"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}]}', "no_assistant_turn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
     '{"role": "user", "content": "c"}]}', "ends_on_user_turn"),
    ('{"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]}', "unknown_role"),
    ('{"conversations": [{"from": "human"}]}', "sharegpt_turn_not_from_value"),
    ('{"prompt": "a"}', "prompt_without_completion"),
    ('{"prompt": "a", "completion": 5}', "assistant_not_a_string_or_list"),
    ('{"messages": [], "prompt": "a", "completion": "b"}', "ambiguous_row_has_messages_and_prompt"),
    ("", "blank_line"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES)
def test_every_bad_row_fails_with_file_line_reason_or_is_counted(tmp_path, line, reason):
    path = tmp_path / "d.jsonl"
    path.write_text(f"{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(ValueError, match=rf"d\.jsonl:2: {reason}; fix the row, or set render.on_error: skip"):
        read(str(path), "fail")
    convs, rows, dropped, n_read = read(str(path), "skip")
    assert convs == [CONV, CONV] and rows == [0, 2] and dropped == {reason: 1} and n_read == 3


def test_encoding_cases(tmp_path):
    path = tmp_path / "e.jsonl"
    # BOM on the first row, CRLF endings, invalid UTF-8 on row 3
    path.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() + b"\r\n" + GOOD.encode() + b"\r\n" + b'{"messages": "\xff"}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:1: byte_order_mark"):
        read(str(path), "fail")
    convs, rows, dropped, n_read = read(str(path), "skip")
    assert rows == [1] and dropped == {"byte_order_mark": 1, "invalid_utf8": 1} and n_read == 3
    # CRLF alone is a line ending, not a change to the row: the content comes back byte for byte
    crlf = tmp_path / "c.jsonl"
    conv = [{"role": "user", "content": "line one\r\nline two"}, {"role": "assistant", "content": "ok\r\n"}]
    crlf.write_bytes((json.dumps({"messages": conv}) + "\r\n").encode() * 2)
    convs, _, dropped, n_read = read(str(crlf), "fail")
    assert convs == [conv, conv] and n_read == 2


def test_empty_file_and_folder_of_sources(tmp_path, tok):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        read(str(empty), "fail")
    folder = tmp_path / "mix"
    folder.mkdir()
    (folder / "empty.jsonl").write_text("")
    write(folder / "chat.parquet", rows_in("messages"), "parquet")
    write(folder / "share.jsonl", rows_in("sharegpt") + [{"conversations": []}], "jsonl")
    (folder / "notes.txt").write_text("not a source")
    with pytest.raises(ValueError, match="empty file"):
        read(str(folder), "fail")
    counts = {}
    items = list(iter_conversations(str(folder), "skip", counts))
    assert [(s, r) for s, r, _ in items] == [("chat", 0), ("chat", 1), ("share", 0), ("share", 1)]
    assert counts["empty"]["empty_files"] == 1 and counts["share"]["dropped"] == {"messages_not_a_nonempty_list": 1}
    report = render_split(str(folder), tok, config("render", on_error="skip"), str(tmp_path / "r.parquet"))
    assert report["rows_read"] == 5 == report["rows_kept"] + report["rows_dropped"] and report["empty_files"] == 1
    only_empty = tmp_path / "only"
    only_empty.mkdir()
    (only_empty / "a.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no usable conversation"):
        render_split(str(only_empty), tok, config("render", on_error="skip"), str(tmp_path / "x.parquet"))


def test_whole_file_errors(tmp_path):
    obj = tmp_path / "o.json"
    obj.write_text('{"messages": []}')
    with pytest.raises(ValueError, match="json_not_an_array"):
        read(str(obj), "skip")
    with pytest.raises(ValueError, match="unsupported format"):
        read(str(tmp_path / "x.csv"), "skip") if (tmp_path / "x.csv").write_text("a") else None
    with pytest.raises(ValueError, match="no such file"):
        read(str(tmp_path / "missing.jsonl"), "skip")


def test_a_json_array_cut_off_or_broken_keeps_its_complete_rows(tmp_path):
    """A .json array is read a row at a time: cut off mid-file (a download that stopped, as the real ShareGPT dump
    is), its complete rows are kept under skip and the tail is one dropped row, `truncated_json`; under fail the
    message names the file, the line, and says it is cut off. A row broken mid-file ends the array the same way,
    as `invalid_json` (the rest cannot be resynchronised)."""
    rows = [json.dumps({"messages": CONV}), json.dumps({"messages": SYS_CONV})]
    text = "[\n  " + ",\n  ".join(rows) + ",\n  " + json.dumps({"messages": CONV})[:40]  # cut inside a string
    cut = tmp_path / "cut.json"
    cut.write_text(text)
    convs, kept, dropped, n_read = read(str(cut), "skip")
    assert convs == [CONV, SYS_CONV] and kept == [0, 1] and dropped == {"truncated_json": 1} and n_read == 3
    with pytest.raises(ValueError, match=r"cut\.json:3: truncated_json \(line 4: the file ends inside row 3, cut "
                                         r"off\); fix the row"):
        read(str(cut), "fail")
    broken = tmp_path / "b.json"
    broken.write_text("[" + rows[0] + ",\n oops,\n" + rows[1] + "]")
    convs, _, dropped, n_read = read(str(broken), "skip")
    assert convs == [CONV] and dropped == {"invalid_json": 1} and n_read == 2
    with pytest.raises(ValueError, match=r"b\.json:2: invalid_json \(line 2: Expecting value; the rest of the array "
                                         r"is not read\)"):
        read(str(broken), "fail")
    whole = tmp_path / "w.json"
    whole.write_text(json.dumps([{"messages": CONV}, {"messages": SYS_CONV}], indent=2))
    assert read(str(whole), "fail")[0] == [CONV, SYS_CONV]
    (tmp_path / "e.json").write_text("[ ]")
    assert read(str(tmp_path / "e.json"), "skip")[3] == 0


def test_sharegpt_assistants_of_other_names_and_unpaired_turns(tmp_path):
    """Real ShareGPT dumps name other assistants (chatgpt, bing, bard): their turns are assistant turns. A
    conversation ending on a user turn is dropped (ends_on_user_turn), or with unpaired=trim kept up to its last
    answer; an answer that opens a conversation is kept, or trimmed; the turns cut are counted."""
    turns = [{"from": "human", "value": "Hi"}, {"from": "bing", "value": "Hello"}, {"from": "human", "value": "And?"},
             {"from": "chatgpt", "value": "Yes"}, {"from": "human", "value": "Thanks"}]
    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"conversations": turns}) + "\n" + json.dumps({"conversations": turns[:4]}) + "\n")
    counts: dict = {}
    got = [m for _, _, m in iter_conversations(str(path), "skip", counts)]
    assert [[t["role"] for t in m] for m in got] == [["user", "assistant", "user", "assistant"]]
    assert counts["s"]["dropped"] == {"ends_on_user_turn": 1}
    counts = {}
    got = [m for _, _, m in iter_conversations(str(path), "skip", counts, unpaired="trim")]
    assert got == [got[1], got[1]] and got[1][-1] == {"role": "assistant", "content": "Yes"}
    assert counts["s"]["trimmed_turns"] == 1 and counts["s"]["dropped"] == {}
    opening = tmp_path / "o.jsonl"
    opening.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "...and so on."}] + turns[:2]}) + "\n")
    assert [m["role"] for m in read(str(opening), "fail")[0][0]] == ["assistant", "user", "assistant"]
    counts = {}
    (got,) = [m for _, _, m in iter_conversations(str(opening), "fail", counts, unpaired="trim")]
    assert [m["role"] for m in got] == ["user", "assistant"] and counts["o"]["trimmed_turns"] == 1
    answers = tmp_path / "a.jsonl"  # a piece of a split conversation that holds only answers: nothing pairs
    answers.write_text(json.dumps({"conversations": [{"from": "gpt", "value": "...and so on."}]}) + "\n")
    assert read(str(answers), "skip")[0] and read(str(answers), "skip", unpaired="trim")[2] == {
        "no_answer_after_a_user_turn": 1}
    lone = tmp_path / "l.jsonl"
    lone.write_text(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    assert read(str(lone), "skip")[2] == {"no_assistant_turn": 1}  # nothing to keep: still a bad row
