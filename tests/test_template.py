import json

import numpy as np
import pytest

from pipeline.common import IGNORE_INDEX
from pipeline.config import RenderConfig
from pipeline.data import iter_conversations, validate
from pipeline.render import MaskStats, mask_report, render_split
from pipeline.template import (
    ASSISTANT,
    END,
    FORMATS,
    SYSTEM,
    TOOL,
    USER,
    chat_format,
    layout,
    render,
    render_many,
    render_prompt,
    render_text,
    turn_text,
)
from pipeline.tokenizer import load_tokenizer, save_tokenizer
from tests.conftest import CONVERSATIONS, config, labels_of, read_rendered


def report_of(rendered: list[tuple[list[int], list[bool]]], tok) -> dict:
    """The render stage's masking report of conversations rendered in memory."""
    stats = MaskStats(tok)
    lengths = [len(ids) for ids, _ in rendered]
    stats.add("all", np.array([i for ids, _ in rendered for i in ids], np.int32),
              np.array([m for _, mask in rendered for m in mask], np.bool_), np.concatenate([[0], np.cumsum(lengths)]))
    n = len(rendered)
    return mask_report({"all": {"rows_read": n, "rows_kept": n, "rows_dropped": 0, "dropped": {}, "empty_files": 0,
                               "trimmed_turns": 0}},
                       stats)


def load_tokenizer_plain(tok):
    """The same tokenizer with markers in text parsed as special tokens, as a text-level consumer sees it."""
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(tok.to_str())
    plain.encode_special_tokens = False
    return plain


def test_render_golden_two_turn_dialog(tok):
    conv = [{"role": "user", "content": "Who is the mayor of Velmora?"}, {"role": "assistant", "content": "Mira Tal"},
            {"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "42"}]
    ids, mask = render(conv, tok)
    u, a, e = tok.token_to_id(USER), tok.token_to_id(ASSISTANT), tok.token_to_id(END)
    assert (u, a, e) == (1, 2, 4)
    # <|user|> Who is the mayor of Velmora? <|end|> <|assistant|> Mira Tal <|end|> <|user|> ... <|assistant|> 42 <|end|>
    # (each content segment starts with a space, 226 = "Ġ": answers are spelled as mid-sentence words;
    # ids 0..5 are the markers, <|tool|> is 5)
    expected_ids = [1, 226, 301, 84, 274, 272, 226, 314, 264, 292, 276, 36, 4,
                    2, 226, 297, 318, 287, 278, 4,
                    1, 226, 301, 279, 274, 226, 22, 23, 226, 16, 226, 24, 21, 36, 4,
                    2, 226, 25, 23, 4]
    expected_labels = ([IGNORE_INDEX] * 13 + [IGNORE_INDEX, 226, 297, 318, 287, 278, 4]
                       + [IGNORE_INDEX] * 15 + [IGNORE_INDEX, 226, 25, 23, 4])
    assert ids == expected_ids
    assert labels_of(ids, mask) == expected_labels
    # the golden ids decode back to the turns, markers as single ids
    assert tok.decode(ids[1:12]) == " Who is the mayor of Velmora?"
    assert tok.decode(ids[14:19]) == " Mira Tal"
    assert tok.decode(ids[36:39]) == " 42"


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_mask_invariants(tok, conv):
    ids, mask = render(conv, tok)
    labels = labels_of(ids, mask)
    assert len(labels) == len(ids)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels, ids))
    end, markers = tok.token_to_id(END), {tok.token_to_id(t) for t in (USER, ASSISTANT, SYSTEM)}
    role, n_assistant_ends = None, 0
    for i, m in zip(ids, mask):
        if i in markers:
            assert not m, "role markers, <|assistant|> included, are never trained"
            role = i
        elif role != tok.token_to_id(ASSISTANT):
            assert not m, "system and user tokens (and their <|end|>) are never trained"
        else:
            assert m, "assistant content and its closing <|end|> are trained"
            n_assistant_ends += i == end
    assert n_assistant_ends == sum(msg["role"] == "assistant" for msg in conv)


def test_marker_text_in_content_stays_text(tok):
    conv = CONVERSATIONS[3]
    ids, _ = render(conv, tok)
    specials = [i for i in ids if i < 5]
    # exactly one marker + <|end|> per turn: the typed "<|assistant|>" / "<|end|>" became plain text
    assert specials == [1, 4, 2, 4]
    assert "<|assistant|>" in tok.decode(ids, skip_special_tokens=True)


def test_prompt_is_the_rendering_up_to_assistant_marker(tok):
    conv = CONVERSATIONS[2]
    full, _ = render(conv, tok)
    prompt = render_prompt(conv[:-1], tok)
    assert full[: len(prompt)] == prompt and prompt[-1] == tok.token_to_id(ASSISTANT)


def test_render_text_encodes_to_the_rendering(tok):
    # the exported template writes render_text; tokenizing that text (markers parsed as special tokens,
    # as transformers does) gives our ids
    plain = load_tokenizer_plain(tok)
    for conv in CONVERSATIONS[:3]:
        assert plain.encode(render_text(conv), add_special_tokens=False).ids == render(conv, tok)[0]


@pytest.mark.parametrize("messages,reason", [
    ([], "messages_not_a_nonempty_list"),
    ([{"role": "user", "content": "hi"}], "no_assistant_turn"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
     "ends_on_user_turn"),
    ([{"role": "bot", "content": "hi"}], "unknown_role"),
    ([{"content": "hi"}], "missing_role"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], "content_null_or_empty"),
    ([{"role": "user", "content": None}, {"role": "assistant", "content": "x"}], "content_null_or_empty"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "content_not_a_string"),
    ([{"role": "user", "content": "a", "weight": 1}, {"role": "assistant", "content": "x"}], "unknown_message_key"),
    (["hi", {"role": "assistant", "content": "x"}], "message_not_an_object"),
    ([{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}, {"role": "assistant", "content": "x"}],
     "tool_result_without_call"),
    ([{"role": "user", "content": "a", "tool_calls": [{"name": "f"}]}, {"role": "assistant", "content": "x"}],
     "tool_calls_not_on_assistant"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [{"arguments": {}}]}],
     "tool_call_without_name"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}],
     "system_not_first"),
])
def test_validate_reasons(messages, reason):
    assert validate(messages) == reason


def test_read_conversations_fail_and_skip(tmp_path):
    path = tmp_path / "c.jsonl"
    good = json.dumps({"messages": CONVERSATIONS[0]})
    path.write_text(good + "\n{not json\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:2: invalid_json"):
        list(iter_conversations(str(path), "fail"))
    counts = {}
    rows = [row for _, row, _ in iter_conversations(str(path), "skip", counts)]
    assert rows == [0] and counts["c"]["rows_read"] == 3
    assert counts["c"]["dropped"] == {"invalid_json": 1, "no_assistant_turn": 1}
    with pytest.raises(ValueError, match="on_error='ignore' must be fail or skip"):
        RenderConfig(on_error="ignore", train_on="all_assistant", batch_size=1, unpaired="drop")


def test_render_report_catches_a_masked_end_token(tok):
    rendered = render_many(CONVERSATIONS, tok)
    report = report_of(rendered, tok)
    assert report["assistant_end_trained_fraction"] == 1.0
    assert 0 < report["trained_fraction"] < 1
    end = tok.token_to_id(END)
    broken = [(ids, [m and i != end for i, m in zip(ids, mask)]) for ids, mask in rendered]  # the classic bug
    assert report_of(broken, tok)["assistant_end_trained_fraction"] == 0.0


TOOL_CONV = [
    {"role": "system", "content": "You can call tools."},
    {"role": "user", "content": "Weather in Velmora?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": {"town": "Velmora", "days": 2}}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "{\"sky\": \"rain\"}"},
    {"role": "assistant", "content": "Let me check twice.", "tool_calls": [
        {"type": "function", "function": {"name": "weather", "arguments": "{\"town\": \"Osk\"}"}}]},
    {"role": "tool", "content": "sun"},
    {"role": "assistant", "content": "Rain in Velmora, sun on the Osk."},
]


def roles_of(ids, tok):
    """The role of each token, from the markers (independent of the renderer's bookkeeping)."""
    names = {tok.token_to_id(t): r for r, t in (("system", SYSTEM), ("user", USER), ("assistant", ASSISTANT),
                                                 ("tool", TOOL))}
    out, role = [], None
    for i in ids:
        role = names.get(i, role)
        out.append(role)
    return out


def test_tool_calls_are_trained_and_tool_results_never(tok):
    assert validate(TOOL_CONV) is None and tok.token_to_id(TOOL) == 5
    ids, mask = render(TOOL_CONV, tok)
    roles = roles_of(ids, tok)
    assert sum(i == tok.token_to_id(TOOL) for i in ids) == 2
    assert not any(m for m, r in zip(mask, roles) if r == "tool"), "tool results are never trained"
    text = render_text(TOOL_CONV)
    call = '<tool_call>{"name": "weather", "arguments": {"town": "Velmora", "days": 2}}</tool_call>'
    assert f"<|assistant|>{call}<|end|>" in text
    assert 'Let me check twice.<tool_call>{"name": "weather", "arguments": {"town": "Osk"}}</tool_call>' in text
    # the trained tokens decode to exactly the assistant turns' text and their <|end|>s
    trained = tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == (' <tool_call>{"name": "weather", "arguments": {"town": "Velmora", "days": 2}}</tool_call><|end|>'
                       ' Let me check twice.<tool_call>{"name": "weather", "arguments": {"town": "Osk"}}</tool_call>'
                       '<|end|> Rain in Velmora, sun on the Osk.<|end|>')
    for everything in (render(TOOL_CONV, tok, "everything")[1],):
        assert not any(m for m, r in zip(everything, roles) if r == "tool")


@pytest.mark.parametrize("train_on", ["all_assistant", "last_assistant", "everything"])
def test_masking_policies(tok, train_on):
    conv = CONVERSATIONS[2]  # user, assistant, user, assistant
    ids, mask = render(conv, tok, train_on)
    roles = roles_of(ids, tok)
    turn = np.cumsum([i in (1, 2) for i in ids]) - 1  # turn number of each token
    for t in range(4):
        trained = [m for m, k in zip(mask, turn) if k == t]
        if train_on == "everything":
            assert all(trained)
        elif train_on == "all_assistant":
            assert trained == [False] + [conv[t]["role"] == "assistant"] * (len(trained) - 1)
        else:
            assert trained == [False] + [t == 3] * (len(trained) - 1)
    assert roles[0] == "user"
    with pytest.raises(ValueError, match="train_on='assistant' must be one of"):
        config("render", train_on="assistant")


def test_template_renders_tool_conversations_like_the_renderer(tok, tmp_path):
    import transformers
    save_tokenizer(tok, str(tmp_path))
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for conv in [TOOL_CONV, CONVERSATIONS[1], TOOL_CONV[:4]]:
        assert hf_tok.apply_chat_template(conv, tokenize=False) == render_text(conv)
    ids = hf_tok.apply_chat_template(TOOL_CONV, tokenize=True, return_dict=True)["input_ids"]
    assert ids == render(TOOL_CONV, tok)[0]
    assert load_tokenizer_plain(tok).encode(render_text(TOOL_CONV), add_special_tokens=False).ids == \
        render(TOOL_CONV, tok)[0]


def test_a_tokenizer_without_the_tool_marker_still_renders_chats(tok, tmp_path):
    from tokenizers import Tokenizer

    old = Tokenizer.from_str(tok.to_str())
    data = json.loads(old.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != TOOL]
    del data["model"]["vocab"][TOOL]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    old = load_tokenizer(str(tmp_path))
    assert render(CONVERSATIONS[0], old) == render(CONVERSATIONS[0], tok)
    with pytest.raises(ValueError, match="no <\\|tool\\|> marker"):
        render(TOOL_CONV, old)
    # render_split tokenizes batch k while batch k+1 is read: the first error in file order is still the one raised
    first, tool, bad = json.dumps({"messages": CONVERSATIONS[0]}), json.dumps({"messages": TOOL_CONV}), "{bad"
    (tmp_path / "a.jsonl").write_text("\n".join([first, tool, bad]) + "\n")  # bad is read while tool is in flight
    with pytest.raises(ValueError, match="no <\\|tool\\|> marker"):
        render_split(str(tmp_path / "a.jsonl"), old, config("render", batch_size=1), str(tmp_path / "a.parquet"))
    (tmp_path / "b.jsonl").write_text("\n".join([first, bad, tool]) + "\n")
    with pytest.raises(ValueError, match="b.jsonl:2: invalid_json"):
        render_split(str(tmp_path / "b.jsonl"), old, config("render", batch_size=1), str(tmp_path / "b.parquet"))


def test_report_per_source_and_role(tok, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in CONVERSATIONS) + "\n")
    (tmp_path / "src" / "b.jsonl").write_text(json.dumps({"messages": TOOL_CONV}) + "\n{bad\n")
    report = render_split(str(tmp_path / "src"), tok, config("render", on_error="skip", batch_size=3),
                          str(tmp_path / "r.parquet"))
    assert report["rows_read"] == 6 and report["rows_kept"] == 5 and report["dropped"] == {"invalid_json": 1}
    a, b = report["sources"]["a"], report["sources"]["b"]
    assert a["rows_read"] == 4 and b["rows_read"] == 2 and b["dropped"] == {"invalid_json": 1}
    assert a["assistant_end_trained_fraction"] == b["assistant_end_trained_fraction"] == 1.0
    assert b["roles"]["tool"]["trained_fraction"] == 0 and a["roles"]["user"]["trained_fraction"] == 0
    assert "tool" not in a["roles"] and 0 < b["roles"]["assistant"]["trained_fraction"] <= 1
    assert report["tokens"] == a["tokens"] + b["tokens"]
    ids, labels, rows, sources = read_rendered(str(tmp_path / "r.parquet"), with_sources=True)
    assert sources.tolist() == ["a"] * 4 + ["b"] and rows.tolist() == [0, 1, 2, 3, 0]
    expected = render_many(CONVERSATIONS + [TOOL_CONV], tok)
    assert [x.tolist() for x in ids] == [e for e, _ in expected]
    assert [x.tolist() for x in labels] == [labels_of(e, m) for e, m in expected]
    last = render_split(str(tmp_path / "src" / "a.jsonl"), tok, config("render", train_on="last_assistant"),
                        str(tmp_path / "l.parquet"))
    assert last["fully_masked_rows"] == 0 and last["trained_tokens"] < a["trained_tokens"]


# ChatML (tokenizer.chat_format=chatml): <|im_start|>role\n + content + <|im_end|>\n

NEWLINE_CONV = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who is the mayor?"},
                {"role": "assistant", "content": "Mira Tal"}, {"role": "user", "content": "\n\nAnd 12 + 30?"},
                {"role": "assistant", "content": "\n42"}]


def test_chatml_masks_the_headers_and_the_newline_after_each_end(chatml_tok):
    assert chat_format(chatml_tok) is FORMATS["chatml"]
    ids, mask = render(NEWLINE_CONV, chatml_tok)
    start, end = chatml_tok.token_to_id("<|im_start|>"), chatml_tok.token_to_id("<|im_end|>")
    assert (start, end) == (1, 2) and ids.count(start) == ids.count(end) == 5
    # exactly the assistant contents and their <|im_end|> are trained, the leading newline of "\n42" included
    # (it belongs to the content, not to the header "assistant\n")
    trained = chatml_tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "Mira Tal<|im_end|>\n42<|im_end|>"
    after = layout(chatml_tok).after_end
    for k in [k for k, i in enumerate(ids) if i == end]:
        assert ids[k + 1 : k + 1 + len(after)] == after and not any(mask[k + 1 : k + 1 + len(after)])
    # a text-level consumer (transformers' template, then the tokenizer) gets the same ids
    text = render_text(NEWLINE_CONV, fmt=FORMATS["chatml"])
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")
    assert load_tokenizer_plain(chatml_tok).encode(text, add_special_tokens=False).ids == ids


@pytest.mark.parametrize("conv", CONVERSATIONS + [NEWLINE_CONV])
def test_mask_invariants_in_either_format(any_tok, conv):
    fmt, lay = chat_format(any_tok), layout(any_tok)
    ids, mask = render(conv, any_tok)
    assert all(lab in (IGNORE_INDEX, i) for lab, i in zip(labels_of(ids, mask), ids))
    trained = [i for i, m in zip(ids, mask) if m]
    # each segment after a marker gets a prefix space in the bundled markers tokenizer; ChatML content follows
    # "role\n" in the same segment
    space = " " if fmt.name == "markers" else ""
    expected = "".join(space + turn_text(m) + fmt.end for m in conv if m["role"] == "assistant")
    assert any_tok.decode(trained, skip_special_tokens=False) == expected
    assert trained.count(lay.end) == sum(m["role"] == "assistant" for m in conv)
    assert ids.count(lay.end) == len(conv)
    # the prompt for the last answer is the rendering up to and including the assistant's header
    prompt = render_prompt(conv[:-1], any_tok)
    assert ids[: len(prompt)] == prompt and prompt[-len(lay.header_ids("assistant")):] == lay.header_ids("assistant")


def test_chatml_report_catches_a_masked_end_token(chatml_tok):
    rendered = render_many(CONVERSATIONS + [NEWLINE_CONV], chatml_tok)
    report = report_of(rendered, chatml_tok)
    assert report["assistant_end_trained_fraction"] == 1.0
    assert report["roles"]["user"]["trained_fraction"] == report["roles"]["system"]["trained_fraction"] == 0
    assert 0 < report["roles"]["assistant"]["trained_fraction"] < 1  # headers and the newline after <|im_end|>
    end = layout(chatml_tok).end
    broken = [(ids, [m and i != end for i, m in zip(ids, mask)]) for ids, mask in rendered]
    assert report_of(broken, chatml_tok)["assistant_end_trained_fraction"] == 0.0


def test_chatml_header_travels_with_the_rendered_file_to_truncation(chatml_tok, tmp_path):
    from pipeline.pack import fit, rendered_headers

    long = [{"role": "user", "content": "Who is the mayor?"}, {"role": "assistant", "content": "Mira Tal " * 40}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"messages": c}) for c in [CONVERSATIONS[0], long]))
    render_split(str(tmp_path / "a.jsonl"), chatml_tok, config("render"), str(tmp_path / "r.parquet"))
    header, _ = rendered_headers(str(tmp_path / "r.parquet"))
    assert list(header) == layout(chatml_tok).header_ids("assistant") and len(header) > 1
    ids = read_rendered(str(tmp_path / "r.parquet"))[0]
    at = next(k for k in range(len(ids[1])) if tuple(ids[1][k : k + len(header)]) == header)
    # truncation keeps the whole header and at least one answer token; a cut inside the header drops the row
    assert fit(ids[1], at + len(header) + 1, "truncate", header=header) == at + len(header) + 1
    assert fit(ids[1], at + len(header), "truncate", header=header) == 0
    assert fit(ids[1], at + len(header) + 1, "truncate", header=(2,)) == 0  # the markers' header (<|im_end|> here)


def test_tokenizer_stage_takes_an_imported_models_format_and_refuses_another(chatml_tok, tmp_path, monkeypatch):
    """The tokenizer stage with base.init_from = a ChatML model folder: `auto` takes ChatML, `markers` is refused."""
    from pipeline.hf import save_model
    from stages import tokenizer as stage
    from tests.conftest import tiny_model, write_params

    save_model(tiny_model(chatml_tok.get_vocab_size()), chatml_tok, str(tmp_path / "chatml_model"))
    monkeypatch.chdir(tmp_path)
    base = {"init_from": str(tmp_path / "chatml_model")}
    write_params(tmp_path, base=base, tokenizer={"chat_format": "auto"})
    stage.main("unused_corpus.jsonl", "tok_auto")
    assert chat_format(load_tokenizer("tok_auto")) is FORMATS["chatml"]
    write_params(tmp_path, base=base, tokenizer={"chat_format": "markers"})
    with pytest.raises(ValueError, match="tokenizer.chat_format=markers, but the tokenizer of base.init_from=.* "
                                         "speaks chatml"):
        stage.main("unused_corpus.jsonl", "tok_markers")
