"""The transformers backend on the families people fine-tune in 2026: tiny random models built with transformers' own
config classes (2 layers, width 64, the test tokenizer's vocabulary) and saved as the Hub ships them (bf16, several
safetensors shards and an index). For each: a packed row's loss is the sum of its conversations' losses alone (or,
for a family with linear-attention layers, the row is refused and packing puts one conversation per row); greedy
decoding is transformers' own, token for token; the export loads in transformers with no code of ours and gives our
logits; the LoRA adapter loads in peft; a mixture of experts' load-balancing loss is transformers' own; the memory
plan's weights are exact and its activations within the stated factor of a measured forward."""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from pipeline.backend import check_rows, choose, load_model
from pipeline.common import UserError
from pipeline.config import PackConfig
from pipeline.families import read_config
from pipeline.generate import generate
from pipeline.hf import INDEX
from pipeline.hf_backend import HFModel, add_adapters, save_adapter, save_model
from pipeline.hf_memory import plan_memory
from pipeline.memory import ACTIVATION_FACTOR, measured_activation_bytes
from pipeline.pack import pack
from pipeline.train import to_batch
from tests.conftest import config, saved_as_on_the_hub

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
SLIDING = ["sliding_attention", "full_attention"]  # a window of 8 binds inside every conversation below
FAMILIES = {  # name -> (config class, its own switches); each the text model a Hub checkpoint of the family holds
    "gemma3": (transformers.Gemma3TextConfig, dict(head_dim=16, sliding_window=8, layer_types=SLIDING,
                                                   final_logit_softcapping=30.0)),
    "gemma4": (transformers.Gemma4TextConfig, dict(head_dim=16, global_head_dim=16, sliding_window=8,
                                                   layer_types=SLIDING, hidden_size_per_layer_input=16)),
    "qwen3_5": (transformers.Qwen3_5TextConfig, dict(head_dim=16, layer_types=["linear_attention", "full_attention"],
                                                     linear_num_key_heads=2, linear_num_value_heads=4,
                                                     linear_key_head_dim=16, linear_value_head_dim=16)),
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                                    head_dim=16)),
    "gpt_oss": (transformers.GptOssConfig, dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                                sliding_window=8, layer_types=SLIDING)),
    "smollm3": (transformers.SmolLM3Config, dict()),
    "phi3": (transformers.Phi3Config, dict(sliding_window=8)),
    "olmo2": (transformers.Olmo2Config, dict()),
}
MOE = ("qwen3_moe", "gpt_oss")
LENGTHS = (20, 13, 7)  # three conversations in one packed row


def hub_folder(folder: Path, name: str, vocab_size: int, tok=None, seed: int = 0) -> Path:
    """A tiny random model of a family saved as the Hub ships models (bf16, ~40 KB shards, an index); with `tok`,
    our tokenizer files next to it."""
    cls, switches = FAMILIES[name]
    extra = {"vocab_size_per_layer_input": vocab_size} if name == "gemma4" else {}
    return saved_as_on_the_hub(cls(vocab_size=vocab_size, **COMMON, **switches, **extra), folder, tok, seed)


def theirs(folder: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, chatml_tok, tmp_path_factory):
    folder = hub_folder(tmp_path_factory.mktemp(request.param), request.param, chatml_tok.get_vocab_size())
    return request.param, folder, load_model(str(folder))


def packed_row(vocab: int, seed: int = 1):
    ids = torch.randint(3, vocab, (1, sum(LENGTHS)), generator=torch.Generator().manual_seed(seed))
    pos = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)])[None]
    return ids, pos, doc


def test_shipped_as_the_hub_ships_them_and_auto_picks_transformers(family):
    name, folder, model = family
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 2 and (folder / INDEX).is_file()
    assert isinstance(model, HFModel) and choose(read_config(str(folder)), "auto")[0] == "transformers"
    assert next(model.parameters()).dtype == torch.float32  # bf16 on disk, fp32 master weights


def test_packed_row_loss_is_the_sum_of_each_conversation_alone(family):
    """fp32, every layer type: sliding windows (8 tokens) bind inside the conversations. A family whose
    linear-attention layers would leak (Qwen3.5's Gated DeltaNet) is not packable: the leak is real, the pack stage
    gives it one conversation per row, and training refuses rows that hold several."""
    name, folder, model = family
    model.eval()
    ids, pos, doc = packed_row(model.arch.vocab_size)
    with torch.no_grad():
        packed, n = model(ids, ids.clone(), pos, doc)
        parts = [model(x[None], x[None].clone()) for x in ids[0].split(LENGTHS)]
    alone = sum(p[0] for p in parts)
    assert n == sum(p[1] for p in parts) == sum(LENGTHS) - len(LENGTHS)
    if name == "qwen3_5":
        assert not model.packable and "linear_attention" in model.why
        assert abs(packed.item() - alone.item()) > 1e-2  # what packing would train on: leaked context
        rows = [np.arange(3, 3 + k, dtype=np.int32) for k in LENGTHS]
        arrays, report = pack(rows, rows, config("pack", block_size=64), alone=True)
        assert report["one_per_row"] and len(arrays["ids"]) == 3
        check_rows(model, "train", arrays)
        with pytest.raises(UserError, match="several conversations per packed row"):
            check_rows(model, "train", pack(rows, rows, config("pack", block_size=64))[0])
        return
    assert model.packable
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=0)


def test_greedy_decoding_is_transformers_own(family):
    name, folder, model = family
    hf = theirs(folder)
    prompts = [[5, 9, 17], list(range(30, 50))]  # left-padded together, each as transformers decodes it alone
    expected = [hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False,
                            pad_token_id=0)[0, len(p):].tolist() for p in prompts]
    assert generate(model, prompts, 10, stop_id=-1) == expected, name
    stop = expected[1][3]  # a stop id ends its row there
    assert generate(model, prompts[1:], 10, stop_id=[-5, stop])[0] == expected[1][: expected[1].index(stop) + 1]


def test_export_loads_in_transformers_and_gives_our_logits(family, chatml_tok, tmp_path):
    name, folder, _ = family
    model = load_model(str(folder))
    with torch.no_grad():  # as if trained: every weight moved
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = {n: p.detach().to(torch.bfloat16).float() for n, p in model.named_parameters()}
    save_model(model, chatml_tok, str(tmp_path / "out"), like=str(folder), max_shard_bytes=40_000)
    out = tmp_path / "out"
    config, original = (json.loads((p / "config.json").read_text()) for p in (out, folder))
    kept = {k: v for k, v in original.items() if k not in ("dtype", "torch_dtype", "transformers_version")}
    assert {k: config[k] for k in kept} == kept and config["torch_dtype"] == "bfloat16"  # every field carried over
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 2 and (out / INDEX).is_file()
    assert sorted(json.loads((out / INDEX).read_text())["weight_map"]) == sorted(
        json.loads((folder / INDEX).read_text())["weight_map"])  # the checkpoint's own tensor names
    ends = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    assert chatml_tok.token_to_id("<|im_end|>") in (ends if isinstance(ends, list) else [ends])
    again, hf = load_model(str(out)), theirs(out)
    assert all(torch.equal(p, expected[n]) for n, p in again.named_parameters())  # bf16 written, bf16 read
    ids = packed_row(again.arch.vocab_size, seed=2)[0]
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_adapter_loads_in_peft_and_merges(family, tmp_path):
    from peft import PeftModel

    name, folder, _ = family
    model = load_model(str(folder))
    lora = config("train").lora
    n = add_adapters(model, dataclasses.replace(lora, rank=4), seed=0)
    assert 0 < n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.no_grad():  # B starts at zero: give the update a value
        for pname, p in model.named_parameters():
            if pname.endswith("lora_B"):
                p.copy_(0.05 * torch.randn_like(p))
    tensors = {k: p.detach() for k, p in model.named_parameters() if ".lora_" in k}
    save_adapter(tensors, dataclasses.replace(lora, rank=4), str(tmp_path / "adapter"), str(folder))
    peft = PeftModel.from_pretrained(theirs(folder), str(tmp_path / "adapter")).eval()
    ids = packed_row(model.arch.vocab_size, seed=3)[0]
    with torch.no_grad():
        ours = model.eval()(ids)
        torch.testing.assert_close(ours, peft(ids).logits, rtol=1e-4, atol=1e-4)
        assert (ours - theirs(folder)(ids).logits).abs().max() > 1e-3  # the adapters change the output
    targets = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["target_modules"]
    assert set(targets) <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                            "qkv_proj", "gate_up_proj"} and "o_proj" in targets


@pytest.mark.parametrize("name", MOE)
def test_moe_load_balancing_loss_is_transformers_own_and_logged_apart(name, chatml_tok, tmp_path):
    """Present in training, finite, with the model's own coefficient, equal to transformers' aux_loss on the same
    batch (padding left out); absent in evaluation."""
    folder = hub_folder(tmp_path / name, name, chatml_tok.get_vocab_size())
    model, hf = load_model(str(folder)), theirs(folder)
    ids = torch.randint(3, model.arch.vocab_size, (2, 24), generator=torch.Generator().manual_seed(4))
    doc = torch.zeros_like(ids)
    doc[1, 18:] = -1  # padding
    model.train()
    model(ids, ids.clone(), None, doc)
    assert model.aux_coef == hf.config.router_aux_loss_coef > 0 and torch.isfinite(model.router_loss)
    hf.train()
    expected = hf(input_ids=ids, attention_mask=(doc >= 0).long(), output_router_logits=True).aux_loss
    torch.testing.assert_close(model.router_loss / model.aux_coef, expected, rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        model(ids, ids.clone(), None, doc)
    assert model.router_loss is None


def test_memory_plan_weights_exact_and_activations_within_the_factor(family):
    name, folder, model = family
    cfg = dataclasses.replace(config("train"), batch_size=2)
    rng = np.random.default_rng(0)
    convs = [rng.integers(3, model.arch.vocab_size, n).astype(np.int32) for n in rng.integers(8, 40, 12)]
    arrays = pack(convs, [c.copy() for c in convs], PackConfig(block_size=64, overlong="drop", seed=0, weights={}),
                  alone=not model.packable)[0]
    model.train()
    real = measured_activation_bytes(model, *to_batch(arrays, [0, 1], "cpu").inputs())
    plan = plan_memory(read_config(str(folder)), cfg, 64, 1, "cpu", False)
    assert plan.weights == 4 * model.num_params() and plan.gradients == plan.weights
    assert 1 / ACTIVATION_FACTOR <= plan.activations / real <= ACTIVATION_FACTOR, (name, plan.activations, real)
    lora = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=4))
    adapters = add_adapters(load_model(str(folder)), lora.lora, 0)
    assert plan_memory(read_config(str(folder)), lora, 64, 1, "cpu", False).gradients == 4 * adapters


FP4 = torch.tensor([0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6])  # e2m1 codes 0..15


def mxfp4_folder(folder, vocab: int) -> dict[str, torch.Tensor]:
    """A gpt-oss checkpoint whose experts are stored as the Hub ships gpt-oss: MXFP4 (4-bit e2m1 values, two per
    byte, low nibble first, with one power-of-two scale per 32 along the input), config.json's quantization_config
    saying so. Returns each expert tensor as the checkpoint's values decode, (experts, in, out)."""
    from safetensors.torch import load_file, save_file

    hub_folder(folder, "gpt_oss", vocab)
    index = json.loads((folder / INDEX).read_text())
    g, decoded = torch.Generator().manual_seed(0), {}
    for file in sorted(set(index["weight_map"].values())):
        tensors = load_file(folder / file)
        for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
            E, n_in, n_out = tensors.pop(name).shape
            blocks = torch.randint(0, 256, (E, n_out, n_in // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(124, 129, (E, n_out, n_in // 32), generator=g, dtype=torch.uint8)
            values = torch.stack([FP4[(blocks & 15).long()], FP4[(blocks >> 4).long()]], -1).flatten(-2)
            decoded[name] = (values * 2.0 ** (scales.float() - 127)[..., None]).flatten(-2).transpose(1, 2)
            tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
            del index["weight_map"][name]
            index["weight_map"][f"{name}_blocks"] = index["weight_map"][f"{name}_scales"] = file
        save_file(tensors, folder / file, metadata={"format": "pt"})
    (folder / INDEX).write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"quantization_config": {"quant_method": "mxfp4"}}))
    return decoded


def test_mxfp4_experts_are_dequantized_at_import_and_exported_in_bf16(chatml_tok, tmp_path):
    decoded = mxfp4_folder(tmp_path / "gpt-oss", chatml_tok.get_vocab_size())
    model = load_model(str(tmp_path / "gpt-oss"))
    params = dict(model.named_parameters())
    for name, values in decoded.items():
        assert torch.equal(params[f"hf.{name}"], values), name  # exactly the checkpoint's values
    save_model(model, chatml_tok, str(tmp_path / "out"), like=str(tmp_path / "gpt-oss"))
    config = json.loads((tmp_path / "out/config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    again = dict(theirs(tmp_path / "out").named_parameters())  # transformers alone, as a plain bf16 model
    assert all(torch.equal(again[name], values) for name, values in decoded.items())
