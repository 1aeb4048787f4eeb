"""The memory plan: weights, gradients and AdamW state equal the bytes of a real model and optimizer (full, LoRA,
QLoRA's NF4 codes and quantization state, AdamW8bit's moments, FSDP shards); planned activations stay within
ACTIVATION_FACTOR of what a CPU forward keeps for backward; offloaded state is checked against host memory; check_fit
names the cheapest combinations that fit, and only those; loss_chunk auto takes the largest chunk that fits."""
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
    host_free_bytes,
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
    "qlora_bf16_autocast": ({}, 4, 64, {}, {"rank": 4, "quantize": "nf4"}, True),
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
def test_planned_activations_are_within_the_stated_factor_of_the_measured(case, one_thread):
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


def applied(overrides: list[str], lora: dict | None = None, **base) -> tuple:
    """(the train config with `-S` overrides applied over `base` fields and `lora`, the process count)."""
    fields, lora, world = dict(base), dict(lora or {"rank": 0}), 1
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



# ---- QLoRA, 8-bit AdamW, offload, the loss chunk ----------------------------------------------------------------
WIDE = dict(n_embd=64, n_head=4, n_kv_head=2, head_dim=16, intermediate_size=128)  # matrices of >= 4096 elements
LLAMA_8B = dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, head_dim=128, intermediate_size=14336,
                max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, tie_embeddings=False, init_std=0.02)


@pytest.fixture
def one_thread():
    """bitsandbytes' CPU kernels start an OpenMP team at every call: on tensors this small, on a busy machine, the
    start costs far more than the work (tests/test_qlora.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def distinct_bytes(tensors) -> int:
    """Bytes of the distinct storages among `tensors` (AdamW8bit shares its code tables between tensors)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("targets", [["q_proj", "v_proj", "down_proj"],
                                     ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]])
def test_nf4_weights_with_their_quantization_state_are_the_real_bytes(variant, targets, one_thread):
    from pipeline.quant import is_nf4

    cfg = train_cfg({"rank": 4, "targets": targets, "quantize": "nf4"}, batch_size=2)
    model = model_for(VARIANTS[variant], cfg)
    quantized = [m for m in model.modules() if is_nf4(m)]
    assert len(quantized) == len(targets) * model.arch.n_layer
    state = [b for n, b in model.named_buffers() if n != "rope_freq"]  # codes, absmax, nested absmax, code, offset
    plan = plan_memory(model.arch, cfg, 32, 1, "cpu", False)
    assert plan.nf4 == nbytes(state) and plan.weights == nbytes(model.parameters()) + nbytes(state)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    loss, _ = model(*to_batch(rows(4, 32), [0, 1], "cpu").inputs())
    loss.backward()
    optimizer.step()
    assert plan.gradients == nbytes(p.grad for p in model.parameters() if p.grad is not None)
    assert plan.optimizer == nbytes(t for s in optimizer.state.values() for t in s.values())
    for p in model.parameters():  # on CUDA under bf16 the rest of the frozen base is held in bf16
        p.data = p.data if p.requires_grad else p.data.to(torch.bfloat16)
    assert plan_memory(model.arch, cfg, 32, 1, "cuda", True).weights == nbytes(model.parameters()) + nbytes(state)


@pytest.mark.parametrize("lora", [None, {"rank": 64, "targets": ["q_proj", "up_proj"], "quantize": "nf4"}])
def test_adamw8bit_state_is_the_real_bytes(lora, one_thread):
    cfg = train_cfg(lora, batch_size=2, optimizer="adamw8bit")
    model = model_for(WIDE, cfg)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    loss, _ = model(*to_batch(rows(4, 32), [0, 1], "cpu").inputs())
    loss.backward()
    optimizer.step()
    held = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    assert {t.dtype for t in held} >= {torch.uint8, torch.float32}  # 8-bit moments and fp32 ones (small tensors)
    plan = plan_memory(model.arch, cfg, 32, 1, "cpu", False)
    assert plan.optimizer == distinct_bytes(held) and plan.adamw8bit
    fp32 = plan_memory(model.arch, dataclasses.replace(cfg, optimizer="adamw"), 32, 1, "cpu", False)
    assert plan.optimizer < fp32.optimizer / 3  # ~2 bytes a moment pair's element instead of 8


def test_offload_moves_the_state_to_the_host_and_check_fit_checks_host_memory(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    arch = tiny_model(4096, n_layer=4, n_embd=128, n_head=4, n_kv_head=4, head_dim=32, intermediate_size=256).arch
    cfg = train_cfg(batch_size=8, offload="optimizer")
    plan = plan_memory(arch, cfg, 256, 1, "cuda", True)
    on_device = plan_memory(arch, dataclasses.replace(cfg, offload="none"), 256, 1, "cuda", True)
    assert plan.offloaded and plan.host() == on_device.weights + on_device.gradients + on_device.optimizer
    assert plan.total() == plan.activations + plan.loss_transient  # the state is not on the device
    assert plan.total() < on_device.total() and "offloaded to host memory" in plan.line(GIB, 8 * GIB)
    assert "plan_host_gib" in plan.metrics() and "plan_host_gib" not in on_device.metrics()
    assert not plan_memory(arch, cfg, 256, 1, "cpu", False).offloaded  # on the CPU the state is where it was
    check_fit(plan, plan.total(), cfg, 1, arch, host_free=plan.host())  # both fit: nothing raised
    with pytest.raises(UserError) as e:
        check_fit(plan, plan.total(), cfg, 1, arch, host_free=plan.host() - 1)
    assert "needs ~" in str(e.value) and "GiB of host memory" in str(e.value)
    named = proposed(str(e.value))
    for combo in named:  # what it names fits the device and the host
        new, world = applied(combo, batch_size=8, offload="optimizer")
        fitted = plan_memory(arch, new, 256, world, "cuda", True)
        assert fitted.total() <= plan.total() and fitted.host() * world <= plan.host() - 1, combo
    assert named  # here: a smaller activation footprint, and the state back on the device
    with pytest.raises(UserError) as e:  # the device has room for the state: no offload, then
        check_fit(plan, on_device.total(), cfg, 1, arch, host_free=plan.host() - 1)
    assert proposed(str(e.value))[0] == ["train.offload=none"]
    monkeypatch.setenv("SFT_HOST_MEMORY", "12GiB")
    assert host_free_bytes() == 12 * GIB
    monkeypatch.delenv("SFT_HOST_MEMORY")
    assert host_free_bytes() is None or host_free_bytes() > 0  # the kernel's MemAvailable


def test_an_8b_model_on_small_gpus_is_told_the_cheapest_combination_that_fits():
    """Llama-3.1-8B at 4 x 2048 tokens under bf16, 64 GiB of host memory: full fine-tuning on a 24 GB card is told
    LoRA with checkpointing; LoRA on a 16 GB card is told the NF4 base (QLoRA) with checkpointing."""
    from pipeline.model import Architecture
    from pipeline.memory import sized_loss_chunk

    arch = Architecture(**LLAMA_8B, vocab_size=128256)
    for lora, free, cheapest in ((None, 24 * 10**9, ["train.activation_checkpointing=true", "train.lora.rank=16"]),
                                 ({"rank": 16}, 16 * 10**9, ["train.activation_checkpointing=true",
                                                             "train.lora.quantize=nf4"])):
        cfg = sized_loss_chunk(arch, train_cfg(lora, batch_size=4, grad_accum=1), 2048, 1, "cuda", True, free)
        with pytest.raises(UserError) as e:
            check_fit(plan_memory(arch, cfg, 2048, 1, "cuda", True), free, cfg, 1, arch, host_free=64 * GIB)
        named = proposed(str(e.value))
        assert named[0] == cheapest, str(e.value)
        for combo in named:
            new, world = applied(combo, batch_size=4, grad_accum=1, loss_chunk=cfg.loss_chunk,
                                 lora={"rank": 16} if lora else {"rank": 0})
            plan = plan_memory(arch, new, 2048, world, "cuda", True)
            assert plan.total() <= free and plan.host() <= 64 * GIB, combo


def test_loss_chunk_auto_takes_the_largest_chunk_that_fits():
    """A 262k vocabulary (Gemma 3): the loss's fp32 (chunk, vocabulary) tensors dominate; auto sizes the chunk."""
    from pipeline.memory import AUTO_CHUNK, sized_loss_chunk

    arch = tiny_model(262144, n_embd=64, n_head=4, head_dim=16, intermediate_size=128).arch
    cfg = train_cfg(batch_size=4)  # loss_chunk: auto, 4 x 256 = 1024 trained positions at most
    assert cfg.loss_chunk == "auto" and sized_loss_chunk(arch, cfg, 256, 1, "cuda", True, None).loss_chunk == AUTO_CHUNK
    whole = plan_memory(arch, dataclasses.replace(cfg, loss_chunk=0), 256, 1, "cuda", True)
    assert whole.loss_transient == 4 * 256 * 262144 * 4
    assert sized_loss_chunk(arch, cfg, 256, 1, "cuda", True, whole.total()).loss_chunk == 0  # one piece fits
    sized = sized_loss_chunk(arch, cfg, 256, 1, "cuda", True, whole.total() - 1)
    assert sized.loss_chunk == 512  # the next power of two down
    plan = plan_memory(arch, sized, 256, 1, "cuda", True)
    assert plan.loss_transient == 512 * 262144 * 4 and plan.total() <= whole.total() - 1
    assert sized_loss_chunk(arch, cfg, 256, 1, "cuda", True, 1000).loss_chunk == 512  # nothing fits: the smallest
