"""The open chat-model families people fine-tune, in their own architecture, dtype and shards: tiny random models
built with transformers' own config classes and saved as the Hub ships them (bf16, several safetensors shards and
an index). Our loader gives transformers' logits, also on packed rows with the document mask; greedy generation is
the same token for token; what we save, transformers loads with no code of ours, in the model's own config, dtype
and shards; what we cannot represent is refused at import in one line."""
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from pipeline.common import UserError
from pipeline.generate import generate
from pipeline.hf import INDEX, load_model, save_model
from pipeline.tokenizer import save_tokenizer
from tests.conftest import saved_as_on_the_hub

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1)
FAMILIES = {  # name -> (config class, its own switches)
    "llama3": (transformers.LlamaConfig, dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "llama-linear-bias": (transformers.LlamaConfig, dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True,
                                                         rope_parameters={"rope_type": "linear", "rope_theta": 500.0,
                                                                          "factor": 2.0})),
    "qwen2": (transformers.Qwen2Config, dict(tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(tie_word_embeddings=False, head_dim=24)),
    "mistral": (transformers.MistralConfig, dict(tie_word_embeddings=False, sliding_window=16, head_dim=8)),
}


def hub_folder(folder: Path, name: str, vocab_size: int, tok=None, seed: int = 0,
               dtype: torch.dtype = torch.bfloat16) -> Path:
    """A tiny random model of a family, saved as the Hub ships models: bf16, sharded (~40 KB a file), an index;
    with `tok`, our tokenizer files next to it (the pipeline's stages need a tokenizer that speaks a known format)."""
    cls, switches = FAMILIES[name]
    return saved_as_on_the_hub(cls(vocab_size=vocab_size, **COMMON, **switches), folder, tok, seed, dtype)


def theirs(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, chatml_tok, tmp_path_factory):
    return request.param, hub_folder(tmp_path_factory.mktemp(request.param), request.param,
                                     chatml_tok.get_vocab_size())


def test_shipped_as_the_hub_ships_them(family):
    name, folder = family
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and (folder / INDEX).is_file()
    assert json.loads((folder / "config.json").read_text()).get("dtype", "bfloat16") == "bfloat16"


def test_logits_equal_transformers_and_packed_rows_equal_each_conversation_alone(family):
    name, folder = family
    ours, hf = load_model(str(folder)).eval(), theirs(folder)
    ids = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        lengths = (20, 30, 14)  # mistral's window (16) binds inside the second and first conversations
        convs = [ids[0, :n] for n in lengths]
        packed = ours(torch.cat(convs)[None], pos=torch.cat([torch.arange(n) for n in lengths])[None],
                      doc=torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None])[0]
        alone = torch.cat([hf(c[None]).logits[0] for c in convs])
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)


def test_greedy_generation_equals_transformers_token_for_token(family):
    name, folder = family
    ours, hf = load_model(str(folder)).eval(), theirs(folder)
    for prompt in ([5, 9, 17], list(range(30, 50))):  # the second: past mistral's window while decoding
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               pad_token_id=0)[0, len(prompt):].tolist()
        assert generate(ours, [prompt], 12, stop_id=-1) == [expected], name
    batch = [[5, 9, 17], list(range(30, 50)), [7] * 9]  # left-padded together: the same tokens as one by one
    assert generate(ours, batch, 12, stop_id=-1) == [generate(ours, [p], 12, stop_id=-1)[0] for p in batch]


def test_saved_in_the_models_own_config_dtype_and_shards(family, chatml_tok, tmp_path):
    name, folder = family
    ours = load_model(str(folder))
    save_model(ours, chatml_tok, str(tmp_path / "out"), like=str(folder), max_shard_bytes=40_000)
    config, original = (json.loads((p / "config.json").read_text()) for p in (tmp_path / "out", folder))
    kept = {k: v for k, v in original.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    assert {k: config[k] for k in kept} == kept and config["torch_dtype"] == "bfloat16"  # every field carried over
    index = json.loads((tmp_path / "out" / INDEX).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((tmp_path / "out" / f).is_file() for f in files)
    assert index["metadata"]["total_size"] == 2 * ours.num_params()  # bf16 in, bf16 out
    generation = json.loads((tmp_path / "out/generation_config.json").read_text())
    ends = generation["eos_token_id"] if isinstance(generation["eos_token_id"], list) else [generation["eos_token_id"]]
    assert chatml_tok.token_to_id("<|im_end|>") in ends  # our stop token added to theirs
    again, hf = load_model(str(tmp_path / "out")).eval(), theirs(tmp_path / "out")
    ids = torch.randint(0, hf.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
        for a, b in zip(again.state_dict().values(), ours.state_dict().values()):
            assert torch.equal(a, b.to(torch.bfloat16).float())  # the bf16 weights we loaded, written back as they were


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fp32_and_fp16_checkpoints_load_and_save_in_their_dtype(dtype, chatml_tok, tmp_path):
    folder = hub_folder(tmp_path / "in", "llama-linear-bias", chatml_tok.get_vocab_size(), dtype=dtype)
    ours, hf = load_model(str(folder)).eval(), theirs(folder)
    ids = torch.randint(0, hf.config.vocab_size, (1, 30), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    save_model(ours, chatml_tok, str(tmp_path / "out"), like=str(folder))  # one file: under the shard limit
    name = str(dtype).removeprefix("torch.")
    assert json.loads((tmp_path / "out/config.json").read_text())["torch_dtype"] == name
    assert (tmp_path / "out/model.safetensors").is_file() and not (tmp_path / "out" / INDEX).exists()
    assert all(torch.equal(a, b) for a, b in zip(load_model(str(tmp_path / "out")).state_dict().values(),
                                                 ours.state_dict().values()))  # exact: nothing lost either way


@pytest.fixture
def llama_folder(chatml_tok, tmp_path):
    return hub_folder(tmp_path / "llama", "llama3", chatml_tok.get_vocab_size())


def refused(folder: Path, match: str) -> None:
    with pytest.raises(UserError, match=match) as e:
        load_model(str(folder))
    assert "\n" not in str(e.value)


def test_what_cannot_be_represented_is_refused_in_one_line(llama_folder):
    config = json.loads((llama_folder / "config.json").read_text())
    for change, match in (({"model_type": "gpt2"}, r"model_type 'gpt2' is not supported \(supported: llama, "
                                                   r"qwen2, qwen3, mistral\)"),
                          ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                           r"rope scaling 'yarn' is not supported \(supported: llama3, linear\)"),
                          ({"hidden_act": "gelu"}, "hidden_act 'gelu': only silu"),
                          ({"intermediate_size": 100}, r"has shape \(64, 96\), config.json implies \(64, 100\)")):
        (llama_folder / "config.json").write_text(json.dumps(config | change))
        refused(llama_folder, match)
    (llama_folder / "config.json").write_text(json.dumps(config))
    shard = sorted(llama_folder.glob("model-*.safetensors"))[1]
    shard.rename(shard.with_suffix(".gone"))
    refused(llama_folder, f"lists {shard.name}, which is not in the folder")
    for f in list(llama_folder.glob("model-*")) + [llama_folder / INDEX]:
        f.unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2)}, llama_folder / "pytorch_model.bin")
    refused(llama_folder, "pytorch_model.bin would need unpickling, which is never done")


def test_fine_tuned_and_exported_in_the_familys_own_config_dtype_and_shards(family, chatml_tok, tmp_path, capsys):
    """The train stage's work (pipeline/sft.py, in process) on the family's Hub-style folder: planned, a few SFT
    steps, exported in the family's config, bf16 and shards, and transformers gives our logits on the export. The
    stages' wiring does not depend on the family: `dvc repro` with base.init_from runs in tests/test_sharegpt.py (a
    GGUF file, native), tests/test_hf_pipeline.py (a Hub-style folder, transformers) and tests/test_pipeline.py (a
    folder and a Hub repo)."""
    import dataclasses

    import numpy as np

    from pipeline.pack import pack, save_packed
    from pipeline.sft import finetune
    from pipeline.template import render
    from tests.conftest import CONVERSATIONS, config, labels_of

    name, hub = family
    folder = tmp_path / "base"
    shutil.copytree(hub, folder)
    save_tokenizer(chatml_tok, str(folder))
    rendered = [render(c, chatml_tok) for c in CONVERSATIONS * 4]
    arrays, _ = pack([np.array(ids, np.int32) for ids, _ in rendered],
                     [np.array(labels_of(ids, m), np.int32) for ids, m in rendered], config("pack", block_size=64))
    for split in ("train", "dev"):
        save_packed(arrays, str(tmp_path / "packed" / split))
    cfg = config("train", max_steps=2, batch_size=2, lr=1e-3, max_shard_gb=4.0e-5, device="cpu")  # 40 KB shards
    during = dataclasses.replace(config("evaluate").during_train, prompts=0, samples=0)
    published = tmp_path / "sft"
    finetune(cfg, during, str(folder), str(tmp_path / "packed"), str(published), str(tmp_path / "live"))
    assert "sft: memory plan per rank: weights" in capsys.readouterr().out
    config_json, original = (json.loads((p / "config.json").read_text()) for p in (published, folder))
    assert config_json["model_type"] == original["model_type"] and config_json["architectures"] == original[
        "architectures"]
    assert config_json["torch_dtype"] == "bfloat16" and len(list(published.glob("model-*-of-*.safetensors"))) > 2
    before, after = load_model(str(folder)), load_model(str(published))
    assert any(not torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    ids = torch.randint(0, config_json["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(after.eval()(ids), theirs(published)(ids).logits, rtol=1e-4, atol=1e-4)
