"""One command for the CUDA path, on a machine with a GPU:

    python -m bench.gpu_check [--budget 420] [--json FILE] [--only a,b]   # PASS/FAIL/SKIP/LEFT OUT per line
    make gpu-check PYTHON=python3 GPU_CHECK_ARGS="--budget 420 --json gpu_check.json"

Runs with whatever interpreter has torch (no venv, nothing installed): it needs torch, numpy, pyyaml, pyarrow and tqdm,
nothing else; a check that needs another package says SKIP with its name. Exit status 1 if any check failed.

What only a GPU can show, the most informative first: the blocks compiled as training compiles them with
FlexAttention inside (never run before this check), then the speed of the real train() on the 124M benchmark model
(tokens/s, MFU against the measured bf16 matmul peak, the peak memory against the memory plan), then the dtypes
reaching attention, FlexAttention against SDPA, generation between compiled training steps, fused AdamW, LoRA with a
bf16 base, QLoRA, 8-bit AdamW and optimizer offload, and with two GPUs DDP resume and FSDP against one GPU.

Every comparison is made where it can fail: on a model whose attention matters (q and k scaled up), each tolerance
is checked against what a broken document mask does to the same numbers (the check fails when it could not tell the
two apart), resumed or sharded runs are compared by their weights against the size of a step's update and by their
gradient norms, TF32 is off where numbers are compared, peak memory is reset per check, and graph breaks and
recompiles (what TORCH_LOGS=graph_breaks,recompiles prints) fail the check they happen in. --budget stops starting
checks that would not finish in time, and says which were left out. --json writes one JSON line per check.

On a machine without CUDA it runs the subset that can run on the CPU (FlexAttention forward only, inside compiled
blocks too; compiled blocks with SDPA forward and backward; dtypes; generation; DDP resume and FSDP on 2 gloo ranks) and
says SKIP for the rest, so it cannot rot unnoticed (tests/test_gpu_check.py runs it in `make test`)."""
import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

try:  # what every check needs (a GPU machine's own Python has these); anything else is a SKIP per check
    import numpy as np
    import torch
    import torch._dynamo as dynamo

    import pipeline.model as model_module
    from pipeline.common import setup_compute
    from pipeline.config import LORA_TARGETS, LoraConfig, PackConfig, SftConfig, load_params
    from pipeline.generate import KVCache, generate
    from pipeline.model import Architecture, Transformer
    from pipeline.pack import pack
    from pipeline.train import accumulate_gradients, configure, make_optimizer, to_batch, train, trained_state
except ModuleNotFoundError as missing:
    sys.exit(f"gpu_check: needs the package {missing.name} (torch, numpy, pyyaml, pyarrow and tqdm are required)")

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
COMPUTE = setup_compute(DEVICE, "bfloat16")  # bf16 autocast, as training on CUDA (the CPU runs it too)
BLOCK = 512  # tokens per packed row: four FlexAttention tiles
LORA = LoraConfig(8, 16.0, 0.0, ["q_proj", "v_proj", "up_proj", "down_proj"], "none")
PLAN_FACTOR = 1.5  # planned / measured peak memory, either way (pipeline.memory.ACTIVATION_FACTOR on the CPU)
MARGIN = 5  # a broken document mask must move the compared numbers by at least MARGIN x the tolerance


def small_model(seed: int = 0, qk_norm: bool = False) -> Transformer:
    """Two blocks whose attention matters: q and k scaled up 8x (attention far from uniform), v and o 8x (attention's
    output weighs in the residual stream), so that a mask letting conversations see each other moves the logits by
    several times their spread and the gradients by most of their size (a model at its init would hide it: its
    loss sits at ln V whatever attention does)."""
    width = 256 if CUDA else 64  # the CPU compiles and runs a smaller one
    cfg = Architecture(n_layer=2, n_embd=width, n_head=4, n_kv_head=2, head_dim=width // 4, intermediate_size=2 * width,
                       max_seq_len=BLOCK, vocab_size=1024, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True,
                       init_std=0.02, qk_norm=qk_norm)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    with torch.no_grad():
        for block in model.blocks:
            for linear in (block.attn.q, block.attn.k, block.attn.v, block.attn.o):
                linear.weight.mul_(8)
        model.embed.weight.mul_(10)  # logits spread ~10x wider: greedy decoding is not a coin toss between ties
    return model.to(DEVICE)


def packed_rows(n: int = 200, seed: int = 0) -> dict:
    """Random conversations of 20..300 tokens (many cross the 128-token tiles), the second half trained."""
    rng = np.random.default_rng(seed)
    ids = [rng.integers(8, 1024, int(rng.integers(20, 300))).astype(np.int32) for _ in range(n)]
    labels = [np.where(np.arange(len(x)) >= len(x) // 2, x, -100).astype(np.int32) for x in ids]
    return pack(ids, labels, PackConfig(block_size=BLOCK, overlong="drop", seed=0, weights={}))[0]


def train_cfg(**fields) -> SftConfig:
    """The project's SFT settings (params.yaml) with the check's own."""
    return dataclasses.replace(load_params("train", SftConfig, str(ROOT / "params.yaml")), device=DEVICE, **fields)


def graphs() -> int:
    return dynamo.utils.counters["stats"]["unique_graphs"]


@contextlib.contextmanager
def no_tf32():
    """fp32 matmuls in full precision while numbers are compared (setup_compute turns TF32 on for training)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@dataclasses.dataclass
class Run:
    logits: torch.Tensor  # (tokens, V) fp32, the real (non-padding) tokens of the batch
    loss: float  # mean per trained target
    grads: torch.Tensor | None  # every parameter's gradient, flattened into one fp32 vector (None: forward only)


def run(model: Transformer, batch, flex: bool, backward: bool, doc: torch.Tensor | None = None) -> Run:
    """One forward (and backward) under bf16 autocast. doc: another document index (a broken mask) in place of
    the batch's."""
    model.use_flex = flex
    model.zero_grad(set_to_none=True)
    doc = batch.doc if doc is None else doc
    real = batch.doc >= 0
    # both forwards in the same grad mode: compiled blocks called in another one would compile again
    with torch.set_grad_enabled(backward), COMPUTE.autocast():
        logits = model(batch.ids, pos=batch.pos, doc=doc)[real].detach().float()
        loss_sum, n = model(batch.ids, batch.labels, batch.pos, doc, *(() if doc is not batch.doc else
                                                                        (batch.at, batch.targets)))
    grads = None
    if backward:
        loss_sum.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    model.use_flex = False
    return Run(logits, loss_sum.item() / n, grads)


def gaps(a: Run, b: Run) -> dict:
    """How far b is from a: the largest logit difference over the logits' spread, and the gradients' relative
    difference."""
    out = {"logits": ((a.logits - b.logits).abs().max() / a.logits.std()).item()}
    if a.grads is not None and b.grads is not None:
        out["grads"] = ((a.grads - b.grads).norm() / a.grads.norm()).item()
    return out


def broken_mask(batch) -> torch.Tensor:
    """The document index of a mask that lets every conversation of a row see the ones before it."""
    return torch.where(batch.doc >= 0, 0, -1)


def within(name: str, gap: dict, tol: dict, broken: dict) -> str:
    """Assert each gap is within its tolerance, and that a broken document mask would have exceeded it by MARGIN."""
    for k, t in tol.items():
        if k not in gap:
            continue
        assert broken[k] >= MARGIN * t, (f"{name}: the check cannot fail: a broken mask moves {k} by {broken[k]:.3g}, "
                                         f"under {MARGIN} x the tolerance {t}")
        assert gap[k] <= t, f"{name}: {k} differ by {gap[k]:.3g} (tolerance {t}; a broken mask: {broken[k]:.3g})"
    return " ".join(f"{k} {gap[k]:.2g}" for k in tol if k in gap)


def tolerances(tol: dict, broken: dict) -> str:
    return "; tolerance " + ", ".join(f"{k} {t:g} (a broken mask: {broken[k]:.2g})" for k, t in tol.items())


class CompileWatch(logging.Handler):
    """The graph breaks and recompiles torch reports (what TORCH_LOGS=graph_breaks,recompiles prints), kept so
    that the check they happen in fails."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []
        torch._logging.set_logs(graph_breaks=True, recompiles=True)
        logging.getLogger("torch._dynamo").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        lines = record.getMessage().splitlines()
        if lines and ("Recompiling" in lines[0] or "Graph break" in lines[0]):
            self.events.append(" / ".join(line.strip() for line in lines[:3]))


# ---- the checks: each returns (one line for the log, figures for --json) --------------------------------------
def compiled_blocks():
    """The blocks compiled as configure() compiles them (FlexAttention inside on CUDA: its first execution in a
    compiled block anywhere; on the CPU forward only, and SDPA inside for the backward): logits and gradients of
    the eager SDPA model, no graph added on the second step, and activation checkpointing on top."""
    dynamo.reset()
    model, batch = small_model(), to_batch(packed_rows(), range(4), DEVICE)
    eager = run(model, batch, flex=False, backward=True)
    broken = gaps(eager, run(model, batch, flex=False, backward=True, doc=broken_mask(batch)))
    model.compile_blocks()
    tol = {"logits": 0.1, "grads": 0.1}  # bf16 autocast; a broken mask moves both by more than their size
    compiled = run(model, batch, flex=CUDA, backward=True)
    n = graphs()
    second = run(model, batch, flex=CUDA, backward=True)
    assert graphs() == n, f"the second step compiled again ({n} -> {graphs()} graphs)"
    found = {"compiled": within("compiled", gaps(eager, compiled), tol, broken),
             "second step": within("second step", gaps(eager, second), tol, broken)}
    if not CUDA:  # FlexAttention inside the compiled blocks, forward only (no CPU backward): compiled afresh
        dynamo.reset()
        model.compile_blocks()
        flex = run(model, batch, flex=True, backward=False)
        found["flex forward"] = within("flex forward", gaps(eager, flex), tol, broken)
    dynamo.reset()  # checkpointing is a run of its own: compiled afresh, then no recompile
    model.compile_blocks()
    model.checkpointing = True
    checkpointed = [run(model, batch, flex=CUDA, backward=True) for _ in range(2)]
    model.checkpointing = False
    found["checkpointed"] = within("checkpointed", gaps(eager, checkpointed[1]), tol, broken)
    assert not CUDA or model_module._flex_compiled is not model_module.flex_attention, "eager flex left behind"
    where = "FlexAttention" if CUDA else "SDPA (FlexAttention forward only)"
    return (f"{where} in {n} graphs, none added on the second step; against eager: "
            + "; ".join(f"{k} {v}" for k, v in found.items()) + tolerances(tol, broken),
            {"graphs": n, "loss_eager": eager.loss, "loss_compiled": compiled.loss,
             "gap_logits": gaps(eager, compiled)["logits"], "broken_mask_logits": broken["logits"]})


def speed_124m():
    """The real train() on the 124M benchmark model (bench/train_bench.py's configuration): tokens/s (median of the
    steps after the two that compile), MFU over the bf16 matmul peak measured here, and the peak memory against
    the memory plan."""
    import bench.train_bench as tb
    from pipeline.memory import plan_memory

    m, block, batch, _ = tb.CONFIGS["124m"]
    ids, masks = tb.conversations(4000, m["vocab_size"], block)
    arrays, _ = pack(ids, [np.where(k == 1, x, -100).astype(np.int32) for x, k in zip(ids, masks)],
                     PackConfig(block_size=block, overlong="drop", seed=0, weights={}))
    arch = Architecture(**m, head_dim=m["n_embd"] // m["n_head"], max_seq_len=block, rope_theta=10000.0,
                        norm_eps=1e-5, tie_embeddings=True, init_std=0.02)
    model = Transformer(arch)
    model.init_weights(0)
    cfg = train_cfg(batch_size=batch, grad_accum=1, max_steps=30, save_every=0, eval_every=10**9, lr=1e-4,
                    compile=True)
    plan = plan_memory(arch, cfg, block, 1, DEVICE, True)
    summary = train(cfg, model, COMPUTE, arrays, None, None, "speed", plan=plan)
    lengths = np.array([len(x) for x in ids], dtype=np.float64)
    flops = tb.flops_per_token(model.num_params(), m, lengths, sum(int(k.sum()) for k in masks) / lengths.sum(),
                               "ours")
    peak = tb.matmul_peak("cuda")
    mfu = {k: summary["tokens_per_s"] * f / peak for k, f in flops.items()}
    ratio = plan.total() / 2**30 / summary["peak_memory_gib"]
    assert 1 / PLAN_FACTOR <= ratio <= PLAN_FACTOR, (f"planned {plan.total() / 2**30:.2f} GiB, measured peak "
                                                    f"{summary['peak_memory_gib']:.2f} GiB")
    return (f"train(): {summary['tokens_per_s']:,.0f} tok/s, MFU nominal {mfu['nominal']:.1%} / executed "
            f"{mfu['executed']:.1%} of the measured {peak / 1e12:.0f} TFLOP/s bf16; peak "
            f"{summary['peak_memory_gib']:.2f} GiB, planned {plan.total() / 2**30:.2f} GiB (x{ratio:.2f})",
            {"tokens_per_s": summary["tokens_per_s"], "mfu_nominal": mfu["nominal"], "mfu_executed": mfu["executed"],
             "matmul_peak_tflops": peak / 1e12, "peak_memory_gib": summary["peak_memory_gib"],
             "plan_gib": plan.total() / 2**30, "batch": batch, "block": block, "steps": 30})


def attention_dtypes():
    """What Attention hands to FlexAttention under bf16 autocast, for a plain model and a model with q/k norms
    (Qwen3), and to generation's KV cache: one dtype, bf16."""
    seen, inner, attend = [], model_module.flex, KVCache.attend

    def spy(q, k, v, block_mask):
        seen.append(("flex", q.dtype, k.dtype, v.dtype))
        return inner(q, k, v, block_mask)

    def spy_cache(self, layer, q, k, v, mask):
        seen.append(("cache", q.dtype, k.dtype, v.dtype))
        return attend(self, layer, q, k, v, mask)

    model_module.flex, KVCache.attend = spy, spy_cache
    try:
        for qk_norm in (False, True):
            model, batch = small_model(qk_norm=qk_norm), to_batch(packed_rows(), range(2), DEVICE)
            run(model, batch, flex=True, backward=CUDA)
            with COMPUTE.autocast():
                generate(model, [list(range(8, 30))], 3, stop_id=-1)
    finally:
        model_module.flex, KVCache.attend = inner, attend
    kinds = {(where, *(str(d).removeprefix("torch.") for d in dtypes)) for where, *dtypes in seen}
    assert kinds == {("flex", "bfloat16", "bfloat16", "bfloat16"), ("cache", "bfloat16", "bfloat16", "bfloat16")}, \
        f"q, k, v reach attention as {sorted(kinds)}"
    return f"{len(seen)} calls (plain and q/k-norm models, flex and KV cache), q/k/v bf16", {"calls": len(seen)}


def flex_vs_sdpa():
    """FlexAttention with the block mask against SDPA with the dense mask, on packed rows in bf16: logits and
    (on CUDA) gradients."""
    model, batch = small_model(), to_batch(packed_rows(), range(4), DEVICE)
    sdpa, flex = run(model, batch, flex=False, backward=CUDA), run(model, batch, flex=True, backward=CUDA)
    broken = gaps(sdpa, run(model, batch, flex=False, backward=CUDA, doc=broken_mask(batch)))
    gap = gaps(sdpa, flex)
    tol = {"logits": 0.1, "grads": 0.1}
    detail = within("flex vs sdpa", gap, tol, broken) + tolerances({k: t for k, t in tol.items() if k in gap}, broken)
    sparsity = model_module.flex_block_mask(batch.doc).sparsity()
    return (f"{'' if CUDA else 'forward only (no CPU backward): '}{detail}; block mask {sparsity:.0f}% sparse",
            {"gap_logits": gap["logits"], "gap_grads": gap.get("grads"), "broken_mask_logits": broken["logits"],
             "sparsity": sparsity})


def generation_without_recompiles():
    """Decoding under autocast between two compiled training steps, as the evaluator runs during training: the
    training graphs neither grow nor change (a recompile fails the check), and the bf16 tokens agree with fp32
    decoding."""
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
    assert n > 0, "the blocks did not compile"  # (one graph may serve all of them)
    prompts = [list(range(8 + k, 8 + 2 * k)) for k in (5, 17, 40, 60)]
    reference = generate(model, prompts, 16, stop_id=-1)
    with COMPUTE.autocast():
        out = generate(model, prompts, 16, stop_id=-1)
    assert graphs() == n, f"decoding compiled {graphs() - n} graphs"
    model.compiled_blocks, compiled = [], model.compiled_blocks
    assert generate(model, prompts, 16, stop_id=-1) == reference, "decoding went through the compiled blocks"
    model.compiled_blocks = compiled
    model.train()
    accumulate_gradients(model, batch, COMPUTE)
    assert graphs() == n, f"the training step after decoding recompiled ({n} -> {graphs()} graphs)"
    first = float(np.mean([a[0] == b[0] for a, b in zip(out, reference)]))
    agree = float(np.mean(np.array(out) == np.array(reference)))
    # the first token comes from the prompt alone; later ones may part ways after one near-tie
    assert first == 1.0 and agree >= 0.75, f"bf16 tokens equal to fp32: first {first:.0%}, all {agree:.0%}"
    return f"{n} graphs before and after; bf16 tokens equal to fp32: first 100%, all {agree:.0%}", {
        "graphs": n, "agreement": agree}


def fused_adamw():
    """Fused AdamW (what make_optimizer picks on CUDA) against the plain one on the same gradients, and the loss
    falling over 10 steps."""
    models = [small_model(), small_model()]
    batch = [to_batch(packed_rows(), range(4), DEVICE)]
    opts = [make_optimizer(models[0], train_cfg(), torch.device(DEVICE)),
            torch.optim.AdamW(models[1].parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)]
    assert all(g["fused"] for g in opts[0].param_groups), "AdamW is not fused on CUDA"
    for group in opts[0].param_groups:
        group["lr"], group["weight_decay"] = 1e-3, 0.0
    start = torch.cat([p.detach().flatten() for p in models[0].parameters()])
    losses = []
    with no_tf32():
        for _ in range(10):
            for model, opt in zip(models, opts):
                loss_sum, n = accumulate_gradients(model, batch, COMPUTE)
                opt.step()
                opt.zero_grad(set_to_none=True)
            losses.append(float(loss_sum) / float(n))
    a, b = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in models)
    rel = ((a - b).norm() / (a - start).norm()).item()
    assert rel < 1e-2, f"fused and plain AdamW part by {rel:.2g} of the update"
    assert losses[-1] < losses[0], losses
    return f"fused = plain AdamW within {rel:.1e} of the update; loss {losses[0]:.3f} -> {losses[-1]:.3f} in 10 steps", {
        "fused_vs_plain": rel, "loss_first": losses[0], "loss_last": losses[-1]}


def lora_bf16_base():
    """LoRA on CUDA: the frozen base held in bf16, the adapters fp32 and trained, the planned bytes of the weights
    equal to the tensors', the peak memory within the plan's factor, and the merged weights giving the adapted
    model's logits (fp32, TF32 off)."""
    from pipeline.lora import adapters, add_adapters, merge_into
    from pipeline.memory import plan_memory

    model = small_model().cpu()
    add_adapters(model, LORA, seed=0)
    cfg = train_cfg(lora=LORA, max_steps=20, batch_size=4, save_every=0, eval_every=10**9, lr=1e-2)
    plan = plan_memory(model.arch, cfg, BLOCK, 1, DEVICE, True)
    summary = train(cfg, model, COMPUTE, packed_rows(), None, None, "lora", plan=plan)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}, (frozen, trained)
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    assert plan.weights == held, (plan.weights, held)
    ratio = plan.total() / 2**30 / summary["peak_memory_gib"]  # reported only: a 2-block model's peak is mostly
    base = small_model()  # the GPU's fixed workspaces (the speed row compares the plan where activations dominate)
    for p in base.parameters():  # the base as training held it: rounded to bf16
        p.data = p.data.bfloat16().float()
    merged = merge_into(base, {n: t.float() for n, t in adapters(model).items()}, cfg.lora).eval()
    model.eval()
    ids = torch.randint(0, 1024, (2, 64), device=DEVICE)
    with torch.no_grad(), no_tf32():
        want = model.float()(ids)
        gap = ((merged(ids) - want).abs().max() / want.std()).item()
    assert gap < 1e-4, f"merged and adapted logits differ by {gap:.2g} of their spread"
    return (f"frozen bf16, adapters fp32; planned weights {plan.weights:,} B = held; peak "
            f"{summary['peak_memory_gib'] * 1024:,.0f} MiB, planned {plan.total() / 2**20:,.0f} MiB (x{ratio:.2f}); "
            f"merged vs adapted logits within {gap:.1e} of their spread",
            {"peak_memory_gib": summary["peak_memory_gib"], "plan_gib": plan.total() / 2**30, "merge_gap": gap})


def qlora_8bit_offload():
    """8-bit AdamW and optimizer offload on one GPU (FSDP2's CPUOffloadPolicy) against fp32 AdamW: each lowers the
    dev loss by what fp32 AdamW does, within 10% of that improvement (an optimizer that does not step fails), offload
    with a lower peak on the GPU; QLoRA (the NF4 base quantized on the GPU, bf16 compute, compiled blocks around
    bitsandbytes' eager kernels): the planned weights equal the held bytes (parameters, NF4 codes and their state)
    and the dev loss falls."""
    from pipeline.lora import add_adapters
    from pipeline.memory import plan_memory
    from pipeline.train import evaluate_loss

    rows, dev = packed_rows(), packed_rows(16, seed=1)
    base = train_cfg(max_steps=20, batch_size=4, save_every=0, eval_every=10**9, lr=1e-3)
    start = evaluate_loss(small_model(), dev, 4, COMPUTE)
    runs = {}
    for name, fields in (("adamw", {}), ("adamw8bit", {"optimizer": "adamw8bit"}),
                         ("offload", {"offload": "optimizer"})):
        torch.cuda.reset_peak_memory_stats()
        runs[name] = train(dataclasses.replace(base, **fields), small_model().cpu(), COMPUTE, rows, dev, None, name)
    gain = start - runs["adamw"]["dev_loss"]
    assert gain > 0, (start, runs["adamw"])
    for name in ("adamw8bit", "offload"):
        assert abs((start - runs[name]["dev_loss"]) - gain) <= 0.1 * gain, (name, start, runs[name], gain)
    assert runs["offload"]["peak_memory_gib"] < runs["adamw"]["peak_memory_gib"], runs
    model = small_model()
    cfg = dataclasses.replace(base, lr=1e-2, lora=LoraConfig(8, 16.0, 0.0, list(LORA_TARGETS), "nf4"))
    add_adapters(model, cfg.lora, seed=0, device=DEVICE)
    before = evaluate_loss(model, dev, 4, COMPUTE)
    summary = train(cfg, model, COMPUTE, rows, dev, None, "qlora")
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *(b for n, b in model.named_buffers()
                                                                            if n != "rope_freq")])
    plan = plan_memory(model.arch, cfg, BLOCK, 1, DEVICE, True)
    assert plan.weights == held, (plan.weights, held)
    assert summary["dev_loss"] < before, (before, summary["dev_loss"])
    return (f"dev loss from {start:.4f}: adamw {runs['adamw']['dev_loss']:.4f}, 8-bit {runs['adamw8bit']['dev_loss']:.4f}, "
            f"offload {runs['offload']['dev_loss']:.4f} (peak {runs['offload']['peak_memory_gib'] * 1024:,.0f} vs "
            f"{runs['adamw']['peak_memory_gib'] * 1024:,.0f} MiB); QLoRA {before:.3f} -> {summary['dev_loss']:.3f}, "
            f"planned weights {plan.weights:,} B = held",
            {name: r["dev_loss"] for name, r in runs.items()} | {"qlora_dev_loss": summary["dev_loss"]})


def torchrun(flag: str, folder: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "bench.gpu_check", flag, folder]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-2000:]
    return proc.stdout + proc.stderr


def flat(state: dict) -> torch.Tensor:
    return torch.cat([state[k].float().flatten() for k in sorted(state)])


def ddp_resume():
    """torchrun, 2 ranks (GPUs, or gloo on the CPU), grad_accum 2 (no_sync on the first micro-batch): a 3-step run that leaves its step-2
    checkpoint behind, then the same run again, which resumes from it. The resumed run's final weights equal the
    uninterrupted run's within 5% of the last step's update (a lost AdamW state changes that update wholly), and
    the last gradient norm within 1%."""
    folder = tempfile.mkdtemp(prefix="gpu_check_ddp_")
    logs = [torchrun("--ddp-worker", folder) for _ in range(2)]
    assert "resuming from" not in logs[0] and "at step 2/3" in logs[1], logs[1][-2000:]
    first, resumed = (json.loads(line.split("DDP ", 1)[1]) for log in logs for line in log.splitlines()
                      if line.startswith("DDP "))
    step2 = flat(torch.load(Path(folder) / "resume.pt", weights_only=True)["model"])
    a, b = (flat(torch.load(Path(folder) / f"final-{i}.pt", weights_only=True)) for i in range(2))
    rel = ((b - a).norm() / (a - step2).norm()).item()
    norm_gap = abs(first["grad_norm"] - resumed["grad_norm"]) / first["grad_norm"]
    assert rel <= 5e-2 and norm_gap <= 1e-2, f"resumed weights part by {rel:.2g} of the last update, grad norm by " \
                                             f"{norm_gap:.2g}"
    return (f"3 steps, then resumed at step 2: final weights within {rel:.1e} of the last update, last grad norm "
            f"{first['grad_norm']:.4f} and {resumed['grad_norm']:.4f}", {"weights_gap": rel, "grad_norm_gap": norm_gap})


def fsdp_vs_one():
    """torchrun, 2 ranks, parallel: fsdp (on CUDA: bf16 gather, fp32 reduce-scatter; on the CPU: fp32, gloo): 3 steps
    of 4 rows per rank against one process with 8 rows, the same rows: the last gradient norm within 2% (a sum instead of a mean over ranks doubles
    it) and the weights within 25% of the whole update (AdamW turns bf16 noise on near-zero gradients into whole
    steps of either sign; a wrong update is 100% off)."""
    folder = tempfile.mkdtemp(prefix="gpu_check_fsdp_")
    log = torchrun("--fsdp-worker", folder)
    sharded = json.loads(next(line.split("FSDP ", 1)[1] for line in log.splitlines() if line.startswith("FSDP ")))
    model = small_model().cpu()
    start = flat({k: v.detach().clone() for k, v in trained_state(model).items()})
    one = train(train_cfg(batch_size=8, max_steps=3, save_every=0, eval_every=10**9), model,
                setup_compute(DEVICE, "auto"), packed_rows(), None, None, "one")
    a, b = flat(trained_state(model)), flat(torch.load(Path(folder) / "final-fsdp.pt", weights_only=True))
    rel = ((b.cpu() - a.cpu()).norm() / (a.cpu() - start.cpu()).norm()).item()
    norm_gap = abs(sharded["grad_norm"] - one["grad_norm"]) / one["grad_norm"]
    assert norm_gap <= 2e-2 and rel <= 0.25, f"grad norm {sharded['grad_norm']} vs {one['grad_norm']}, weights {rel}"
    return (f"last grad norm {sharded['grad_norm']:.4f} on 2 x FSDP, {one['grad_norm']:.4f} on one process; weights "
            f"within {rel:.1e} of the update", {"grad_norm_gap": norm_gap, "weights_gap": rel})


def fsdp_worker(folder: str) -> None:
    from pipeline.train import trained_weights

    cfg = train_cfg(batch_size=4, max_steps=3, save_every=0, eval_every=10**9, parallel="fsdp")
    model = small_model().cpu()
    summary = train(cfg, model, setup_compute(DEVICE, "auto"), packed_rows(), None, None, "fsdp")
    weights = trained_weights(model)
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(weights, Path(folder) / "final-fsdp.pt")
        print("FSDP " + json.dumps({k: v for k, v in summary.items() if isinstance(v, float)}), flush=True)


def ddp_worker(folder: str) -> None:
    """One torchrun rank of ddp_resume (train() leaves the checkpoint; the stage would delete it on success)."""
    cfg = train_cfg(batch_size=4, grad_accum=2, max_steps=3, save_every=2, eval_every=10**9)
    model = small_model().cpu()
    summary = train(cfg, model, setup_compute(DEVICE, "auto"), packed_rows(), None, None, "ddp", ckpt_dir=folder)
    if int(os.environ.get("RANK", "0")) == 0:
        runs = len(list(Path(folder).glob("final-*.pt")))
        torch.save({k: v.cpu() for k, v in trained_state(model).items()}, Path(folder) / f"final-{runs}.pt")
        print("DDP " + json.dumps({k: v for k, v in summary.items() if isinstance(v, (int, float))}), flush=True)


@dataclasses.dataclass
class Check:
    name: str
    fn: object
    on_cpu: bool  # runs on a machine without CUDA (the CPU subset)
    gpus: int  # GPUs it needs on a CUDA machine
    seconds: tuple[int, int]  # expected duration (CUDA, CPU): --budget leaves out a check that would not fit


CHECKS = [  # the most informative first
    Check("compiled-blocks", compiled_blocks, True, 1, (120, 40)),
    Check("speed-124m", speed_124m, False, 1, (150, 0)),
    Check("attention-dtypes", attention_dtypes, True, 1, (20, 5)),
    Check("flex-vs-sdpa-bf16", flex_vs_sdpa, True, 1, (30, 5)),
    Check("generation-without-recompiles", generation_without_recompiles, True, 1, (60, 20)),
    Check("fused-adamw", fused_adamw, False, 1, (20, 0)),
    Check("lora-bf16-base", lora_bf16_base, False, 1, (90, 0)),
    Check("qlora-8bit-offload", qlora_8bit_offload, False, 1, (120, 0)),
    Check("ddp-resume", ddp_resume, True, 2, (120, 40)),
    Check("fsdp-vs-one", fsdp_vs_one, True, 2, (120, 40)),
]


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n")[0])
    ap.add_argument("--only", default="", help="comma-separated check names")
    ap.add_argument("--budget", type=float, default=420, help="seconds: no check starts that would not end in time")
    ap.add_argument("--json", metavar="FILE", help="one JSON line per check (name, verdict, seconds, figures)")
    ap.add_argument("--ddp-worker", metavar="FOLDER", help=argparse.SUPPRESS)
    ap.add_argument("--fsdp-worker", metavar="FOLDER", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.ddp_worker or a.fsdp_worker:
        (ddp_worker if a.ddp_worker else fsdp_worker)(a.ddp_worker or a.fsdp_worker)
        return 0
    model_module.enable_flex()
    if not CUDA:  # FlexAttention compiled on the CPU has no backward; eager calls run it eagerly, forward only
        model_module._flex_compiled = model_module.flex_attention
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    gpus = torch.cuda.device_count()
    head = (f"torch {torch.__version__}, {torch.cuda.get_device_name() if CUDA else 'no CUDA: the CPU subset'}"
            f"{f' x {gpus}' if CUDA else ''}, budget {a.budget:.0f} s")
    print(head, flush=True)
    out = open(a.json, "w") if a.json else None
    watch, t_start, verdicts = CompileWatch(), time.time(), []
    only = set(filter(None, a.only.split(",")))
    for check in CHECKS:
        if only and check.name not in only:
            continue
        verdict, detail, figures, t0 = "SKIP", "", {}, time.time()
        expected = check.seconds[0 if CUDA else 1]
        left = a.budget - (t0 - t_start)
        if not (CUDA or check.on_cpu) or (CUDA and gpus < check.gpus):
            detail = f"needs {'two GPUs' if CUDA else 'CUDA'}"
        elif expected > left:
            verdict, detail = "LEFT OUT", f"expected ~{expected} s, {max(0, left):.0f} s of the budget left"
        else:
            if CUDA:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            watch.events.clear()
            dynamo.reset()  # each check compiles afresh: nothing it sees was compiled for another
            try:
                detail, figures = check.fn()
                assert not watch.events, f"{len(watch.events)} graph breaks or recompiles: {watch.events[:3]}"
                verdict = "PASS"
            except ModuleNotFoundError as e:  # an optional package this machine lacks
                verdict, detail = "SKIP", f"needs the package {e.name}"
            except Exception as e:  # every check reports, whatever breaks
                verdict, detail = "FAIL", f"{type(e).__name__}: {str(e)[:600]}"
                traceback.print_exc(limit=4, file=sys.stderr)
        seconds = time.time() - t0
        shown = f" ({seconds:.0f} s)" if verdict in ("PASS", "FAIL") else ""
        print(f"{verdict} {check.name}{shown}: {detail}", flush=True)
        verdicts.append(verdict)
        if out is not None:
            out.write(json.dumps({"check": check.name, "verdict": verdict, "seconds": round(seconds, 1),
                                  "detail": detail, "device": head} | figures) + "\n")
            out.flush()
    counts = {v: verdicts.count(v) for v in ("PASS", "FAIL", "SKIP", "LEFT OUT") if v in verdicts}
    print(f"gpu_check: {', '.join(f'{n} {v}' for v, n in counts.items())} in {time.time() - t_start:.0f} s",
          flush=True)
    return 1 if "FAIL" in verdicts else 0


if __name__ == "__main__":
    sys.exit(main())
