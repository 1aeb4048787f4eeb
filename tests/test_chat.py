import json

import pytest

from pipeline.chat import (ASSISTANT, END, IGNORE_INDEX, SYSTEM, USER, RenderConfig, labels_from, read_conversations,
                           render, render_many, render_prompt, render_report, render_text, validate)
from tests.conftest import CONVERSATIONS


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
    # (each content segment starts with a space, 225 = "Ġ": answers are spelled as mid-sentence words)
    expected_ids = [1, 225, 300, 83, 273, 271, 225, 313, 263, 291, 275, 35, 4,
                    2, 225, 296, 317, 286, 277, 4,
                    1, 225, 300, 278, 273, 225, 21, 22, 319, 225, 23, 20, 35, 4,
                    2, 225, 24, 22, 4]
    expected_labels = ([IGNORE_INDEX] * 13 + [IGNORE_INDEX, 225, 296, 317, 286, 277, 4]
                       + [IGNORE_INDEX] * 14 + [IGNORE_INDEX, 225, 24, 22, 4])
    assert ids == expected_ids
    assert labels_from(ids, mask) == expected_labels
    # the golden ids decode back to the turns, markers as single ids
    assert tok.decode(ids[1:12]) == " Who is the mayor of Velmora?"
    assert tok.decode(ids[14:19]) == " Mira Tal"
    assert tok.decode(ids[35:38]) == " 42"


@pytest.mark.parametrize("conv", CONVERSATIONS)
def test_mask_invariants(tok, conv):
    ids, mask = render(conv, tok)
    labels = labels_from(ids, mask)
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
    ([{"role": "user", "content": "hi"}], "does_not_end_on_assistant"),
    ([{"role": "bot", "content": "hi"}], "unknown_role"),
    ([{"role": "user", "content": ""}, {"role": "assistant", "content": "x"}], "empty_or_non_string_content"),
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
        read_conversations(str(path), "fail")
    convs, rows, dropped, n_read = read_conversations(str(path), "skip")
    assert rows == [0] and n_read == 3
    assert dropped == {"invalid_json": 1, "does_not_end_on_assistant": 1}
    assert n_read == len(convs) + sum(dropped.values())
    with pytest.raises(ValueError):
        RenderConfig(on_error="ignore")


def test_render_report_catches_a_masked_end_token(tok):
    rendered = render_many(CONVERSATIONS, tok)
    report = render_report(rendered, tok, len(CONVERSATIONS), {})
    assert report["assistant_end_trained_fraction"] == 1.0
    assert 0 < report["trained_fraction"] < 1
    end = tok.token_to_id(END)
    broken = [(ids, [m and i != end for i, m in zip(ids, mask)]) for ids, mask in rendered]  # the classic bug
    assert render_report(broken, tok, len(CONVERSATIONS), {})["assistant_end_trained_fraction"] == 0.0
