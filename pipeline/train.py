"""Training: packed rows -> a trained model, for SFT and for pretraining the bundled base model.
One visible loop: AdamW (decay on matrices), warmup + cosine to a floor, gradient accumulation with the loss
normalised by the trained-target count of the whole optimizer step (over all ranks), clipping, non-finite steps
skipped, DDP under torchrun, and an atomic resume checkpoint every save_every steps that makes a rerun after a
crash continue exactly where the last checkpoint left off (also from the DVC remote, on another machine, with
remote_checkpoints: pipeline/remote.py)."""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.common import Compute, UserError, atomic_file, is_rank0, print0
from pipeline.config import TrainConfig
from pipeline.distributed import (
    all_reduce_sum,
    gather_full,
    init_distributed,
    local,
    one_process_group,
    shard,
    sharded_like,
)
from pipeline.memory import MemoryPlan, device_free_bytes, loss_chunk_of, plan_memory, sized_loss_chunk
from pipeline.model import Transformer, enable_flex, flex_available, trained_targets
from pipeline.pack import ARRAYS
from pipeline.quant import adamw8bit, is_nf4
from pipeline.remote import Uploader, finish, open_store


def total_steps(cfg: TrainConfig, n_rows: int, world: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum * world)))


def lr_at(step: int, cfg: TrainConfig, n_steps: int) -> float:
    """Linear warmup over W steps, then cosine from lr down to min_lr_frac * lr at the last step."""
    warmup = max(1, round(cfg.warmup_frac * n_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    f = cfg.min_lr_frac
    return cfg.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """A fresh AdamW over the trained parameters; weight decay on matrices only, never on norm gains nor on LoRA's
    adapters (decay would pull the update B A towards zero, towards the base). Fused kernel on CUDA (not with the
    state offloaded: the step runs on the host). train.optimizer adamw8bit: bitsandbytes' 8-bit moments."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in params if p.dim() >= 2 and ".lora_" not in n]
    no_decay = [p for n, p in params if p.dim() < 2 or ".lora_" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if getattr(cfg, "optimizer", "adamw") == "adamw8bit":
        return adamw8bit(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda" and not offloaded(cfg))


def offloaded(cfg: TrainConfig) -> bool:
    """train.offload optimizer: FSDP2 with its CPU offload, also on one process."""
    return getattr(cfg, "offload", "none") == "optimizer"


def row_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded data order of one epoch: a permutation of row numbers."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)


@dataclasses.dataclass
class Batch:
    """Packed rows on the device, with what the step needs to know made ahead on the CPU: the trained positions and
    their targets (trained_targets: no boolean indexing, so no host sync, in the loss) and the token counts."""
    ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where not trained
    pos: torch.Tensor  # (B, T) position in its conversation
    doc: torch.Tensor  # (B, T) conversation index, -1 for padding
    at: torch.Tensor  # (N,) flat positions of (B, T) whose shifted target is trained
    targets: torch.Tensor  # (N,) those targets
    n_targets: int  # N: this micro-batch's share of the loss denominator
    n_tokens: int  # tokens that are not padding

    def inputs(self) -> tuple:
        """The model's arguments: model(*batch.inputs()) -> (loss sum, trained targets)."""
        return self.ids, self.labels, self.pos, self.doc, self.at, self.targets


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory, without waiting (the copy queues behind the
    running step, and the host goes on preparing the next batch)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_batch(arrays: dict, rows, device) -> Batch:
    """The given row numbers of packed arrays as a Batch on `device`."""
    ids, labels, pos, doc = (torch.from_numpy(np.asarray(arrays[k][rows], dtype=np.int64)) for k in ARRAYS)
    at, targets = trained_targets(labels, doc)  # on the CPU, before the copy
    return Batch(*(to_device(t, device) for t in (ids, labels, pos, doc, at, targets)), n_targets=len(at),
                 n_tokens=int((doc >= 0).sum()))


def batch_rows(n_rows: int, cfg: TrainConfig, world: int = 1, rank: int = 0, skip: int = 0):
    """Endless seeded stream of this rank's row numbers, one list per micro-batch. Each epoch is a fresh
    permutation; a global micro-batch is batch_size * world consecutive rows of it and rank r takes the r-th
    slice, so N ranks see exactly the rows one process with N times the batch would. `skip` drops the first
    micro-batches (the data position of a resumed run)."""
    per, epoch, k, buffer = cfg.batch_size * world, 0, 0, []
    while True:
        buffer.extend(row_order(n_rows, cfg.seed, epoch).tolist())
        epoch += 1
        while len(buffer) >= per:
            rows, buffer = buffer[:per], buffer[per:]
            if k >= skip:
                yield rows[rank * cfg.batch_size : (rank + 1) * cfg.batch_size]
            k += 1


def micro_batches(arrays: dict, cfg: TrainConfig, device, world: int = 1, rank: int = 0, skip: int = 0):
    for rows in batch_rows(len(arrays["ids"]), cfg, world, rank, skip):
        yield to_batch(arrays, rows, device)


@torch.no_grad()
def evaluate_loss(model: Transformer, arrays: dict, batch_size: int, compute: Compute) -> float:
    """Mean cross-entropy per trained target over all rows (a sum over tokens, not a mean of batch means)."""
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=compute.device), 0
    n_rows = len(arrays["ids"])
    for start in range(0, n_rows, batch_size):
        batch = to_batch(arrays, range(start, min(n_rows, start + batch_size)), compute.device)
        with compute.autocast():
            loss_sum, n = model(*batch.inputs())
        total += loss_sum
        count += n
    return total.item() / max(1, count)  # one read at the end


def accumulate_gradients(model, micro: list[Batch], compute: Compute, world: int = 1, extra: dict | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward over this rank's micro-batches of one optimizer step. Each summed cross-entropy is divided by
    the step's trained-target count over all micro-batches and all ranks (times world, since DDP and FSDP average
    gradients over ranks), so every token weighs the same however the step is split. Under DDP the gradient
    all-reduce runs once, on the last micro-batch. A mixture-of-experts model's load-balancing loss (coefficient
    applied, per forward) is added divided by the micro-batch count, and averaged over ranks by DDP and FSDP: the
    step trains on its mean, however the step is split; that mean goes into extra["router_aux_loss"] (a device
    tensor, the same on every rank), apart from the loss. Returns the global (loss sum, target count) as device
    tensors: nothing here waits for the device, the caller reads them once per step."""
    n_targets = torch.tensor(float(sum(b.n_targets for b in micro)), dtype=torch.float64)  # counted on the CPU
    n_targets = all_reduce_sum(to_device(n_targets, compute.device), world)
    scale = (world / n_targets.clamp(min=1)).float()  # clamp: a fully masked step gives zero, not NaN
    loss_sum = torch.zeros((), dtype=torch.float64, device=compute.device)
    aux_sum = None
    for i, batch in enumerate(micro):
        # DDP all-reduces once, on the last micro-batch; FSDP reduce-scatters every one (no unsharded gradients kept)
        sync = i == len(micro) - 1 or not hasattr(model, "no_sync")
        with contextlib.nullcontext() if sync else model.no_sync():
            with compute.autocast():
                part, _ = model(*batch.inputs())
            aux = getattr(getattr(model, "module", model), "router_loss", None)  # MoE only (DDP wraps the model)
            (part * scale if aux is None else part * scale + aux / len(micro)).backward()
        loss_sum += part.detach()
        if aux is not None:
            aux_sum = aux.detach().double() / len(micro) + (0 if aux_sum is None else aux_sum)
    if extra is not None and aux_sum is not None:
        extra["router_aux_loss"] = all_reduce_sum(aux_sum, world) / world
    return all_reduce_sum(loss_sum, world), n_targets


def make_logger(live_dir: str | None, cfg: TrainConfig, config: dict):
    """log(metrics, step): DVCLive (and W&B when asked for), on rank 0 only; a no-op on other ranks."""
    live = run = None
    rank0 = is_rank0()
    if live_dir and rank0:
        from dvclive import Live

        live = Live(live_dir, dvcyaml=False, save_dvc_exp=False)
    if cfg.wandb_project and rank0:
        import wandb

        run = wandb.init(project=cfg.wandb_project, config=config)

    def log(metrics: dict, step: int) -> None:
        if live is not None:
            live.step = step
            for k, v in metrics.items():
                live.log_metric(k, v)
            live.next_step()
        if run is not None:
            run.log(metrics, step=step)

    def close(final: dict | None = None) -> None:
        """End the run; `final` (name -> number) goes into metrics.json only, with no plot."""
        if live is not None:
            live.summary.update(final or {})
            live.end()
        if run is not None:
            run.finish()

    return log, close


# ---- speed ----------------------------------------------------------------------------------------------------
def configure(model: Transformer, cfg: TrainConfig, compute: Compute, sharded: bool = False) -> None:
    """CUDA: FlexAttention block mask (compiled here, once), blocks compiled with fixed shapes for the forward
    passes of training (packed rows all have block_size tokens; generation keeps the plain blocks), TF32
    (setup_compute). Everywhere: chunked output-layer loss, optional activation checkpointing. The CPU keeps SDPA
    with a boolean mask (FlexAttention has no CPU backward) and eager mode."""
    model.loss_chunk = loss_chunk_of(cfg)  # train() sizes an auto one first
    model.checkpointing = cfg.activation_checkpointing
    model.neftune_alpha = getattr(cfg, "neftune_alpha", 0.0)  # SFT only (pretraining has no such param)
    model.use_flex = flex_available(compute.device)
    if model.use_flex:
        enable_flex()
    if compute.device.type == "cuda" and cfg.compile and sharded:
        print0("compile: not applied under parallel: fsdp (the sharded blocks run eager)")
    elif compute.device.type == "cuda" and cfg.compile:
        model.compile_blocks()


# ---- resume ---------------------------------------------------------------------------------------------------
NOT_FINGERPRINTED = ("eval_every", "log_every", "save_every", "max_bad_steps", "wandb_project",
                     "activation_checkpointing", "save_dtype", "max_shard_gb", "remote_checkpoints",
                     "remote_keep")  # never change the trained weights (lora.quantize, optimizer, offload and the
# loss_chunk auto chose do: they stay in)


def fingerprint(cfg: TrainConfig, model: Transformer, arrays: dict, world: int) -> str:
    """What a resume checkpoint must match: the params that shape the weights, the process count, the packed
    rows and the starting weights."""
    h = hashlib.sha256()
    cfg = dataclasses.replace(cfg, loss_chunk=loss_chunk_of(cfg))  # the chunk the loss uses, not `auto`
    kept = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    h.update(json.dumps(kept | {"world": world}, sort_keys=True).encode())
    for name in ARRAYS:
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict:
    """This process's generators: CPU, numpy, Python and its own CUDA device's (not every visible GPU's: a resume
    on a machine with fewer GPUs must not look for generators it does not have)."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    cuda = state["cuda"]
    if isinstance(cuda, list):  # checkpoints written before: one state per visible GPU; ours is the current one's
        i = torch.cuda.current_device() if torch.cuda.is_available() else len(cuda)
        cuda = cuda[i] if i < len(cuda) else None
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename: a crash (kill -9 included) leaves the previous checkpoint whole."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())


def load_checkpoint(path: Path, expected: str, desc: str) -> dict | None:
    """The checkpoint at `path` if it was made by this run's params, data and starting weights; else None,
    with a message saying why it is not used. Loaded with weights_only (no arbitrary pickles)."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: say so and start fresh
        print0(f"{desc}: resume checkpoint {path} is unreadable ({type(e).__name__}: {e}); starting fresh")
        return None
    if state.get("fingerprint") != expected:
        print0(f"{desc}: resume checkpoint {path} was made with other params, other packed data or another base "
               f"model (fingerprint differs); refusing it and starting fresh")
        return None
    return state


def train(cfg: TrainConfig, model: Transformer, compute: Compute, train_data: dict, dev_data: dict | None,
          live_dir: str | None = None, desc: str = "train",
          evaluator: Callable[[Transformer], dict[str, float]] | None = None, ckpt_dir: str | None = None,
          plan: MemoryPlan | None = None) -> dict:
    """Train `model` in place on packed rows; returns a summary. Data order and init are seeded. Only parameters
    that require grad train (LoRA: the adapters). With cfg.parallel fsdp on several ranks the model is left
    sharded: trained_weights() gathers it. evaluator(model) -> {name: float} runs on rank 0 at every dev
    evaluation (not under FSDP); its values are logged with dev_loss. ckpt_dir: where the resume checkpoint lives
    (rerunning after a crash continues from it). plan: the memory plan, written to the metrics with the peak."""
    world, rank, compute = init_distributed(compute)
    device = compute.device
    sharded = (getattr(cfg, "parallel", "ddp") == "fsdp" and world > 1) or offloaded(cfg)
    if sharded and cfg.remote_checkpoints:
        raise UserError("train.remote_checkpoints with parallel: fsdp or offload: optimizer is not supported yet (the "
                        "checkpoint is one file per rank); set remote_checkpoints: false, or parallel: ddp and "
                        "offload: none")
    if offloaded(cfg) and world == 1:
        one_process_group(device)  # FSDP2's offload wants a process group, even of one process
    if cfg.loss_chunk == "auto":  # the chosen size shapes the sums, so the fingerprint holds it, not `auto`
        cfg = sized_loss_chunk(model.arch, cfg, train_data["ids"].shape[1], world, device.type,
                               compute.autocast_dtype is not None, device_free_bytes(device))
    if plan is None:
        plan = plan_memory(model.arch, cfg, train_data["ids"].shape[1], world, device.type,
                           compute.autocast_dtype is not None)
        print0(f"{desc}: {plan.line(device_free_bytes(device))}")
    n_params, n_trainable = model.num_params(), sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_params += sum(m.in_features * m.out_features for m in model.modules() if is_nf4(m))  # NF4: buffers
    n_rows = len(train_data["ids"])
    n_steps = total_steps(cfg, n_rows, world)
    start, skipped, bad_in_row, summary = 0, 0, 0, {}
    ckpt = Path(ckpt_dir) / "resume.pt" if ckpt_dir and cfg.save_every > 0 else None
    fp = fingerprint(cfg, model, train_data, world) if ckpt is not None else None
    # on the host first, so that no GPU ever holds more than the plan says: the frozen LoRA base cast to bf16
    # (not under FSDP, whose shards are 4 / world bytes a parameter already), then sharded or moved whole
    if device.type == "cuda" and compute.autocast_dtype is not None and not sharded:
        frozen_to(model, compute.autocast_dtype)
    if sharded:
        shard(model, compute, world, offloaded(cfg))  # fully_shard moves each module's shard to the device
    else:
        model.to(device)
    optimizer = make_optimizer(model, cfg, device)
    uploader = None
    if ckpt is not None:
        state, uploader = open_checkpoints(ckpt, fp, cfg, desc, world, rank, sharded)
        if state is not None:
            restore(model, optimizer, state, rank)
            start, skipped, bad_in_row, summary = state["step"], state["skipped"], state["bad_in_row"], state["summary"]
            print0(f"{desc}: resuming from {ckpt} at step {start}/{n_steps}")
    configure(model, cfg, compute, sharded)
    # no buffer broadcast at each forward: ours (RoPE rates, NF4 codes) never change; sparse: some parameters may get
    # no gradient in a step (experts no token was routed to; a vision tower)
    ddp_model = torch.nn.parallel.DistributedDataParallel(
        model, broadcast_buffers=False, find_unused_parameters=getattr(model, "sparse", False)) \
        if world > 1 and not sharded else model
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches = micro_batches(train_data, cfg, device, world, rank, skip=start * cfg.grad_accum)
    log, close = make_logger(live_dir, cfg, dataclasses.asdict(cfg) | {"n_steps": n_steps, "world": world,
                                                                       "n_params": n_params,
                                                                       "n_trainable": n_trainable})
    print0(f"{desc}: {n_params:,} parameters ({n_trainable:,} trained), {n_rows} rows, {n_steps} steps of "
           f"{cfg.batch_size * cfg.grad_accum * world} rows on {world} x {device}{' (FSDP)' if sharded else ''} "
           f"({compute.autocast_dtype or torch.float32})")
    if evaluator is not None and sharded:
        print0(f"{desc}: no generation during training under FSDP (parallel: fsdp, offload: optimizer; dev loss "
               "only); evaluate scores it")
        evaluator = None
    if evaluator is not None and getattr(getattr(cfg, "lora", None), "quantize", "none") == "nf4":
        # generation fuses dense q, k, v, gate and up weights for the whole model: what NF4 saves, it would spend
        print0(f"{desc}: no generation during training with lora.quantize: nf4 (dev loss only); evaluate scores it")
        evaluator = None
    tty = sys.stdout.isatty()
    bar = tqdm(total=n_steps, initial=start, desc=desc, disable=not tty or rank != 0, dynamic_ncols=True)
    t_start, rates = time.time(), []  # rates: tokens/s of each step this run took
    upcoming = [next(batches) for _ in range(cfg.grad_accum)] if start < n_steps else []
    for step in range(start, n_steps + 1):
        last_step = step == n_steps
        if dev_data is not None and (rank == 0 or sharded) and (step % cfg.eval_every == 0 or last_step):
            dev_loss = evaluate_loss(model, dev_data, cfg.batch_size, compute)  # sharded: every rank takes part
            extra = evaluator(model) if evaluator is not None else {}
            log({"dev_loss": dev_loss} | extra, step)
            summary |= {"dev_loss": dev_loss} | extra
        if last_step:
            break
        t0 = time.time()
        model.train()
        micro = upcoming
        extra = {}  # a mixture of experts: its router's load-balancing loss, logged apart from the loss
        loss_sum, n_targets = accumulate_gradients(ddp_model, micro, compute, world, extra)
        n_tokens = all_reduce_sum(to_device(torch.tensor(float(sum(b.n_tokens for b in micro)),
                                                         dtype=torch.float64), device), world)
        lr = lr_at(step, cfg, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
        grad_norm = grad_norm.to(loss_sum.device)  # offload: the gradients, so their norm, are on the host
        # the next step's rows go to the device while it works on this one (nothing above waited for it)
        upcoming = [next(batches) for _ in range(cfg.grad_accum)] if step + 1 < n_steps else []
        # the step's one read of the device: the skip decision and the log line need these four numbers
        loss_sum, n_targets, grad_norm, n_tokens, *aux = torch.stack([loss_sum, n_targets, grad_norm.double(),
                                                                      n_tokens, *extra.values()]).tolist()
        loss = loss_sum / max(1, n_targets)
        if math.isfinite(loss) and math.isfinite(grad_norm):  # the same on every rank: both are global
            optimizer.step()
            bad_in_row = 0
        else:  # watchdog: skip the update, count it, stop after max_bad_steps in a row
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            print0(f"{desc}: step {step} non-finite (loss {loss}, grad norm {grad_norm}); skipped")
            if bad_in_row >= cfg.max_bad_steps:
                if uploader is not None:
                    uploader.close()
                raise RuntimeError(f"{desc}: {bad_in_row} non-finite steps in a row; stopping (the last resume "
                                   f"checkpoint, if any, is {ckpt} and holds weights from before them)")
        optimizer.zero_grad(set_to_none=True)
        if ckpt is not None and (step + 1) % cfg.save_every == 0 and step + 1 < n_steps:
            save_resume(ckpt, {"fingerprint": fp, "step": step + 1, "skipped": skipped, "bad_in_row": bad_in_row,
                               "summary": summary}, model, optimizer, world, rank, sharded, uploader)
        if bad_in_row:
            continue
        dt = time.time() - t0
        tok_s = n_tokens / max(1e-9, dt)
        log({"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "skipped_steps": skipped}
            | dict(zip(extra, aux)), step)
        bar.update(step + 1 - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if not tty and (step % cfg.log_every == 0 or step == n_steps - 1):
            eta = (time.time() - t_start) / (step + 1 - start) * (n_steps - step - 1)
            print0(f"{desc} step {step + 1}/{n_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                   f"tok/s {tok_s:,.0f} eta {eta:,.0f}s")
        summary |= {"loss": loss, "grad_norm": grad_norm} | dict(zip(extra, aux))
        rates.append(tok_s)
    bar.close()
    if uploader is not None:
        uploader.close()
    peak = peak_memory(device)
    summary |= {"steps": n_steps, "skipped_steps": skipped, "seconds": time.time() - t_start}
    if len(rates) > 2:  # the first steps compile (CUDA) and warm up: the median of the others is the loop's speed
        summary["tokens_per_s"] = float(np.median(rates[2:]))
    memory = plan.metrics() | {"peak_memory_gib": peak / 2**30}
    what = "allocated on the GPU" if device.type == "cuda" else "the process's resident set"
    print0(f"{desc}: peak memory {peak / 2**30:,.2f} GiB ({what}); planned {plan.total() / 2**30:,.2f} GiB")
    close(memory)
    return summary | memory


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak: what torch allocated on the GPU, or on the CPU the process's peak resident set (all of
    it: Python, data and libraries too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def frozen_to(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Frozen parameters (a LoRA base) held in `dtype`; trained ones stay fp32, the master weights."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            p.data = p.data.to(dtype)


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict entries of the trained parameters (all of them in full training, the adapters in LoRA; a
    tied output layer listed under both names, as state_dict does). Under FSDP: DTensors."""
    return {n: t.detach() for n, t in model.state_dict(keep_vars=True).items() if t.requires_grad}


def trained_weights(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The trained parameters, whole, on rank 0's CPU (None elsewhere); every rank calls it (FSDP gathers)."""
    return gather_full(trained_state(model))


def open_checkpoints(ckpt: Path, fp: str, cfg: TrainConfig, desc: str, world: int, rank: int, sharded: bool):
    """(the resume state this rank continues from, or None to start fresh; the background uploader of remote
    checkpoints, on rank 0 when they are on, else None). Every rank must find the same step."""
    store = open_remote(ckpt, desc, fp) if cfg.remote_checkpoints and rank == 0 else None
    uploader = Uploader(store, cfg.remote_keep) if store is not None else None
    state = find_checkpoint(ckpt, fp, desc, store, cfg.remote_checkpoints, world, rank)
    if state is not None and sharded:
        state = load_shard(ckpt, state, rank, desc)
    if world > 1:  # multi-node: ckpt_dir must be on storage every machine shares
        steps = [None] * world
        dist.all_gather_object(steps, state["step"] if state is not None else None)
        if sharded and None in steps and set(steps) != {None}:  # a shard lost: no rank can resume from it
            missing = [r for r, s in enumerate(steps) if s is None]
            print0(f"{desc}: resume checkpoint {ckpt} lacks the shard of rank {', '.join(map(str, missing))} of "
                   f"{world}; every rank starts fresh")
            return None, uploader
        if len(set(steps)) > 1:
            raise UserError(f"ranks disagree on the resume step {[s or 0 for s in steps]}; put {ckpt.parent} on "
                            "storage every machine shares, or delete it to start fresh")
    return state, uploader


def save_resume(ckpt: Path, meta: dict, model, optimizer, world: int, rank: int, sharded: bool, uploader) -> None:
    """The resume checkpoint of step meta["step"]: sharded (save_shards), or one file written by rank 0 holding
    the trained weights, AdamW state and every rank's generators (dropout and NEFTune draw on each rank), uploaded
    in the background when remote checkpoints are on. Every rank calls it."""
    if sharded:
        save_shards(ckpt, meta, model, optimizer, rank)
        return
    rngs = [rng_state()] * world
    if world > 1:
        dist.all_gather_object(rngs, rngs[0])
    if rank == 0:
        save_checkpoint(ckpt, meta | {"model": trained_state(model), "optimizer": optimizer.state_dict(),
                                      "rng": rngs[0], "rngs": rngs})
    if uploader is not None:
        uploader.submit(ckpt, meta["step"])  # in the background; the loop goes on


def restore(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, rank: int = 0) -> None:
    """A checkpoint's trained weights, AdamW state and this rank's generators back in place (shards, under
    FSDP)."""
    names = set(trained_state(model))
    if set(state["model"]) != names:
        raise UserError(f"resume checkpoint holds {len(state['model'])} tensors, this run trains {len(names)}; "
                        "delete the checkpoint folder to start fresh")
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, t in state["model"].items():
            local(params[name]).copy_(t)
    in_order = [p for group in optimizer.param_groups for p in group["params"]]
    optim = state["optimizer"]
    optim = optim | {"state": {i: {k: sharded_like(v, in_order[i]) for k, v in entry.items()}
                               for i, entry in optim["state"].items()}}
    optimizer.load_state_dict(optim)
    rngs = state.get("rngs")  # one per rank (older checkpoints: rank 0's only)
    set_rng_state(rngs[rank] if rngs and rank < len(rngs) else state["rng"])


def shard_path(ckpt: Path, step: int, rank: int) -> Path:
    return ckpt.with_name(f"{ckpt.stem}-step{step}-rank{rank}.pt")


def save_shards(ckpt: Path, meta: dict, model, optimizer, rank: int) -> None:
    """A sharded checkpoint: each rank writes its shards of the weights and AdamW state and its generators to a
    file of its own, named by step; once all have, rank 0 writes `ckpt` (the step, the fingerprint), which makes
    that step the one a rerun resumes from; then each rank deletes its older files. A kill at any point leaves a
    whole checkpoint: the previous one, or this one."""
    path = shard_path(ckpt, meta["step"], rank)
    save_checkpoint(path, {"model": local(trained_state(model)), "optimizer": local(optimizer.state_dict()),
                           "rng": rng_state(), "fingerprint": meta["fingerprint"]})
    dist.barrier()
    if rank == 0:
        save_checkpoint(ckpt, meta | {"shards": dist.get_world_size()})
    dist.barrier()
    for old in ckpt.parent.glob(f"{ckpt.stem}-step*-rank{rank}.pt"):
        if old != path:
            old.unlink(missing_ok=True)


def load_shard(ckpt: Path, state: dict, rank: int, desc: str) -> dict | None:
    """This rank's part of the sharded checkpoint `state` (as load_checkpoint read it), merged into it; None (start
    fresh) when the checkpoint was not sharded over this many ranks, or this rank's file is missing (then
    open_checkpoints has every rank start fresh, and says so once)."""
    path = shard_path(ckpt, state["step"], rank)
    if state.get("shards") != dist.get_world_size():
        print0(f"{desc}: resume checkpoint {ckpt} was sharded over {state.get('shards')} ranks, not "
               f"{dist.get_world_size()}; starting fresh")
        return None
    if not path.exists():
        return None
    part = load_checkpoint(path, state["fingerprint"], desc)
    return None if part is None else state | part


def find_checkpoint(ckpt: Path, fp: str, desc: str, store, remote: bool, world: int, rank: int) -> dict | None:
    """The local checkpoint; with remote checkpoints and none usable here, the newest of the run on the remote,
    downloaded by rank 0 while the other ranks wait, then read by all from the same file."""
    if not remote:
        return load_checkpoint(ckpt, fp, desc)
    state = None
    if rank == 0:
        state = load_checkpoint(ckpt, fp, desc)
        if state is None and store is not None and store.download(ckpt) is not None:
            state = load_checkpoint(ckpt, fp, desc)
    if world > 1:
        dist.barrier()
        state = load_checkpoint(ckpt, fp, desc) if rank != 0 else state
    return state


def open_remote(ckpt: Path, desc: str, fp: str):
    """The run's checkpoint folder on the DVC remote (or None). Once the remote answers, remote.json next to the
    local checkpoint notes it for clear_checkpoint, which deletes the run's remote checkpoints."""
    for stale in ckpt.parent.glob(f".{ckpt.name}.*"):  # upload snapshots, downloads, temp files a kill left behind
        stale.unlink()
    store = open_store(desc, fp)
    if store is not None:
        store.note = ckpt.parent / "remote.json"
        print0(f"{desc}: resume checkpoints also go to DVC remote {store.where}: "
               f"{store.fs.unstrip_protocol(store.root)}")
    return store


def clear_checkpoint(ckpt_dir: str | None, cfg: TrainConfig) -> None:
    """After the model folder is written the resume checkpoint has served its purpose; so have the run's remote
    ones, but for the newest cfg.remote_keep."""
    if not ckpt_dir or not is_rank0():
        return
    for path in [Path(ckpt_dir) / "resume.pt", *Path(ckpt_dir).glob("resume-step*-rank*.pt")]:  # FSDP: shards too
        path.unlink(missing_ok=True)
    note = Path(ckpt_dir) / "remote.json"
    if note.exists():
        run = json.loads(note.read_text())
        finish(run["desc"], run["fingerprint"], cfg.remote_keep)
        note.unlink()
