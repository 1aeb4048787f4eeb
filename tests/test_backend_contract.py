"""The model interface (pipeline/backend.py) holds on both implementations: the same contract runs on the native
model and on the transformers backend, and the same Llama checkpoint gives the same loss on a packed batch and the
same weights after a few training steps on either. What neither can load is refused in one line."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.backend import choose, load_model, planner, save_adapter
from pipeline.backend import add_adapters as adapt
from pipeline.common import UserError, setup_compute
from pipeline.config import PackConfig
from pipeline.families import read_config
from pipeline.generate import generate
from pipeline.hf import to_hf_name
from pipeline.hf_backend import HFModel
from pipeline.model import Transformer
from pipeline.pack import pack
from pipeline.train import accumulate_gradients, to_batch, train
from tests.conftest import config
from tests.test_families import hub_folder

BACKENDS = ("native", "transformers")
CPU = setup_compute("cpu", "float32")


@pytest.fixture(scope="module")
def llama(chatml_tok, tmp_path_factory):
    return hub_folder(tmp_path_factory.mktemp("llama"), "llama3", chatml_tok.get_vocab_size())


def rows(vocab: int, n: int = 24, block: int = 64, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, vocab, k).astype(np.int32) for k in rng.integers(6, 30, n)]
    labels = [np.where(rng.random(len(x)) < 0.6, x, -100).astype(np.int32) for x in ids]
    return pack(ids, labels, PackConfig(block_size=block, overlong="drop", seed=0, weights={}))[0]


def hf_state(model) -> dict[str, torch.Tensor]:
    """The weights by transformers' names, whichever backend holds them."""
    if isinstance(model, Transformer):
        return {to_hf_name(n): p.detach() for n, p in model.named_parameters()}
    return {n.removeprefix("hf."): p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_contract(backend, llama):
    """forward -> (loss sum, count) and logits; packed rows equal their conversations alone; the blocks are the
    decoder layers; activation checkpointing changes no gradient; generation stops at a stop id."""
    model = load_model(str(llama), backend)
    assert isinstance(model, Transformer if backend == "native" else HFModel)
    assert len(model.blocks) == 2 and model.arch.max_seq_len == 256 and model.num_params() > 0
    batch = to_batch(rows(model.arch.vocab_size), [0, 1], "cpu")
    model.train()
    loss, n = model(*batch.inputs())
    assert n == batch.n_targets and loss.dtype == torch.float32 and getattr(model, "router_loss", None) is None
    assert model(batch.ids).shape == (2, 64, model.arch.vocab_size)
    with torch.no_grad():  # hidden states of rows with document ids, then logits at chosen positions: as forward's
        logits = model.logits(model.states(batch.ids, batch.pos, batch.doc)[batch.doc >= 0])
        torch.testing.assert_close(logits, model(batch.ids, pos=batch.pos, doc=batch.doc)[batch.doc >= 0])
    alone = 0.0
    with torch.no_grad():
        for r in range(2):
            for d in np.unique(batch.doc[r][batch.doc[r] >= 0]):
                at = batch.doc[r] == d
                alone += model(batch.ids[r][at][None], batch.labels[r][at][None])[0]
    torch.testing.assert_close(loss.detach(), alone, rtol=1e-5, atol=0)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpointing = True
    model(*batch.inputs())[0].backward()
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    out = generate(model, [[5, 6, 7], [8] * 5], 6, stop_id=-1)
    assert [len(o) for o in out] == [6, 6]
    assert generate(model, [[5, 6, 7]], 6, stop_id=out[0][2])[0] == out[0][:3]


def test_the_same_llama_on_both_backends_equal_loss_and_weights_after_training(llama):
    native, hf = load_model(str(llama), "native"), load_model(str(llama), "transformers")
    data = rows(native.arch.vocab_size, n=40)
    batch = to_batch(data, [0, 1, 2], "cpu")
    with torch.no_grad():
        a, b = native(*batch.inputs()), hf(*batch.inputs())
    assert a[1] == b[1]
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=0)
    cfg = dataclasses.replace(config("train"), max_steps=4, batch_size=2, grad_accum=2, lr=1e-3, warmup_frac=0.0,
                              save_every=0, eval_every=100)
    for model in (native, hf):
        plan_memory, shape = planner(str(llama), "native" if model is native else "transformers")
        plan = plan_memory(shape, cfg, 64, 1, "cpu", False)
        train(cfg, model, CPU, data, None, plan=plan)
    before, x, y = hf_state(load_model(str(llama), "native")), hf_state(native), hf_state(hf)
    assert x.keys() == y.keys()
    for k in x:
        assert not torch.equal(x[k], before[k]), k  # trained
        torch.testing.assert_close(y[k], x[k], rtol=1e-4, atol=1e-5)


def test_lora_exports_the_same_peft_names_on_both_backends(llama, tmp_path):
    lora = dataclasses.replace(config("train").lora, rank=4)
    names = []
    for backend in BACKENDS:
        model = load_model(str(llama), backend)
        adapt(model, lora, seed=0)
        tensors = {k: p.detach() for k, p in model.named_parameters() if ".lora_" in k}
        save_adapter(model, tensors, lora, str(tmp_path / backend), str(llama))
        from safetensors.torch import load_file

        names.append(sorted(load_file(tmp_path / backend / "adapter_model.safetensors")))
    assert names[0] == names[1] and len(names[0]) == 2 * 2 * len(lora.targets)


def test_moe_load_balancing_loss_counted_once_per_step_under_accumulation(chatml_tok, tmp_path):
    """With k micro-batches the step trains on CE_sum / N + the mean of the micro-batches' load-balancing losses
    (not k times it), and that mean is reported apart from the loss."""
    from tests.test_hf_backend import hub_folder as moe_folder

    model = load_model(str(moe_folder(tmp_path / "moe", "qwen3_moe", chatml_tok.get_vocab_size())))
    model.train()
    data = rows(model.arch.vocab_size, n=30)
    micro = [to_batch(data, [i], "cpu") for i in range(3)]
    extra = {}
    loss_sum, n = accumulate_gradients(model, micro, CPU, 1, extra)
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    total, auxes = 0, []
    for b in micro:
        part, _ = model(*b.inputs())
        auxes.append(model.router_loss)
        total = total + part / n + model.router_loss / len(micro)
    total.backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(extra["router_aux_loss"].float(), torch.stack(auxes).mean().detach())
    assert extra["router_aux_loss"] > 0 and loss_sum > 0


def test_auto_native_for_the_ported_families_transformers_otherwise(llama):
    config_json = read_config(str(llama))
    assert choose(config_json, "auto") == ("native", "model_type 'llama' is ported natively")
    name, why = choose(config_json | {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
                       "auto")
    assert name == "transformers" and "rope scaling 'yarn' is not supported" in why
    assert choose(config_json | {"model_type": "gemma3_text"}, "auto")[0] == "transformers"
    assert choose(config_json, "transformers") == ("transformers", "base.backend: transformers")
    with pytest.raises(UserError, match="model_type 'gemma3_text' is not supported"):
        choose(config_json | {"model_type": "gemma3_text"}, "native")


def refused(folder, match: str, **kw) -> None:
    with pytest.raises(UserError, match=match) as e:
        load_model(str(folder), **kw)
    assert "\n" not in str(e.value)


def test_unknown_model_type_remote_code_and_quantized_weights_are_refused_in_one_line(llama):
    original = read_config(str(llama))
    (llama / "config.json").write_text(json.dumps(original | {"model_type": "brand_new_lm"}))
    refused(llama, "model_type 'brand_new_lm' is known neither to the native backend nor to transformers")
    (llama / "config.json").write_text(json.dumps(original | {"model_type": "brand_new_lm", "auto_map": {
        "AutoModelForCausalLM": "modeling_brand_new.BrandNewForCausalLM"}}))
    refused(llama, "ships its own modeling code .* never run unless you ask for it: set base.trust_remote_code: true")
    (llama / "config.json").write_text(json.dumps(original | {"quantization_config": {"quant_method": "gptq"}}))
    refused(llama, r"quantized \(gptq\); fine-tune from the unquantized checkpoint", backend="transformers")
    (llama / "config.json").write_text(json.dumps(original))


def test_modeling_code_a_folder_ships_runs_only_when_asked(llama, tmp_path):
    """A folder with its own modeling code (config.json auto_map) is refused; with base.trust_remote_code it loads,
    gets its memory plan, and gives the same loss as the model it subclasses."""
    import shutil

    folder = tmp_path / "custom"
    shutil.copytree(llama, folder)
    (folder / "modeling_mini.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class MiniConfig(LlamaConfig):\n    model_type = 'mini_llama'\n\n\n"
        "class MiniForCausalLM(LlamaForCausalLM):\n    config_class = MiniConfig\n")
    (folder / "config.json").write_text(json.dumps(read_config(str(llama)) | {"model_type": "mini_llama", "auto_map": {
        "AutoConfig": "modeling_mini.MiniConfig", "AutoModelForCausalLM": "modeling_mini.MiniForCausalLM"}}))
    refused(folder, "set base.trust_remote_code: true")
    model = load_model(str(folder), trust_remote_code=True)
    assert type(model.hf).__name__ == "MiniForCausalLM"
    cfg = dataclasses.replace(config("train"), batch_size=2)
    plan_memory, shape = planner(str(folder), "auto", trust_remote_code=True)
    plan = plan_memory(shape, cfg, 64, 1, "cpu", False)
    assert plan.weights == 4 * model.num_params()
    batch = to_batch(rows(model.arch.vocab_size), [0, 1], "cpu")
    with torch.no_grad():
        torch.testing.assert_close(model(*batch.inputs())[0], load_model(str(llama))(*batch.inputs())[0])
