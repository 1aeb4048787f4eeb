"""QLoRA, 8-bit AdamW and optimizer offload. QLoRA: the frozen NF4 bytes never change, only the adapters get
gradients and optimizer state, the loss falls, the logits equal transformers + bitsandbytes + PEFT's from the same
base (bit for bit on the CPU: the same quantization, the same dequantized products), and a SIGKILLed DDP run resumes
to bit-identical adapters, merged onto the base's own weights. 8-bit AdamW and offload track fp32 AdamW over a short
run and resume exactly. What does not run together fails in one line."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline.common import UserError, setup_compute
from pipeline.config import LoraConfig, SftConfig, load_params
from pipeline.hf import load_model, save_model
from pipeline.lora import ADAPTER_CARD, ADAPTER_CONFIG, adapters, add_adapters, load_adapter, save_adapter
from pipeline.quant import is_nf4, nf4_weight
from pipeline.train import evaluate_loss, to_batch, train
from tests.conftest import config, tiny_model, write_params
from tests.test_resume import TRAIN, finish, kill_after_checkpoint, make_workdir, packed, stage

CPU = setup_compute("cpu", "float32")
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NF4 = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=ALL, quantize="nf4")
WIDE = dict(n_embd=64, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=128)  # matrices of >= 4096 elements:
# AdamW8bit gives them 8-bit moments (smaller tensors keep fp32 ones)


@pytest.fixture(autouse=True)
def one_thread():
    """bitsandbytes' CPU kernels start an OpenMP team on every call: on tensors this small, on a busy machine, the
    team's start costs ~100x the work. One thread for these tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cfg_with(lora: LoraConfig | None = None, **fields) -> SftConfig:
    cfg = config("train", **({"max_steps": 6, "batch_size": 8, "save_every": 0, "lr": 1e-2, "device": "cpu",
                              "eval_every": 1000} | fields))
    return cfg if lora is None else dataclasses.replace(cfg, lora=lora)


def qlora_model(**arch) -> torch.nn.Module:
    model = tiny_model(300, **arch)
    add_adapters(model, NF4, seed=0)
    return model


def losses(live_dir) -> np.ndarray:
    return np.loadtxt(f"{live_dir}/plots/metrics/loss.tsv", skiprows=1)[:, 1]


def test_qlora_trains_only_the_adapters_on_unchanged_nf4_bytes_and_the_loss_falls(tmp_path):
    model = qlora_model()
    for name in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down"):
        linear = model.blocks[1].get_submodule(name)
        assert is_nf4(linear) and linear.weight.dtype == torch.uint8
        assert linear.weight.numel() == linear.in_features * linear.out_features // 2  # two 4-bit codes a byte
    assert not [n for n, _ in model.named_parameters() if n.endswith(("q.weight", "up.weight"))]  # no dense copy
    frozen = {n: t.clone() for n, t in model.state_dict().items() if ".lora_" not in n}
    rows = packed(16)  # 7 rows, seen again and again: the loss must fall within a few steps
    cfg = cfg_with(NF4, max_steps=20, save_every=5)
    train(cfg, model, CPU, rows, None, str(tmp_path / "live"), ckpt_dir=str(tmp_path / "ckpt"))
    curve = losses(tmp_path / "live")
    assert curve[-1] < curve[0] - 0.15, curve  # 5.72 -> ~5.42 when it trains; ~0.01 lower when it does not
    after = model.state_dict()
    for name, t in frozen.items():  # the packed codes, their quantization state, norms, embeddings
        assert torch.equal(after[name], t), f"{name} is frozen but changed"
    batch = to_batch(rows, list(range(7)), "cpu")
    loss, _ = model(*batch.inputs())
    loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == set(adapters(model))
    assert all(t.grad is None for t in model.buffers())
    state = torch.load(tmp_path / "ckpt/resume.pt", weights_only=True)
    assert set(state["model"]) == set(adapters(model))  # the checkpoint holds the adapters, not the base
    assert len(state["optimizer"]["state"]) == len(adapters(model)) == 2 * 2 * 7


def test_qlora_logits_equal_transformers_bitsandbytes_and_peft_from_the_same_base(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_model(tok.get_vocab_size(), tie_embeddings=False)
    save_model(base, tok, str(tmp_path / "base"))
    model = load_model(str(tmp_path / "base"))
    add_adapters(model, NF4, seed=1)
    with torch.no_grad():
        for t in adapters(model).values():
            t.normal_(0, 0.3)  # B = 0 would make the adapters invisible
    model.eval()
    ids = torch.randint(0, tok.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(ids)
    save_adapter(adapters(model), NF4, str(tmp_path / "adapter"), str(tmp_path / "base"))
    config_json = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config_json["base_model_quantization"]["bnb_4bit_quant_type"] == "nf4"
    assert "nf4" in (tmp_path / "adapter" / ADAPTER_CARD).read_text()
    tensors, cfg = load_adapter(str(tmp_path / "adapter"))
    assert cfg.quantize == "nf4" and sorted(cfg.targets) == sorted(ALL)
    assert all(torch.equal(tensors[n], t) for n, t in adapters(model).items())
    nf4 = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32,
                                                               quantization_config=nf4, device_map="cpu")
    q = theirs.model.layers[0].self_attn.q_proj.weight  # bitsandbytes' Params4bit
    assert torch.equal(q.data.flatten(), model.blocks[0].attn.q.weight.flatten())  # the same 4-bit codes
    assert torch.equal(q.quant_state.absmax, model.blocks[0].attn.q.weight_absmax)  # and 8-bit absmax
    with pytest.warns(UserWarning, match="base_model_quantization"):  # PEFT ignores the key it does not know
        theirs = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "adapter"))
    # training mode (dropout is 0): the path training takes, dequantize then matmul; bitsandbytes' CPU inference
    # kernel (eval mode on AVX512-bf16 machines) repacks the codes and needs widths of 64 and more
    theirs.train()
    with torch.no_grad():
        reference = theirs(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)  # equal on the CPU; the tolerance is slack
    plain = load_model(str(tmp_path / "base"))  # the same adapters on the unquantized base: another model
    add_adapters(plain, dataclasses.replace(NF4, quantize="none"), seed=1)
    plain.load_state_dict(adapters(model), strict=False)
    with torch.no_grad():
        assert (plain.eval()(ids) - ours).abs().max() > 0.05


def test_generation_fuses_the_dequantized_weights_plus_the_adapters():
    from pipeline.generate import KVCache

    model = qlora_model()
    with torch.no_grad():
        for t in adapters(model).values():
            t.normal_(0, 0.3)
    cache = KVCache(model, batch=1, max_len=8)
    q = model.blocks[0].attn.q
    torch.testing.assert_close(cache.qkv[0][: q.out_features], nf4_weight(q, torch.float32) + q.delta())


def test_adamw8bit_and_offload_track_fp32_adamw(tmp_path):
    """Over 10 steps the 8-bit moments move the loss by < 0.1% of fp32 AdamW's (measured: ~1e-4 relative; a wrong
    beta, eps or decay moves it by more); offload on the CPU runs FSDP2 over one process with the same fp32 AdamW
    arithmetic: the same curve."""
    curves = {}
    for name, fields in (("adamw", {}), ("adamw8bit", {"optimizer": "adamw8bit"}),
                         ("offload", {"offload": "optimizer"})):
        cfg = cfg_with(max_steps=10, lr=3e-3, save_every=5, **fields)
        train(cfg, tiny_model(300, **WIDE), CPU, packed(), None, str(tmp_path / name), ckpt_dir=str(tmp_path / name))
        curves[name] = losses(tmp_path / name)
    assert curves["adamw"][-1] < curves["adamw"][0] - 0.2  # it trains
    np.testing.assert_allclose(curves["adamw8bit"], curves["adamw"], rtol=1e-3)
    assert not np.array_equal(curves["adamw8bit"], curves["adamw"])  # 8-bit moments, really
    state = torch.load(tmp_path / "adamw8bit/resume.pt", weights_only=True)["optimizer"]["state"]
    kinds = {entry["__bnb_optimizer_quant_state__"]["state1"].dtype if "__bnb_optimizer_quant_state__" in entry
             else entry["state1"].dtype for entry in state.values()}
    assert kinds == {torch.uint8, torch.float32}  # 8-bit for the big matrices, fp32 for norms
    np.testing.assert_allclose(curves["offload"], curves["adamw"], rtol=1e-6)
    assert list((tmp_path / "offload").glob("resume-step5-rank0.pt"))  # the sharded checkpoint of FSDP2


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.mark.parametrize("setting", ["adamw8bit", "offload", "qlora"])
def test_resume_in_process_is_exact(tmp_path, capsys, setting):
    fields = {"adamw8bit": {"optimizer": "adamw8bit"}, "offload": {"offload": "optimizer"}, "qlora": {}}[setting]
    cfg = cfg_with(NF4 if setting == "qlora" else None, max_steps=6, save_every=2, **fields)
    make = qlora_model if setting == "qlora" else (lambda: tiny_model(300, **WIDE))
    whole = make()
    train(cfg, whole, CPU, packed(), None, ckpt_dir=str(tmp_path))  # leaves the step-4 checkpoint behind
    resumed = make()
    capsys.readouterr()
    train(cfg, resumed, CPU, packed(), None, ckpt_dir=str(tmp_path))
    assert "resuming from" in capsys.readouterr().out
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(full(a[name]), full(b[name])), name


def test_qlora_falls_in_its_dev_loss_like_lora_on_the_same_base():
    """NF4 noise in the frozen base moves the dev loss a little, not the way it trains."""
    dev = packed(24, seed=1)
    ends = {}
    for quantize in ("none", "nf4"):
        model = tiny_model(300)
        add_adapters(model, dataclasses.replace(NF4, quantize=quantize), seed=0)
        start = evaluate_loss(model, dev, 8, CPU)
        train(cfg_with(dataclasses.replace(NF4, quantize=quantize), max_steps=8), model, CPU, packed(), None)
        ends[quantize] = (start, evaluate_loss(model, dev, 8, CPU))
    assert ends["nf4"][1] < ends["nf4"][0] and ends["none"][1] < ends["none"][0]
    assert abs(ends["nf4"][0] - ends["none"][0]) < 0.01 and abs(ends["nf4"][1] - ends["none"][1]) < 0.02


def test_what_does_not_run_together_fails_in_one_line(tmp_path):
    for train_params, said in (
            ({"parallel": "fsdp", "lora": {"rank": 8, "quantize": "nf4"}}, "train.lora.quantize='nf4' does not run "
             "under FSDP2"),
            ({"offload": "optimizer", "lora": {"rank": 8, "quantize": "nf4"}}, "train.lora.quantize='nf4' does not "
             "run under FSDP2"),
            ({"lora": {"rank": 0, "quantize": "nf4"}}, "nf4 (QLoRA) needs adapters"),
            ({"parallel": "fsdp", "optimizer": "adamw8bit"}, "train.optimizer='adamw8bit' does not run on FSDP2"),
            ({"nproc": 2, "offload": "optimizer"}, "with nproc > 1 set parallel: fsdp"),
            ({"optimizer": "sgd"}, "train.optimizer='sgd' must be one of adamw, adamw8bit"),
            ({"loss_chunk": "big"}, "train.loss_chunk='big' must be auto or a number")):
        write_params(tmp_path, train=train_params)
        with pytest.raises(UserError) as e:
            load_params("train", SftConfig, str(tmp_path / "params.yaml"))
        assert said in str(e.value) and "\n" not in str(e.value), str(e.value)
    write_params(tmp_path, train={"loss_chunk": 4096, "offload": "optimizer", "parallel": "fsdp", "nproc": 2})
    cfg = load_params("train", SftConfig, str(tmp_path / "params.yaml"))  # a number stays a number
    assert cfg.loss_chunk == 4096 and cfg.offload == "optimizer"


@pytest.fixture
def workdir(tmp_path, tok):
    return make_workdir(tmp_path, tok)


@pytest.mark.slow
def test_qlora_on_two_ranks_killed_after_a_checkpoint_resumes_to_bit_identical_adapters(workdir):
    """DDP on 2 gloo ranks with an NF4 base; the merged export adds the adapters to the base's weights as they are
    on disk, never to the dequantized NF4 ones."""
    run = TRAIN | {"max_steps": 8, "save_every": 2, "nproc": 2, "batch_size": 4, "lr": 1e-2,
                   "lora": {"rank": 4, "quantize": "nf4"}}
    finish(stage(workdir, "whole", run))
    kill_after_checkpoint(workdir, "killed", run)
    log = finish(stage(workdir, "killed", run))
    assert "resuming from ckpt/killed/resume.pt at step" in log and "of it NF4" in log
    files = [(workdir / f"adapter/{n}/adapter_model.safetensors").read_bytes() for n in ("whole", "killed")]
    assert files[0] == files[1]
    merged = [(workdir / f"out/{n}/model.safetensors").read_bytes() for n in ("whole", "killed")]
    assert merged[0] == merged[1]
    tensors, cfg = load_adapter(str(workdir / "adapter/whole"))
    assert cfg.quantize == "nf4"
    base = load_file(workdir / "base/model.safetensors")
    out = load_file(workdir / "out/whole/model.safetensors")
    key, ours = "model.layers.0.self_attn.q_proj.weight", "blocks.0.attn.q"
    delta = cfg.alpha / cfg.rank * (tensors[f"{ours}.lora_B"] @ tensors[f"{ours}.lora_A"]).numpy()
    assert np.abs(delta).max() > 1e-3  # the adapters trained
    np.testing.assert_allclose(out[key], base[key] + delta, rtol=0, atol=1e-6)  # onto the weights on disk
    linear = tiny_model(300).blocks[0].attn.q  # the same weight quantized as training held it
    linear.weight.data = torch.from_numpy(base[key])
    from pipeline.quant import store_nf4

    store_nf4(linear)
    assert np.abs(out[key] - (nf4_weight(linear, torch.float32).numpy() + delta)).max() > 1e-3
