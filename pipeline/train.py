"""Training: packed rows -> a trained model. Used for SFT and for pretraining the bundled base model.
One visible loop: AdamW (decay on matrices), warmup + cosine to a floor, gradient accumulation with the loss
normalised by the trained-target count of the whole optimizer step (over all ranks), clipping, non-finite steps
skipped, DDP under torchrun, and an atomic resume checkpoint every save_every steps that makes a rerun after a
crash continue exactly where the last checkpoint left off."""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.chat import IGNORE_INDEX, load_tokenizer
from pipeline.common import Compute, atomic_dir, is_rank0, load_params, print0, setup_compute
from pipeline.evaluate import EvaluateConfig, evaluate_loss, make_train_evaluator
from pipeline.model import ModelConfig, Transformer, flex_available, load_model, save_model, shift_targets
from pipeline.pack import ARRAYS, PackConfig, load_packed, pack, row_order, to_batch
from pipeline.sources import IMPORT_DIR, resolve_model


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0  # data order seed
    lr: float = 3.0e-4  # peak learning rate
    min_lr_frac: float = 0.1  # cosine floor, as a fraction of lr
    warmup_frac: float = 0.03  # linear warmup, as a fraction of all steps
    epochs: float = 1.0  # passes over the packed rows (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0: derived from epochs
    batch_size: int = 16  # packed rows per micro-batch, per process
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.1  # AdamW decay, matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0  # max global gradient norm (the pre-clip norm is logged)
    eval_every: int = 50  # steps between dev-loss evaluations
    log_every: int = 10  # steps between log lines when stdout is not a terminal
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
    save_every: int = 100  # steps between resume checkpoints; 0: none
    nproc: int = 1  # processes (GPUs) on this machine; > 1 relaunches the stage under torchrun (DDP)
    compile: bool = True  # torch.compile the blocks on CUDA (fixed shapes); CPU always runs eager
    activation_checkpointing: bool = False  # recompute blocks in backward: less memory, ~30% more compute
    loss_chunk: int = 8192  # trained positions per output-layer chunk in the loss; 0: all at once
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bfloat16 | float32
    wandb_project: str = ""  # set to log to W&B too (mode from WANDB_MODE; default offline)

    def __post_init__(self):
        if self.lr <= 0 or not 0 <= self.min_lr_frac <= 1 or not 0 <= self.warmup_frac < 1:
            raise ValueError("train: need lr > 0, 0 <= min_lr_frac <= 1, 0 <= warmup_frac < 1")
        if self.batch_size < 1 or self.grad_accum < 1 or self.eval_every < 1 or self.log_every < 1:
            raise ValueError("train: batch_size, grad_accum, eval_every and log_every must be >= 1")
        if self.max_steps < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ValueError("train: set max_steps > 0 or epochs > 0")
        if self.save_every < 0 or self.nproc < 1 or self.loss_chunk < 0 or self.max_bad_steps < 1:
            raise ValueError("train: need save_every >= 0, nproc >= 1, loss_chunk >= 0, max_bad_steps >= 1")


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


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """A fresh AdamW; weight decay on matrices only, never on norm gains. Fused kernel on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda")


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


def all_reduce_sum(x: float, device, world: int) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def count_targets(micro: list) -> int:
    """Trained targets after the shift, over all micro-batches of the step: the loss denominator."""
    return sum(int((shift_targets(labels, doc) != IGNORE_INDEX).sum()) for _, labels, _, doc in micro)


def accumulate_gradients(model, micro: list, compute: Compute, world: int = 1) -> tuple[float, int]:
    """Backward over this rank's micro-batches of one optimizer step. Each summed cross-entropy is divided by
    the step's trained-target count over all micro-batches and all ranks (times world, since DDP averages
    gradients over ranks), so every token weighs the same however the step is split. Under DDP the gradient
    all-reduce runs once, on the last micro-batch. Returns the global (loss sum, target count)."""
    n_targets = int(all_reduce_sum(count_targets(micro), compute.device, world))
    loss_sum = 0.0
    for i, (ids, labels, pos, doc) in enumerate(micro):
        sync = world == 1 or i == len(micro) - 1
        with contextlib.nullcontext() if sync else model.no_sync():
            with compute.autocast():
                part, _ = model(ids, labels, pos, doc)
            (part * world / max(1, n_targets)).backward()  # max(1, .): a fully masked step gives zero, not NaN
        loss_sum += part.item()
    return all_reduce_sum(loss_sum, compute.device, world), n_targets


def make_logger(live_dir: str | None, cfg: TrainConfig, config: dict):
    """log(metrics, step): DVCLive (and W&B when asked for), on rank 0 only; a no-op on other ranks."""
    live = run = None
    rank0 = int(os.environ.get("RANK", "0")) == 0
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

    def close() -> None:
        if live is not None:
            live.end()
        if run is not None:
            run.finish()

    return log, close


# ---- many processes -------------------------------------------------------------------------------------------
def launch(nproc: int, module: str, args: list[str]) -> bool:
    """Rerun `python -m module args` as nproc processes under torchrun on this machine, unless this process
    already is one (RANK set: torchrun started it, possibly across machines). Returns True when it launched."""
    if nproc <= 1 or "RANK" in os.environ:
        return False
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *args]
    print0(f"{module}: launching {nproc} processes: {' '.join(cmd[1:])}")
    result = subprocess.run(cmd)
    if result.returncode:
        raise SystemExit(f"{module}: torchrun with {nproc} processes failed (exit code {result.returncode})")
    return True


@contextlib.contextmanager
def output_dir(out: str):
    """atomic_dir(out) on rank 0; other ranks write nothing and get None."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield None
        return
    with atomic_dir(out) as tmp:
        yield str(tmp)


def init_distributed(compute: Compute) -> tuple[int, int, Compute]:
    """(world, rank, compute) from torchrun's environment; joins the process group (NCCL on CUDA, gloo on CPU)
    and puts each CUDA rank on its own GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 1, 0, compute
    if compute.device.type == "cuda":
        compute = dataclasses.replace(compute, device=torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
        torch.cuda.set_device(compute.device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if compute.device.type == "cuda" else "gloo")
    return world, dist.get_rank(), compute


# ---- speed ----------------------------------------------------------------------------------------------------
def configure(model: Transformer, cfg: TrainConfig, compute: Compute) -> None:
    """CUDA: FlexAttention block mask, blocks compiled with fixed shapes (packed rows all have block_size
    tokens), TF32 (setup_compute). Everywhere: chunked output-layer loss, optional activation checkpointing.
    The CPU keeps SDPA with a boolean mask (FlexAttention has no CPU backward) and eager mode."""
    model.loss_chunk = cfg.loss_chunk
    model.checkpointing = cfg.activation_checkpointing
    model.use_flex = flex_available(compute.device)
    if compute.device.type == "cuda" and cfg.compile:
        for block in model.blocks:
            block.compile(dynamic=False)


# ---- resume ---------------------------------------------------------------------------------------------------
NOT_FINGERPRINTED = ("eval_every", "log_every", "save_every", "max_bad_steps", "wandb_project",
                     "activation_checkpointing")  # change logging or memory, never the weights


def fingerprint(cfg: TrainConfig, model: Transformer, arrays: dict, world: int) -> str:
    """What a resume checkpoint must match: the params that shape the weights, the process count, the packed
    rows and the starting weights."""
    h = hashlib.sha256()
    kept = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    h.update(json.dumps(kept | {"world": world}, sort_keys=True).encode())
    for name in ARRAYS:
        h.update(np.ascontiguousarray(arrays[name]).tobytes())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                                                      *np_state[2:]),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename: a crash (kill -9 included) leaves the previous checkpoint whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
          evaluator: Callable[[Transformer], dict[str, float]] | None = None, ckpt_dir: str | None = None) -> dict:
    """Train `model` in place on packed rows; returns a summary. Data order and init are seeded.
    evaluator(model) -> {name: float} runs on rank 0 at every dev evaluation; its values are logged with dev_loss.
    ckpt_dir: where the resume checkpoint lives (rerunning after a crash continues from it)."""
    world, rank, compute = init_distributed(compute)
    device = compute.device
    model.to(device)
    n_rows = len(train_data["ids"])
    n_steps = total_steps(cfg, n_rows, world)
    optimizer = make_optimizer(model, cfg, device)
    start, skipped, bad_in_row, summary = 0, 0, 0, {}
    ckpt = Path(ckpt_dir) / "resume.pt" if ckpt_dir and cfg.save_every > 0 else None
    if ckpt is not None:
        fp = fingerprint(cfg, model, train_data, world)
        state = load_checkpoint(ckpt, fp, desc)
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            set_rng_state(state["rng"])
            start, skipped, bad_in_row, summary = state["step"], state["skipped"], state["bad_in_row"], state["summary"]
            print0(f"{desc}: resuming from {ckpt} at step {start}/{n_steps}")
        if world > 1:  # every rank must have found the same checkpoint (multi-node: put ckpt_dir on shared storage)
            steps = [None] * world
            dist.all_gather_object(steps, start)
            if len(set(steps)) > 1:
                raise RuntimeError(f"{desc}: ranks disagree on the resume step {steps}; is {ckpt} on shared storage?")
    configure(model, cfg, compute)
    ddp_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    batches = micro_batches(train_data, cfg, device, world, rank, skip=start * cfg.grad_accum)
    log, close = make_logger(live_dir, cfg, dataclasses.asdict(cfg) | {"n_steps": n_steps, "world": world,
                                                                       "n_params": model.num_params()})
    print0(f"{desc}: {model.num_params():,} parameters, {n_rows} rows, {n_steps} steps of "
           f"{cfg.batch_size * cfg.grad_accum * world} rows on {world} x {device} "
           f"({compute.autocast_dtype or torch.float32})")
    tty = sys.stdout.isatty()
    bar = tqdm(total=n_steps, initial=start, desc=desc, disable=not tty or rank != 0, dynamic_ncols=True)
    t_start = time.time()
    for step in range(start, n_steps + 1):
        last_step = step == n_steps
        if dev_data is not None and rank == 0 and (step % cfg.eval_every == 0 or last_step):
            dev_loss = evaluate_loss(model, dev_data, cfg.batch_size, compute)
            extra = evaluator(model) if evaluator is not None else {}
            log({"dev_loss": dev_loss} | extra, step)
            summary |= {"dev_loss": dev_loss} | extra
        if last_step:
            break
        t0 = time.time()
        model.train()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        loss_sum, n_targets = accumulate_gradients(ddp_model, micro, compute, world)
        lr = lr_at(step, cfg, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        loss = loss_sum / max(1, n_targets)
        if math.isfinite(loss) and math.isfinite(grad_norm):  # the same on every rank: both are global
            optimizer.step()
            bad_in_row = 0
        else:  # watchdog: skip the update, count it, stop after max_bad_steps in a row
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            print0(f"{desc}: step {step} non-finite (loss {loss}, grad norm {grad_norm}); skipped")
            if bad_in_row >= cfg.max_bad_steps:
                raise RuntimeError(f"{desc}: {bad_in_row} non-finite steps in a row; stopping (the last resume "
                                   f"checkpoint, if any, is {ckpt} and holds weights from before them)")
        optimizer.zero_grad(set_to_none=True)
        if ckpt is not None and rank == 0 and (step + 1) % cfg.save_every == 0 and step + 1 < n_steps:
            save_checkpoint(ckpt, {"fingerprint": fp, "step": step + 1, "skipped": skipped, "bad_in_row": bad_in_row,
                                   "summary": summary, "model": model.state_dict(),
                                   "optimizer": optimizer.state_dict(), "rng": rng_state()})
        if bad_in_row:
            continue
        n_tokens = all_reduce_sum(sum(int((doc >= 0).sum()) for _, _, _, doc in micro), device, world)
        dt = time.time() - t0
        tok_s = n_tokens / max(1e-9, dt)
        log({"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "skipped_steps": skipped}, step)
        bar.update(step + 1 - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if not tty and (step % cfg.log_every == 0 or step == n_steps - 1):
            eta = (time.time() - t_start) / (step + 1 - start) * (n_steps - step - 1)
            print0(f"{desc} step {step + 1}/{n_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                   f"tok/s {tok_s:,.0f} eta {eta:,.0f}s")
        summary["loss"] = loss
    bar.close()
    summary |= {"steps": n_steps, "skipped_steps": skipped, "seconds": time.time() - t_start}
    close()
    return summary


def clear_checkpoint(ckpt_dir: str | None) -> None:
    """After the model folder is written the resume checkpoint has served its purpose."""
    if ckpt_dir and is_rank0():
        (Path(ckpt_dir) / "resume.pt").unlink(missing_ok=True)


@dataclasses.dataclass
class BaseConfig:
    seed: int = 0  # weight-init seed of the bundled base model
    init_from: str = ""  # instead of pretraining: a model folder, a .gguf file or hf://org/name (pipeline/sources.py)
    block_size: int = 256  # tokens per packed pretraining row
    corpus_eval_rows: int = 256  # corpus rows on which an imported model's loss is measured (0: all of them)
    pretrain: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # pretraining hyperparameters


def corpus_rows(texts: list[str], tok, block_size: int) -> dict:
    """Pretraining rows: each document fully trained, cut into block_size pieces, packed with a document mask."""
    ids, labels = [], []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        x = np.asarray(enc.ids, dtype=np.int32)
        for start in range(0, len(x), block_size):
            ids.append(x[start : start + block_size])
            labels.append(x[start : start + block_size])
    arrays, _ = pack(ids, labels, PackConfig(block_size=block_size))
    return arrays


def make_base(cfg: BaseConfig, model_cfg: ModelConfig, corpus: str, tokenizer: str, out: str | None,
              live_dir: str, ckpt_dir: str | None = None) -> None:
    """The base model folder: a copy of cfg.init_from, or a model pretrained on the corpus."""
    tok = load_tokenizer(tokenizer)
    with open(corpus, encoding="utf-8") as f:
        rows = corpus_rows([json.loads(line)["text"] for line in f], tok, cfg.block_size)
    compute = setup_compute(cfg.pretrain.device, cfg.pretrain.dtype)
    if cfg.init_from:
        folder = resolve_model(cfg.init_from, IMPORT_DIR)
        model = load_model(folder)
        if load_tokenizer(folder).get_vocab() != tok.get_vocab():
            raise ValueError(f"{cfg.init_from}: its tokenizer differs from {tokenizer}")
        print0(f"base: using {cfg.init_from} ({model.num_params():,} parameters), no pretraining")
        # no training curve, but the same report: how well the imported model fits the corpus
        log, close = make_logger(live_dir, cfg.pretrain, {})
        # on the first corpus_eval_rows rows: a full pass of a real model over the corpus can take an hour on a CPU
        n = len(rows["ids"]) if cfg.corpus_eval_rows <= 0 else min(cfg.corpus_eval_rows, len(rows["ids"]))
        sample = {k: v[:n] for k, v in rows.items()}
        loss = evaluate_loss(model.to(compute.device), sample, cfg.pretrain.batch_size, compute)
        log({"corpus_loss": loss, "corpus_rows": n}, 0)
        close()
    else:
        model = Transformer(dataclasses.replace(model_cfg, vocab_size=tok.get_vocab_size()))
        model.init_weights(cfg.seed)
        train(cfg.pretrain, model, compute, rows, None, live_dir, "base", ckpt_dir=ckpt_dir)
    if out is not None:  # rank 0
        save_model(model.cpu(), tok, out)
        clear_checkpoint(ckpt_dir)


def finetune(cfg: TrainConfig, base: str, packed: str, out: str | None, live_dir: str,
             ckpt_dir: str | None = None) -> None:
    """SFT: the base folder's model trained on packed conversations, saved as a model folder (out None: a
    rank other than 0, which saves nothing). A rerun after a crash resumes from ckpt_dir."""
    tok = load_tokenizer(base)
    model = load_model(base)
    compute = setup_compute(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    dev = load_packed(f"{packed}/dev")
    # a small generation evaluation on dev prompts at every eval point; sample answers go next to the curves
    during = load_params("evaluate", EvaluateConfig).during_train
    evaluator = make_train_evaluator(tok, dev, during, compute, live_dir if out is not None else None)
    summary = train(cfg, model, compute, load_packed(f"{packed}/train"), dev, live_dir, "sft", evaluator,
                    ckpt_dir=ckpt_dir)
    print0(f"sft: {summary}")
    if out is not None:
        save_model(model.cpu(), tok, out)
        clear_checkpoint(ckpt_dir)
