"""The memory plan: weights, gradients and AdamW state equal the bytes of a real model and optimizer (full, LoRA,
FSDP shards); planned activations stay within ACTIVATION_FACTOR of what a CPU forward keeps for backward; check_fit
names only alternatives that fit."""
import dataclasses

import numpy as np
import pytest
import torch

from pipeline.common import UserError
from pipeline.lora import add_adapters
from pipeline.memory import (
    ACTIVATION_FACTOR,
    GIB,
    adapter_shapes,
    check_fit,
    device_free_bytes,
    gib,
    loss_chunk_of,
    measured_activation_bytes,
    parameter_shapes,
    plan_memory,
)
from pipeline.pack import pack
from pipeline.train import make_optimizer, to_batch
from tests.conftest import config, tiny_model

VOCAB = 300
VARIANTS = {"llama": {}, "qwen2": dict(qkv_bias=True, n_head=4, n_kv_head=1),
            "qwen3": dict(qk_norm=True, o_bias=True, head_dim=16, tie_embeddings=False),
            "mlp_bias": dict(mlp_bias=True, n_kv_head=4, n_layer=3)}


def train_cfg(lora: dict | None = None, **fields):
    cfg = config("train", **fields)
    return dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, **(lora or {"rank": 0})))


def rows(n: int, block: int, seed: int = 0) -> dict:
    """Packed rows whose tokens are all trained: the plan counts the most trained positions a row can have."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, VOCAB, rng.integers(block // 2, block)).astype(np.int32) for _ in range(n)]
    return pack(ids, [x.copy() for x in ids], config("pack", block_size=block))[0]


def model_for(arch_kw: dict, cfg) -> torch.nn.Module:
    model = tiny_model(VOCAB, **arch_kw)
    if cfg.lora.rank:
        add_adapters(model, cfg.lora, seed=0)
    return model


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_shapes_are_those_of_a_built_model(variant):
    model = tiny_model(VOCAB, **VARIANTS[variant])
    assert parameter_shapes(model.arch) == {n: tuple(p.shape) for n, p in model.named_parameters()}
    cfg = train_cfg({"rank": 3, "targets": ["q_proj", "o_proj", "up_proj", "down_proj"]})
    add_adapters(model, cfg.lora, seed=0)
    assert adapter_shapes(model.arch, cfg.lora) == {n: tuple(p.shape) for n, p in model.named_parameters()
                                                    if ".lora_" in n}


@pytest.mark.parametrize("variant", ["llama", "qwen3", "mlp_bias"])
@pytest.mark.parametrize("lora", [None, {"rank": 4, "targets": ["q_proj", "v_proj", "down_proj"]}])
def test_weights_gradients_and_adamw_state_are_the_real_bytes(variant, lora):
    cfg = train_cfg(lora, batch_size=2)
    model = model_for(VARIANTS[variant], cfg)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    batch = to_batch(rows(4, 32), [0, 1], "cpu")
    loss, _ = model(*batch.inputs())
    loss.backward()
    optimizer.step()
    plan = plan_memory(model.arch, cfg, 32, 1, "cpu", False)
    assert plan.weights == nbytes(model.parameters())  # parameters() lists a tied weight once
    assert plan.gradients == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    assert plan.optimizer == nbytes(t for state in optimizer.state.values() for t in state.values())
    assert plan == plan_memory(model.arch, cfg, 32, 2, "cpu", False)  # DDP: every rank holds everything
    if lora:  # on CUDA under bf16 the frozen base is held in bf16, the adapters stay fp32
        for p in model.parameters():
            p.data = p.data if p.requires_grad else p.data.to(torch.bfloat16)
        assert plan_memory(model.arch, cfg, 32, 1, "cuda", True).weights == nbytes(model.parameters())
        assert plan_memory(model.arch, cfg, 32, 1, "cuda", False).weights == plan.weights  # fp32 run: fp32 base


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("lora", [None, {"rank": 3, "targets": ["k_proj", "gate_proj"]}])
def test_fsdp_plans_the_largest_shard_of_every_tensor(world, lora):
    cfg = train_cfg(lora, parallel="fsdp")
    model = model_for(VARIANTS["qwen3"] | dict(n_embd=40, n_head=5, n_kv_head=5, head_dim=8, intermediate_size=67,
                                             mlp_bias=True),
                      cfg)
    # torch.chunk is how FSDP2 splits dim 0; its first chunk is the largest, and every rank's padded shard its size
    first = [(p.detach().chunk(world)[0], p.requires_grad) for p in model.parameters()]
    trained = [shard for shard, trains in first if trains]
    plan = plan_memory(model.arch, cfg, 32, world, "cpu", False)
    assert plan.weights == nbytes(shard for shard, _ in first)
    assert plan.gradients == 4 * sum(t.numel() for t in trained)
    assert plan.optimizer == 8 * sum(t.numel() for t in trained) + 4 * len(trained)  # `step` is not sharded
    assert plan.weights < plan_memory(model.arch, cfg, 32, 1, "cpu", False).weights


ACTIVATION_CASES = {  # name: (architecture, batch rows, tokens, train fields, lora, bf16 autocast)
    "tiny": ({}, 4, 64, {}, None, False),
    "wide_untied_biases_qknorm": (dict(n_embd=64, n_head=8, n_kv_head=2, intermediate_size=160, qkv_bias=True,
                                       qk_norm=True, tie_embeddings=False), 2, 128, {}, None, False),
    "four_layers_chunked_loss": (dict(n_layer=4), 3, 64, {"loss_chunk": 64}, None, False),
    "lora_dropout": ({}, 4, 64, {}, {"rank": 4, "dropout": 0.05, "targets": ["q_proj", "v_proj", "down_proj"]},
                     False),
    "lora_all_no_dropout": (dict(n_kv_head=4), 4, 64, {}, {"rank": 8, "dropout": 0.0}, False),
    "bf16_autocast": (dict(qk_norm=True), 4, 64, {}, None, True),
}


def measured(model, batch, bf16: bool) -> tuple[int, int]:
    """(without, with checkpointing) bytes kept for backward. With checkpointing the hooks see only what lies
    outside the blocks; the checkpoints hold each block's arguments (x, cos, sin, mask: caught by a pre-hook), and
    backward holds one recomputed block at a time: one block's share of the uncheckpointed run, less its input x,
    counted already."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        full = measured_activation_bytes(model, *batch.inputs())
    model.checkpointing, args, xs = True, {}, {}

    def held(_, inputs):
        for t in inputs:
            args[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        xs[inputs[0].untyped_storage().data_ptr()] = inputs[0].untyped_storage().nbytes()

    hooks = [block.register_forward_pre_hook(held) for block in model.blocks]
    with autocast:
        outside = measured_activation_bytes(model, *batch.inputs())
    for hook in hooks:
        hook.remove()
    shared = sum(n for ptr, n in args.items() if ptr not in xs)  # cos, sin and the bool mask
    x = sum(xs.values())
    return full, outside + x + shared + (full - outside - x) // model.arch.n_layer


@pytest.mark.parametrize("case", ACTIVATION_CASES)
def test_planned_activations_are_within_the_stated_factor_of_the_measured(case):
    arch_kw, batch_size, tokens, fields, lora, bf16 = ACTIVATION_CASES[case]
    cfg = train_cfg(lora, batch_size=batch_size, **fields)
    model = model_for(arch_kw, cfg)
    model.train()
    model.loss_chunk = loss_chunk_of(cfg)  # what the plan takes an unsized auto for
    batch = to_batch(rows(4 * batch_size, tokens), list(range(batch_size)), "cpu")
    full, checkpointed = measured(model, batch, bf16)
    plan = plan_memory(model.arch, cfg, tokens, 1, "cpu", bf16)
    assert checkpointed < full
    for planned, real in ((plan.activations, full), (plan.activations_checkpointed, checkpointed)):
        assert 1 / ACTIVATION_FACTOR <= planned / real <= ACTIVATION_FACTOR, (case, planned, real)


def proposed(message: str) -> list[list[str]]:
    """check_fit's combinations, cheapest first: `dvc exp run -S a -S b (else: -S c; -S d -S e)` -> [[a, b], ...]."""
    command = message.split("cheapest that fits: dvc exp run ")[1]
    first, _, others = command.partition(" (else: ")
    return [combo.removeprefix("-S ").split(" -S ") for combo in [first, *others.removesuffix(")").split("; ")]
            if combo]


def applied(overrides: list[str], **base) -> tuple:
    """(the train config with `-S` overrides applied over `base` fields, the process count)."""
    fields, lora, world = dict(base), {"rank": 0}, 1
    for override in overrides:
        key, value = override.removeprefix("train.").split("=")
        value = True if value == "true" else int(value) if value.isdigit() else value
        if key.startswith("lora."):
            lora[key.removeprefix("lora.")] = value
        else:
            fields[key] = value
            world = value if key == "nproc" else world
    return train_cfg(lora, **fields), world


def test_check_fit_names_the_cheapest_combinations_that_fit():
    arch = tiny_model(4096, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, head_dim=32, intermediate_size=256).arch
    cfg = train_cfg(batch_size=8, grad_accum=2)
    plan = plan_memory(arch, cfg, 256, 1, "cuda", True)
    lora = plan_memory(arch, train_cfg({"rank": 16}, batch_size=8, grad_accum=2), 256, 1, "cuda", True)
    free = lora.total()
    assert plan.total() > free
    with pytest.raises(UserError) as e:
        check_fit(plan, free, cfg, 1, arch)
    message = str(e.value)
    assert "\n" not in message and len(message) < 300
    assert f"needs ~{gib(plan.total())} GiB per rank but {gib(free)} GiB is free" in message
    named = proposed(message)
    for combo in named:  # each, applied, really fits, and none is a superset of one named before it
        new, world = applied(combo, batch_size=8, grad_accum=2)
        assert plan_memory(arch, new, 256, world, "cuda", True).total() <= free, combo
    assert not any(set(a) <= set(b) for i, a in enumerate(named) for b in named[i + 1:])
    assert len(named) == 3 and named[0] == ["train.activation_checkpointing=true"]  # the cheapest change
    check_fit(plan, plan.total(), cfg, 1, arch)  # enough: nothing raised
    check_fit(plan, None, cfg, 1, arch)  # unknown (CPU): nothing to check
    with pytest.raises(UserError, match="more memory"):
        check_fit(plan, 1000, cfg, 1, arch)


def test_pretraining_config_plans_full_training_without_lora_or_fsdp_advice():
    pretrain = config("base").pretrain
    arch = tiny_model(VOCAB).arch
    plan = plan_memory(arch, pretrain, 64, 2, "cpu", False)
    assert plan.gradients == 4 * sum(map(np.prod, parameter_shapes(arch).values()))
    checkpointed = dataclasses.replace(pretrain, activation_checkpointing=True)
    with pytest.raises(UserError) as e:
        check_fit(plan, plan_memory(arch, checkpointed, 64, 2, "cpu", False).total(), pretrain, 2, arch)
    assert "base.pretrain.activation_checkpointing=true" in str(e.value)
    assert "lora" not in str(e.value) and "fsdp" not in str(e.value)


def test_plan_line_and_metrics():
    cfg = train_cfg(activation_checkpointing=True)
    plan = plan_memory(tiny_model(VOCAB).arch, cfg, 64, 1, "cpu", False)
    assert plan.total() == (plan.weights + plan.gradients + plan.optimizer + plan.activations_checkpointed
                            + plan.loss_transient)
    assert plan.loss_transient == cfg.batch_size * 64 * VOCAB * 4  # unchunked (8192 > B x 64): one more fp32 (N, V)
    assert plan.line(None).startswith("memory plan per rank: weights ") and "free: unknown (CPU)" in plan.line(None)
    assert plan.line(3 * GIB).endswith("GiB of 3.00 GiB free") and "\n" not in plan.line(3 * GIB)
    metrics = plan.metrics()
    assert set(metrics) == {f"plan_{k}_gib" for k in ("weights", "gradients", "optimizer", "activations",
                                                      "activations_checkpointed", "loss_transient", "total")}
    assert metrics["plan_total_gib"] == plan.total() / GIB


def test_device_free_bytes_reads_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SFT_DEVICE_MEMORY", raising=False)
    assert device_free_bytes(cpu) is None
    for text, expected in (("24GiB", 24 * 2**30), ("80GB", 80 * 10**9), ("1.5 TiB", 3 * 2**39), ("12345", 12345)):
        monkeypatch.setenv("SFT_DEVICE_MEMORY", text)
        assert device_free_bytes(cpu) == expected
    monkeypatch.setenv("SFT_DEVICE_MEMORY", "lots")
    with pytest.raises(UserError, match="SFT_DEVICE_MEMORY"):
        device_free_bytes(cpu)

