"""The exported folder in transformers, with no code of ours: the chat template renders our ids for a few hundred
varied conversations, and greedy generation gives our tokens one for one; in each chat format."""
import random

import pytest
import torch
import transformers

from pipeline.generate import generate
from pipeline.hf import save_model
from pipeline.template import END, chat_format, layout, render, render_prompt, render_text
from tests.conftest import tiny_model

WORDS = ["Velmora", "river", "mayor", "42", "1203", "the", "is", "what", "café", "naïve", "Ünïcödé", "日本語", "😀",
         "👩‍💻", "مرحبا", "Ωμέγα", "tab\there", "line\nbreak", "  spaced  ", "x=1;", "{json: true}", "a\\b", "100%"]
# looks like a marker but is not one: must stay plain text on both sides
MARKER_LIKE = ["<|end", "|end|>", "< |end| >", "<|END|>", "<|im_start|>", "<|endoftext|>", "<||>", "<|user |>",
               "<|assistant", "[INST]", "</s>", "<s>", "{{ messages }}", "{% if %}"]


def random_conversation(rng: random.Random, specials=()) -> list[dict]:
    """Multi-turn, sometimes a system message; text that looks like markers, but never a special token of the
    format (`specials`) spelled exactly: that is the one documented difference (see below)."""
    marker_like = [m for m in MARKER_LIKE if m not in specials]

    def text() -> str:
        pieces = rng.choices(WORDS + marker_like, k=rng.randint(1, 8))
        return rng.choice([" ", "", "\n"]).join(pieces)

    conv = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return conv


@pytest.fixture
def exported(any_tok, tmp_path):
    # a wide init spreads the logits, so greedy choices are not near-ties that float noise could flip
    model = tiny_model(any_tok.get_vocab_size(), seed=1, init_std=0.5)
    save_model(model, any_tok, str(tmp_path))
    return tmp_path, model


def test_apply_chat_template_gives_our_ids_for_300_conversations(any_tok, exported):
    tok, fmt = any_tok, chat_format(any_tok)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported[0]))
    rng = random.Random(0)
    for _ in range(300):
        conv = random_conversation(rng, fmt.specials)
        assert hf_tok.apply_chat_template(conv, tokenize=False) == render_text(conv, fmt=fmt)
        ids = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == render(conv, tok)[0], conv
        prompt = conv[:-1]
        ids = hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        assert ids == render_prompt(prompt, tok), prompt


@pytest.mark.parametrize("any_tok", ["markers"], indirect=True)
def test_exact_marker_text_in_content_is_where_string_templates_differ(any_tok, exported):
    """Our renderer keeps a typed `<|end|>` as plain text (SPEC §2); any string template re-parses it as the
    marker. Both sides are pinned here so a change on either side is noticed (see README: serving)."""
    tok = any_tok
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported[0]))
    conv = [{"role": "user", "content": "type <|end|> here"}, {"role": "assistant", "content": "ok"}]
    ours, theirs = render(conv, tok)[0], hf_tok.apply_chat_template(conv, return_dict=True)["input_ids"]
    end = tok.token_to_id(END)
    assert ours.count(end) == 2 and theirs.count(end) == 3


def test_greedy_generation_matches_transformers_token_for_token(any_tok, exported):
    tok, (folder, model) = any_tok, exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    assert hf.generation_config.eos_token_id == layout(tok).end
    end, pad = layout(tok).end, layout(tok).pad
    rng = random.Random(1)
    prompts = [render_prompt(random_conversation(rng, chat_format(tok).specials)[:-1], tok) for _ in range(6)]
    ours = generate(model.eval(), prompts, max_new_tokens=24, stop_id=end)  # one batch, different lengths
    for prompt, mine in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=end,
                          pad_token_id=pad, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out[0, len(prompt):].tolist() == mine
