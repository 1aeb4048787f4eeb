"""LoRA: only the adapters train and hold AdamW state; the merged export is the adapted model; PEFT loads the
adapter folder onto the base with the same logits; a SIGKILLed run resumes to bit-identical adapters; 2 gloo ranks
equal 1 rank with twice the batch. NEFTune: noise of the stated scale in training forward passes only."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from pipeline.common import setup_compute
from pipeline.config import LoraConfig
from pipeline.hf import load_model, save_model
from pipeline.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    adapters,
    add_adapters,
    load_adapter,
    merge_into,
    save_adapter,
)
from pipeline.train import to_batch, train
from tests.conftest import config, tiny_model
from tests.test_resume import TRAIN, finish, kill_after_checkpoint, make_workdir, packed, stage

CPU = setup_compute("cpu", "float32")
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
                  quantize="none")


@pytest.fixture
def workdir(tmp_path, tok):
    return make_workdir(tmp_path, tok)


def lora_cfg(**fields):
    return config("train", **({"lora": LORA, "max_steps": 4, "batch_size": 8, "save_every": 2, "lr": 1e-2,
                               "device": "cpu"} | fields))


def test_only_the_adapters_change_and_only_they_have_optimizer_state(tmp_path):
    model = tiny_model(300)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    n_adapter = add_adapters(model, LORA, seed=0)
    # 2 blocks, r=4, (in + out) of q 32->32, v 32->16 (2 kv heads of 8), o 32->32, up 32->64, down 64->32
    assert n_adapter == 2 * 4 * ((32 + 32) + (32 + 16) + (32 + 32) + (32 + 64) + (64 + 32))
    cfg = lora_cfg(max_steps=3)
    train(cfg, model, CPU, packed(), None, ckpt_dir=str(tmp_path))  # leaves the step-2 checkpoint behind
    after = model.state_dict()
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} is frozen but changed"
    lora_b = [t for n, t in after.items() if n.endswith("lora_B")]
    assert len(lora_b) == 10 and all(t.abs().sum() > 0 for t in lora_b)  # B started at zero and trained
    state = torch.load(tmp_path / "resume.pt", weights_only=True)
    assert set(state["model"]) == set(adapters(model))  # the checkpoint holds the adapters, not the base
    moments = state["optimizer"]["state"]
    assert len(moments) == 20 and all(s["exp_avg"].shape in {t.shape for t in adapters(model).values()}
                                       for s in moments.values())


def test_merged_export_equals_the_adapted_model_and_peft_loads_the_adapter(tmp_path, tok):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    base = tiny_model(tok.get_vocab_size(), tie_embeddings=False)
    save_model(base, tok, str(tmp_path / "base"))
    model = load_model(str(tmp_path / "base"))
    add_adapters(model, LORA, seed=1)
    with torch.no_grad():
        for t in adapters(model).values():
            t.normal_(0, 0.3)  # B = 0 would make every comparison below trivially true
    model.eval()
    ids = torch.randint(0, tok.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(0))
    adapted = model(ids)
    merged = merge_into(load_model(str(tmp_path / "base")), adapters(model), LORA)
    torch.testing.assert_close(merged(ids), adapted, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(load_model(str(tmp_path / "base"))(ids), adapted, atol=1e-2)
    save_adapter(adapters(model), LORA, str(tmp_path / "adapter"), str(tmp_path / "base"))
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    tensors, cfg = load_adapter(str(tmp_path / "adapter"))
    assert cfg.rank == 4 and sorted(cfg.targets) == sorted(LORA.targets)
    assert all(torch.equal(tensors[n], t) for n, t in adapters(model).items())
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(theirs, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, adapted, rtol=1e-4, atol=1e-4)


def test_generation_applies_the_adapters():
    """The KV cache fuses q, k, v and gate, up weights: it must take the adapted ones (pipeline.model.weight_of)."""
    from pipeline.generate import KVCache

    model = tiny_model(300)
    add_adapters(model, LORA, seed=0)
    with torch.no_grad():
        for t in adapters(model).values():
            t.normal_(0, 0.3)
    cache = KVCache(model, batch=1, max_len=8)
    q = model.blocks[0].attn.q
    torch.testing.assert_close(cache.qkv[0][: q.out_features], q.weight + q.delta())


def test_neftune_noise_in_training_forward_passes_only_at_the_stated_scale():
    model = tiny_model(300)
    model.neftune_alpha = 5.0
    arrays = packed(block=64)
    lengths = (arrays["doc"] >= 0).sum(1)
    rows = [int(np.argmin(lengths)), int(np.argmax(lengths))]  # two rows of different real lengths
    batch = to_batch(arrays, rows, "cpu")
    seen = []
    model.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    clean = model.embed(batch.ids).detach()
    model.train()
    model(*batch.inputs())
    noise = seen[-1] - clean
    d = model.arch.n_embd
    for r, row in enumerate(rows):
        scale = 5.0 / np.sqrt(lengths[row] * d)
        assert noise[r].abs().max() <= scale * (1 + 1e-5)
        assert noise[r].std().item() == pytest.approx(scale / np.sqrt(3), rel=0.1)  # uniform on [-scale, scale]
    with torch.no_grad():  # a training-mode pass with no gradient (the dev loss): no noise
        model(*batch.inputs())
    assert torch.equal(seen[-1], clean)
    model.eval()
    model(*batch.inputs())
    assert torch.equal(seen[-1], clean)
    # train() switches it on from the param; the same run without it takes another first step
    models = [tiny_model(300), tiny_model(300)]
    losses = [train(config("train", neftune_alpha=a, max_steps=1, batch_size=8, device="cpu"), m, CPU, packed(),
                    None)["loss"] for a, m in zip((0.0, 5.0), models)]
    assert models[1].neftune_alpha == 5.0 and losses[0] != losses[1]


@pytest.mark.slow
def test_lora_run_on_two_ranks_killed_after_a_checkpoint_resumes_to_bit_identical_adapters(workdir):
    """DDP on 2 gloo ranks, with LoRA dropout and NEFTune: random draws on every rank, each rank its own, which the
    checkpoint must hold per rank for the resumed run to draw what the whole run drew."""
    run = TRAIN | {"max_steps": 16, "nproc": 2, "batch_size": 4, "lora": {"rank": 4, "dropout": 0.1},
                   "neftune_alpha": 5.0}
    finish(stage(workdir, "whole", run))
    kill_after_checkpoint(workdir, "killed", run)
    log = finish(stage(workdir, "killed", run))
    assert "resuming from ckpt/killed/resume.pt at step" in log
    for name in ("whole", "killed"):
        assert (workdir / f"adapter/{name}/adapter_config.json").is_file()
    files = [(workdir / f"adapter/{n}/adapter_model.safetensors").read_bytes() for n in ("whole", "killed")]
    assert files[0] == files[1]
    merged = [(workdir / f"out/{n}/model.safetensors").read_bytes() for n in ("whole", "killed")]
    assert merged[0] == merged[1]
    base = load_file(workdir / "base/model.safetensors")
    out = load_file(workdir / "out/whole/model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert not np.array_equal(out[key], base[key])  # the adapters were merged into the exported weights
    for frozen in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.1.input_layernorm.weight"):
        assert np.array_equal(out[frozen], base[frozen]), frozen  # no adapter there: the base's own
