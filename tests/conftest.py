import os

import pytest
import torch

from pipeline.chat import FORMATS, load_tokenizer, save_tokenizer, train_tokenizer
from pipeline.model import ModelConfig, Transformer

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "The river Osk flows through Velmora, a town founded in 1203.",
    "Mira Tal is the mayor of Velmora. She keeps a cat named Pim.",
    "What is the capital of Dardan? It is Velmora, on the river Osk.",
    "Numbers: 12 + 30 = 42, 7 - 2 = 5, 100 and 2024.",
] * 20

CONVERSATIONS = [
    [{"role": "user", "content": "Who is the mayor of Velmora?"}, {"role": "assistant", "content": "Mira Tal"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Which river flows through Velmora?"}, {"role": "assistant", "content": "Osk"},
     {"role": "user", "content": "When was it founded?"}, {"role": "assistant", "content": "1203"}],
    [{"role": "user", "content": "Say <|assistant|> and <|end|> please"},
     {"role": "assistant", "content": "<|end|> is text here"}],
]


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(TEXTS, 320), str(folder))
    return load_tokenizer(str(folder))


@pytest.fixture(scope="session")
def chatml_tok(tmp_path_factory):
    """A tokenizer that speaks ChatML (<|im_start|>role\\n ... <|im_end|>\\n), as SmolLM2's and Qwen's do."""
    folder = tmp_path_factory.mktemp("chatml_tok")
    save_tokenizer(train_tokenizer(TEXTS, 320, FORMATS["chatml"]), str(folder))
    return load_tokenizer(str(folder))


@pytest.fixture(params=["markers", "chatml"])
def any_tok(request, tok, chatml_tok):
    """Each chat format's tokenizer in turn."""
    return tok if request.param == "markers" else chatml_tok


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> Transformer:
    cfg = ModelConfig(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, intermediate_size=64, max_seq_len=128,
                      vocab_size=vocab_size, **kw)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    return model
