"""One command for the CUDA path, on a machine with a GPU:

    python -m bench.gpu_check            # every check; PASS/FAIL/SKIP per line, exit status 1 if any failed

Checks what only a GPU can show: the dtypes reaching FlexAttention under bf16 autocast; FlexAttention against SDPA
on packed rows in bf16 (loss and gradient); the blocks compiled as training compiles them, with no recompile on the
second step and with activation checkpointing; generation under autocast and between training steps without
recompiling the training graphs; fused AdamW lowering the loss; the 124M benchmark row (tokens/s, MFU nominal and
executed, bench/train_bench.py); and with two GPUs, a torchrun DDP run with grad_accum 2 that leaves a checkpoint and
a second run that resumes from it; LoRA with its frozen base in bf16; QLoRA, 8-bit AdamW and optimizer offload; and
with two GPUs, FSDP2 against one GPU.
Under five minutes on an H100/H200.

On a machine without CUDA it runs the subset that can run on the CPU (the dtype probe and FlexAttention forward,
the blocks compiled on the CPU, the recompile counts) and says SKIP for the rest, so it cannot rot unnoticed
(tests/test_gpu_check.py runs it in `make test`)."""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
import torch._dynamo as dynamo

import pipeline.model as model_module
from pipeline.common import setup_compute
from pipeline.config import PackConfig, SftConfig, load_params
from pipeline.generate import generate
from pipeline.model import Architecture, Transformer
from pipeline.pack import pack
from pipeline.train import accumulate_gradients, configure, make_optimizer, to_batch, train

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
COMPUTE = setup_compute(DEVICE, "bfloat16")  # bf16 autocast, as training on CUDA (the CPU runs it too)
BLOCK = 512  # tokens per packed row: four FlexAttention tiles


def small_model(seed: int = 0) -> Transformer:
    width = 256 if CUDA else 64  # the CPU compiles and runs a smaller one
    cfg = Architecture(n_layer=2, n_embd=width, n_head=4, n_kv_head=2, head_dim=width // 4, intermediate_size=2 * width,
                       max_seq_len=BLOCK, vocab_size=1024, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
                       init_std=0.02)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    return model.to(DEVICE)


def packed_rows(n: int = 200, seed: int = 0) -> dict:
    """Random conversations of 20..300 tokens (many cross the 128-token tiles), the second half trained."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(8, 1024, int(rng.integers(20, 300))).astype(np.int32) for _ in range(n)]
    labels = [np.where(np.arange(len(x)) >= len(x) // 2, x, -100).astype(np.int32) for x in ids]
    return pack(ids, labels, PackConfig(block_size=BLOCK, overlong="drop", seed=0, weights={}))[0]


def train_cfg(**fields) -> SftConfig:
    """The project's SFT settings (params.yaml) with the check's own."""
    import dataclasses

    return dataclasses.replace(load_params("train", SftConfig, str(ROOT / "params.yaml")), device=DEVICE, **fields)


def graphs() -> int:
    return dynamo.utils.counters["stats"]["unique_graphs"]


def loss_and_grad(model: Transformer, batch, flex: bool, backward: bool = CUDA) -> tuple[float, torch.Tensor | None]:
    """Mean loss per trained target of one batch (and the gradient of the first query projection)."""
    model.use_flex = flex
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(backward), COMPUTE.autocast():
        loss_sum, n = model(*batch.inputs())
    if not backward:
        return loss_sum.item() / n, None
    loss_sum.backward()
    return loss_sum.item() / n, model.blocks[0].attn.q.weight.grad.detach().clone()


# ---- the checks ------------------------------------------------------------------------------------------------
def attention_dtypes() -> str:
    """What Attention hands to FlexAttention under bf16 autocast: one dtype, bf16."""
    model, batch = small_model(), to_batch(packed_rows(), range(4), DEVICE)
    seen, inner = [], model_module.flex

    def spy(q, k, v, block_mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return inner(q, k, v, block_mask)

    model_module.flex = spy
    try:
        loss_and_grad(model, batch, flex=True)
    finally:
        model_module.flex = inner
    assert seen and set(seen) == {(torch.bfloat16,) * 3}, f"q, k, v reach FlexAttention as {seen[0]}"
    return f"{len(seen)} calls, q/k/v bf16"


def flex_vs_sdpa() -> str:
    """FlexAttention with the block mask against SDPA with the dense mask, on packed rows in bf16."""
    model, batch = small_model(), to_batch(packed_rows(), range(4), DEVICE)
    (a, ga), (b, gb) = loss_and_grad(model, batch, flex=False), loss_and_grad(model, batch, flex=True)
    sparsity = model_module.flex_block_mask(batch.doc).sparsity()
    assert abs(a - b) / a < 1e-2, (a, b)
    if ga is None:
        return f"forward only (no CPU backward): loss sdpa {a:.4f} flex {b:.4f}, block mask {sparsity:.0f}% sparse"
    rel = ((ga - gb).norm() / ga.norm()).item()
    assert rel < 5e-2, rel
    return f"loss sdpa {a:.4f} flex {b:.4f}, gradient rel. diff {rel:.3f}, block mask {sparsity:.0f}% sparse"


def compiled_blocks() -> str:
    """The blocks compiled as configure() compiles them: the loss of the eager model, no recompile on the second
    step, and activation checkpointing on top."""
    dynamo.reset()
    model, batch = small_model(), to_batch(packed_rows(), range(4), DEVICE)
    eager, _ = loss_and_grad(model, batch, flex=CUDA, backward=True)
    model.compile_blocks()
    first, _ = loss_and_grad(model, batch, flex=CUDA, backward=True)
    n = graphs()
    second, _ = loss_and_grad(model, batch, flex=CUDA, backward=True)
    assert graphs() == n, f"the second step recompiled ({n} -> {graphs()} graphs)"
    model.checkpointing = True
    recomputed, _ = loss_and_grad(model, batch, flex=CUDA, backward=True)
    model.checkpointing = False
    for name, value in (("compiled", first), ("second step", second), ("checkpointed", recomputed)):
        assert abs(value - eager) / eager < 1e-2, (name, value, eager)
    assert model_module._flex_compiled is not model_module.flex_attention or not CUDA, "eager flex left behind"
    return f"loss eager {eager:.4f}, compiled {first:.4f}, checkpointed {recomputed:.4f}; {n} graphs, none added"


def generation_without_recompiles() -> str:
    """Decoding under autocast between two compiled training steps, as the evaluator runs during training: the
    training graphs neither grow nor change, and the tokens agree with fp32 decoding."""
    dynamo.reset()
    model = small_model()
    cfg = train_cfg(compile=True, loss_chunk=0)
    configure(model, cfg, setup_compute(DEVICE, "bfloat16"))
    if not CUDA:
        model.compile_blocks()  # configure compiles on CUDA only; the CPU compiles here to check the same thing
    batch = [to_batch(packed_rows(), range(4), DEVICE)]
    model.train()
    accumulate_gradients(model, batch, COMPUTE)
    n = graphs()
    prompts = [list(range(8, 8 + k)) for k in (5, 17, 40)]
    reference = generate(model, prompts, 12, stop_id=-1)
    with COMPUTE.autocast():
        out = generate(model, prompts, 12, stop_id=-1)
    assert graphs() == n, f"decoding compiled {graphs() - n} graphs"
    model.train()
    accumulate_gradients(model, batch, COMPUTE)
    assert graphs() == n, f"the training step after decoding recompiled ({n} -> {graphs()} graphs)"
    agree = float(np.mean(np.array(out) == np.array(reference)))
    return f"{n} graphs before and after; bf16 tokens equal to fp32 for {agree:.0%}"


def fused_adamw() -> str:
    model, batch = small_model(), [to_batch(packed_rows(), range(4), DEVICE)]
    optimizer = make_optimizer(model, train_cfg(), torch.device(DEVICE))
    assert all(g["fused"] for g in optimizer.param_groups), "AdamW is not fused on CUDA"
    for group in optimizer.param_groups:
        group["lr"] = 1e-3
    losses = []
    for _ in range(10):
        loss_sum, n = accumulate_gradients(model, batch, COMPUTE)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / float(n))
    assert losses[-1] < losses[0], losses
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f} in 10 steps"


def bench_124m() -> str:
    import bench.train_bench as tb

    tb.STEPS = 20
    m, block, _, _ = tb.CONFIGS["124m"]
    r = tb.run_ours("124m")
    ids, masks = tb.conversations(4000, m["vocab_size"], block)
    lengths = np.array([len(x) for x in ids], dtype=np.float64)
    flops = tb.flops_per_token(r["n_params"], m, lengths, sum(int(k.sum()) for k in masks) / lengths.sum(), "ours")
    peak = tb.matmul_peak("cuda")
    mfu = {k: r["tokens_per_s"] * f / peak for k, f in flops.items()}
    return (f"{r['tokens_per_s']:,.0f} tok/s, MFU nominal {mfu['nominal']:.1%} / executed {mfu['executed']:.1%} of the "
            f"measured {peak / 1e12:.0f} TFLOP/s bf16, peak {r['peak_mib']:,.0f} MiB")


def ddp_resume() -> str:
    """torchrun, 2 GPUs, grad_accum 2 (no_sync on the first micro-batch): a 3-step run that leaves its step-2
    checkpoint behind, then the same run again, which resumes from it and ends with the same loss."""
    folder = tempfile.mkdtemp(prefix="gpu_check_ddp_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "bench.gpu_check", "--ddp-worker", folder]
    logs = []
    for _ in range(2):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, logs[-1][-2000:]
    assert "resuming from" not in logs[0] and "at step 2/3" in logs[1], logs[1][-2000:]
    first, resumed = (json.loads(line.split("DDP ", 1)[1]) for log in logs for line in log.splitlines()
                      if line.startswith("DDP "))
    assert abs(first["loss"] - resumed["loss"]) <= 1e-3 * abs(first["loss"]), (first, resumed)
    return f"3 steps, then resumed at step 2: last loss {first['loss']:.5f} and {resumed['loss']:.5f}"


def lora_bf16_base() -> str:
    """LoRA on CUDA: the frozen base held in bf16, the adapters fp32 and trained, the planned bytes of the weights
    equal to the tensors', and the merged weights giving the adapted model's logits."""
    from pipeline.config import LoraConfig
    from pipeline.lora import adapters, add_adapters, merge_into
    from pipeline.memory import plan_memory

    model = small_model()
    add_adapters(model, LoraConfig(8, 16.0, 0.0, ["q_proj", "v_proj", "up_proj", "down_proj"], "none"), seed=0)
    cfg = train_cfg(lora=LoraConfig(8, 16.0, 0.0, ["q_proj", "v_proj", "up_proj", "down_proj"], "none"),
                    max_steps=20, batch_size=4, save_every=0, eval_every=100, lr=1e-2)
    summary = train(cfg, model, COMPUTE, packed_rows(), packed_rows(16, seed=1), None, "lora")
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}, (frozen, trained)
    plan = plan_memory(model.arch, cfg, BLOCK, 1, "cuda", True)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.weights == held, (plan.weights, held)
    base = small_model()
    for p in base.parameters():  # the base as training held it: rounded to bf16
        p.data = p.data.bfloat16().float()
    merged = merge_into(base, {n: t.float() for n, t in adapters(model).items()}, cfg.lora).eval()
    model.eval()
    ids = torch.randint(0, 1024, (2, 64), device=DEVICE)
    with torch.no_grad():
        gap = (merged(ids) - model.float()(ids)).abs().max().item()
    assert gap < 1e-3, gap
    return (f"frozen bf16, adapters fp32; planned weights {plan.weights:,} B = held; dev loss "
            f"{summary['dev_loss']:.3f}, peak {summary['peak_memory_gib'] * 1024:,.0f} MiB; merged vs adapted "
            f"logits within {gap:.1e}")


def qlora_8bit_offload() -> str:
    """QLoRA (NF4 base quantized on the GPU, bf16 compute, compiled blocks around bitsandbytes' eager kernels): the
    planned weights equal the held bytes (parameters + NF4 codes and state) and the dev loss falls; 8-bit AdamW and
    optimizer offload on one GPU (FSDP2 CPUOffloadPolicy) end within 2% of fp32 AdamW's dev loss, offload with a lower
    peak on the GPU."""
    import dataclasses

    from pipeline.config import LoraConfig
    from pipeline.lora import add_adapters
    from pipeline.memory import plan_memory
    from pipeline.train import evaluate_loss

    rows, dev = packed_rows(), packed_rows(16, seed=1)
    base = train_cfg(max_steps=20, batch_size=4, save_every=0, eval_every=100, lr=1e-3)
    runs = {}
    for name, fields in (("adamw", {}), ("adamw8bit", {"optimizer": "adamw8bit"}),
                         ("offload", {"offload": "optimizer"})):
        torch.cuda.reset_peak_memory_stats()
        runs[name] = train(dataclasses.replace(base, **fields), small_model().cpu(), COMPUTE, rows, dev, None, name)
    ref = runs["adamw"]["dev_loss"]
    for name in ("adamw8bit", "offload"):
        assert abs(runs[name]["dev_loss"] - ref) <= 0.02 * ref, (name, runs[name]["dev_loss"], ref)
    assert runs["offload"]["peak_memory_gib"] < runs["adamw"]["peak_memory_gib"], runs
    model = small_model()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    cfg = dataclasses.replace(base, lr=1e-2, lora=LoraConfig(8, 16.0, 0.0, targets, "nf4"))
    add_adapters(model, cfg.lora, seed=0, device=DEVICE)
    before = evaluate_loss(model, dev, 4, COMPUTE)
    summary = train(cfg, model, COMPUTE, rows, dev, None, "qlora")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *(b for n, b in model.named_buffers()
                                                                            if n != "rope_freq")])
    plan = plan_memory(model.arch, cfg, BLOCK, 1, DEVICE, True)
    assert plan.weights == held, (plan.weights, held)
    assert summary["dev_loss"] < before, (before, summary["dev_loss"])
    return (f"dev loss adamw {ref:.4f}, 8-bit {runs['adamw8bit']['dev_loss']:.4f}, offload "
            f"{runs['offload']['dev_loss']:.4f} (peak {runs['offload']['peak_memory_gib'] * 1024:,.0f} vs "
            f"{runs['adamw']['peak_memory_gib'] * 1024:,.0f} MiB); QLoRA {before:.3f} -> {summary['dev_loss']:.3f}, "
            f"planned weights {plan.weights:,} B = held")


def fsdp_two_gpus() -> str:
    """torchrun, 2 GPUs, parallel: fsdp (bf16 gather, fp32 reduce-scatter): 3 steps of 4 rows per rank against one
    GPU with 8 rows, the same rows; the last losses agree within bf16 noise."""
    folder = tempfile.mkdtemp(prefix="gpu_check_fsdp_")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "bench.gpu_check", "--fsdp-worker", folder]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    sharded = json.loads(next(line.split("FSDP ", 1)[1] for line in proc.stdout.splitlines()
                              if line.startswith("FSDP ")))
    one = train(train_cfg(batch_size=8, max_steps=3, save_every=0, eval_every=100), small_model().cpu(), COMPUTE,
                packed_rows(), None, None, "one")
    assert abs(sharded["loss"] - one["loss"]) <= 2e-2 * abs(one["loss"]), (sharded, one)
    return f"last loss {sharded['loss']:.4f} on 2 x FSDP, {one['loss']:.4f} on one GPU"


def fsdp_worker(folder: str) -> None:
    cfg = train_cfg(batch_size=4, max_steps=3, save_every=0, eval_every=100, parallel="fsdp")
    summary = train(cfg, small_model().cpu(), setup_compute("cuda", "auto"), packed_rows(), None, None, "fsdp")
    if int(os.environ.get("RANK", "0")) == 0:
        print("FSDP " + json.dumps({k: v for k, v in summary.items() if isinstance(v, float)}), flush=True)


def ddp_worker(folder: str) -> None:
    """One torchrun rank of ddp_resume (train() leaves the checkpoint; the stage would delete it on success)."""
    cfg = train_cfg(batch_size=4, grad_accum=2, max_steps=3, save_every=2, eval_every=100)
    summary = train(cfg, small_model().cpu(), setup_compute("cuda", "auto"), packed_rows(), None, None, "ddp",
                    ckpt_dir=folder)
    if int(os.environ.get("RANK", "0")) == 0:
        print("DDP " + json.dumps(summary), flush=True)


CHECKS = [  # name, function, runs on the CPU too
    ("attention-dtypes", attention_dtypes, True),
    ("flex-vs-sdpa-bf16", flex_vs_sdpa, True),
    ("compiled-blocks", compiled_blocks, True),
    ("generation-without-recompiles", generation_without_recompiles, True),
    ("fused-adamw", fused_adamw, False),
    ("bench-124m", bench_124m, False),
    ("ddp-2gpu-resume", ddp_resume, False),
    ("lora-bf16-base", lora_bf16_base, False),
    ("qlora-8bit-offload", qlora_8bit_offload, False),
    ("fsdp-2gpu", fsdp_two_gpus, False),
]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--ddp-worker", metavar="FOLDER", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp-worker", metavar="FOLDER", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ddp_worker or a.fsdp_worker:
        (ddp_worker if a.ddp_worker else fsdp_worker)(a.ddp_worker or a.fsdp_worker)
        return 0
    model_module.enable_flex()
    if not CUDA:  # FlexAttention compiled on the CPU has no backward; the checks run it eagerly, forward only
        model_module._flex_compiled = model_module.flex_attention
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    gpus = torch.cuda.device_count()
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name() if CUDA else 'no CUDA: the CPU subset'}"
          f"{f' x {gpus}' if CUDA else ''}", flush=True)
    failed = 0
    for name, fn, on_cpu in CHECKS:
        if a.only and name not in a.only.split(","):
            continue
        if not (CUDA or on_cpu) or (name in ("ddp-2gpu-resume", "fsdp-2gpu") and gpus < 2):
            print(f"SKIP {name}: needs {'two GPUs' if CUDA else 'CUDA'}", flush=True)
            continue
        t0 = time.time()
        try:
            detail = fn()
            print(f"PASS {name} ({time.time() - t0:.0f} s): {detail}", flush=True)
        except Exception as e:  # every check reports, whatever breaks
            failed += 1
            print(f"FAIL {name} ({time.time() - t0:.0f} s): {type(e).__name__}: {str(e)[:400]}", flush=True)
            traceback.print_exc(limit=4, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
