import json

import pytest

from pipeline.chat import render, render_text
from pipeline.model import save_model
from pipeline.publish import PublishConfig, export, push
from tests.conftest import CONVERSATIONS, tiny_model

METRICS = {"base": {"n": 3, "exact_match": 0.0, "contains_answer": 0.0, "stopped": 0.0, "length_ok": 0.0,
                    "distinct3": 0.5, "dev_loss": 5.0},
           "sft": {"n": 3, "exact_match": 0.667, "contains_answer": 0.667, "stopped": 1.0, "length_ok": 1.0,
                   "distinct3": 1.0, "dev_loss": 1.5}}


@pytest.fixture
def published(tok, tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    out.mkdir()
    save_model(tiny_model(tok.get_vocab_size()), tok, str(model_dir))
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "train.jsonl").write_text("{}\n")
    export(PublishConfig(model_name="tiny"), str(model_dir), str(tmp_path / "metrics.json"), str(out),
           {"train": {"lr": 3e-4}}, [str(tmp_path / "train.jsonl")])
    return out


def test_exported_chat_template_renders_like_the_renderer(tok, published):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(published))
    for conv in CONVERSATIONS:
        assert hf_tok.apply_chat_template(conv, tokenize=False) == render_text(conv)
        prompt = conv[:-1]
        assert hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == render_text(
            prompt, add_generation_prompt=True)
    for conv in CONVERSATIONS[:3]:  # no marker-like text inside content: the ids agree too
        ids = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == render(conv, tok)[0]


def test_published_folder_is_complete(published, tok):
    names = {p.name for p in published.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    assert json.loads((published / "generation_config.json").read_text())["eos_token_id"] == tok.token_to_id("<|end|>")
    card = (published / "README.md").read_text()
    assert "| stopped | 0.000 | 1.000 |" in card and "| n | 3 | 3 |" in card
    assert "Llama architecture: 2 layers" in card and "<|assistant|>" in card and "Limitations" in card
    assert "train.jsonl`: sha256" in card


def test_push_skips_with_a_reason(published, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "repo_id is empty" in push(PublishConfig(), str(published))
    assert "HF_TOKEN is not set" in push(PublishConfig(repo_id="me/model"), str(published))
