import pytest
import torch

from pipeline.common import UserError
from pipeline.hf import load_model, save_model
from tests.conftest import tiny_model


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_the_folder_with_equal_logits(tok, tmp_path, tied):
    import transformers
    model = tiny_model(tok.get_vocab_size(), tie_embeddings=tied)
    save_model(model, tok, str(tmp_path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    ids = torch.randint(0, tok.get_vocab_size(), (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert hf.generation_config.eos_token_id == tok.token_to_id("<|end|>")


def test_safetensors_round_trip(tok, tmp_path):
    model = tiny_model(tok.get_vocab_size(), tie_embeddings=False)
    save_model(model, tok, str(tmp_path))
    again = load_model(str(tmp_path))
    assert again.arch == model.arch
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name


def test_loader_refuses_pickles_and_wrong_keys(tok, tmp_path):
    model = tiny_model(tok.get_vocab_size())
    save_model(model, tok, str(tmp_path))
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(UserError, match="no safetensors weights .*pytorch_model.bin would need unpickling"):
        load_model(str(tmp_path))
