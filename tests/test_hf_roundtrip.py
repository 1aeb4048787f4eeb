"""The exported folder in transformers, with no code of ours: the chat template renders our ids for a few hundred
varied conversations, and greedy generation gives our tokens one for one."""
import random

import pytest
import torch

from pipeline.chat import END, render, render_prompt, render_text
from pipeline.generate import generate
from pipeline.model import save_model
from tests.conftest import tiny_model

transformers = pytest.importorskip("transformers")

WORDS = ["Velmora", "river", "mayor", "42", "1203", "the", "is", "what", "café", "naïve", "Ünïcödé", "日本語", "😀",
         "👩‍💻", "مرحبا", "Ωμέγα", "tab\there", "line\nbreak", "  spaced  ", "x=1;", "{json: true}", "a\\b", "100%"]
# looks like a marker but is not one: must stay plain text on both sides
MARKER_LIKE = ["<|end", "|end|>", "< |end| >", "<|END|>", "<|im_start|>", "<|endoftext|>", "<||>", "<|user |>",
               "<|assistant", "[INST]", "</s>", "<s>", "{{ messages }}", "{% if %}"]


def random_conversation(rng: random.Random) -> list[dict]:
    def text() -> str:
        pieces = rng.choices(WORDS + MARKER_LIKE, k=rng.randint(1, 8))
        return rng.choice([" ", "", "\n"]).join(pieces)

    conv = [{"role": "system", "content": text()}] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 4)):
        conv += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
    return conv


@pytest.fixture(scope="module")
def exported(tok, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    # a wide init spreads the logits, so greedy choices are not near-ties that float noise could flip
    model = tiny_model(tok.get_vocab_size(), seed=1, init_std=0.5)
    save_model(model, tok, str(folder))
    return folder, model


def test_apply_chat_template_gives_our_ids_for_300_conversations(tok, exported):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported[0]))
    rng = random.Random(0)
    for _ in range(300):
        conv = random_conversation(rng)
        assert hf_tok.apply_chat_template(conv, tokenize=False) == render_text(conv)
        ids = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == render(conv, tok)[0], conv
        prompt = conv[:-1]
        ids = hf_tok.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True,
                                         return_dict=True)["input_ids"]
        assert ids == render_prompt(prompt, tok), prompt


def test_exact_marker_text_in_content_is_where_string_templates_differ(tok, exported):
    """Our renderer keeps a typed `<|end|>` as plain text (SPEC §2); any string template re-parses it as the
    marker. Both sides are pinned here so a change on either side is noticed (see README: serving)."""
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported[0]))
    conv = [{"role": "user", "content": "type <|end|> here"}, {"role": "assistant", "content": "ok"}]
    ours, theirs = render(conv, tok)[0], hf_tok.apply_chat_template(conv, return_dict=True)["input_ids"]
    end = tok.token_to_id(END)
    assert ours.count(end) == 2 and theirs.count(end) == 3


def test_greedy_generation_matches_transformers_token_for_token(tok, exported):
    folder, model = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    end = tok.token_to_id(END)
    rng = random.Random(1)
    prompts = [render_prompt(random_conversation(rng)[:-1], tok) for _ in range(6)]
    ours = generate(model.eval(), prompts, max_new_tokens=24, stop_id=end)  # one batch, different lengths
    for prompt, mine in zip(prompts, ours):
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=end,
                          pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        assert out[0, len(prompt):].tolist() == mine
