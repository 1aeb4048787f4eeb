"""Training: packed rows -> a trained model. Used for SFT and for pretraining the bundled base model.
One visible loop: AdamW (decay on matrices), warmup + cosine to a floor, gradient accumulation with the loss
normalised by the trained-target count of the whole optimizer step, clipping, non-finite steps skipped."""
import dataclasses
import json
import math
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from tqdm import tqdm

from pipeline.chat import IGNORE_INDEX, load_tokenizer
from pipeline.common import Compute, load_params, print0, setup_compute
from pipeline.evaluate import EvaluateConfig, evaluate_loss, make_train_evaluator
from pipeline.model import ModelConfig, Transformer, load_model, save_model, shift_targets
from pipeline.pack import PackConfig, load_packed, pack, row_order, to_batch
from pipeline.sources import IMPORT_DIR, resolve_model


@dataclasses.dataclass
class TrainConfig:
    seed: int = 0  # data order seed
    lr: float = 3.0e-4  # peak learning rate
    min_lr_frac: float = 0.1  # cosine floor, as a fraction of lr
    warmup_frac: float = 0.03  # linear warmup, as a fraction of all steps
    epochs: float = 1.0  # passes over the packed rows (ignored when max_steps > 0)
    max_steps: int = 0  # optimizer steps; 0: derived from epochs
    batch_size: int = 16  # packed rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    weight_decay: float = 0.1  # AdamW decay, matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1.0e-8
    grad_clip: float = 1.0  # max global gradient norm (the pre-clip norm is logged)
    eval_every: int = 50  # steps between dev-loss evaluations
    log_every: int = 10  # steps between log lines when stdout is not a terminal
    max_bad_steps: int = 10  # consecutive non-finite steps before the run stops
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


def total_steps(cfg: TrainConfig, n_rows: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_rows / (cfg.batch_size * cfg.grad_accum)))


def lr_at(step: int, cfg: TrainConfig, n_steps: int) -> float:
    """Linear warmup over W steps, then cosine from lr down to min_lr_frac * lr at the last step."""
    warmup = max(1, round(cfg.warmup_frac * n_steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, n_steps - warmup)
    f = cfg.min_lr_frac
    return cfg.lr * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: Transformer, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """A fresh AdamW; weight decay on matrices only, never on norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             fused=device.type == "cuda")


def micro_batches(arrays: dict, cfg: TrainConfig, device):
    """Endless seeded stream of micro-batches: each epoch a fresh permutation of the packed rows."""
    n_rows, epoch = len(arrays["ids"]), 0
    buffer = []
    while True:
        buffer.extend(row_order(n_rows, cfg.seed, epoch).tolist())
        epoch += 1
        while len(buffer) >= cfg.batch_size:
            rows, buffer = buffer[: cfg.batch_size], buffer[cfg.batch_size :]
            yield to_batch(arrays, rows, device)


def count_targets(micro: list) -> int:
    """Trained targets after the shift, over all micro-batches of the step: the loss denominator."""
    return sum(int((shift_targets(labels, doc) != IGNORE_INDEX).sum()) for _, labels, _, doc in micro)


def accumulate_gradients(model: Transformer, micro: list, compute: Compute) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step. Each summed cross-entropy is divided by the
    step's total trained-target count, so every token weighs the same however the step is split."""
    n_targets = count_targets(micro)
    loss_sum = 0.0
    for ids, labels, pos, doc in micro:
        with compute.autocast():
            part, _ = model(ids, labels, pos, doc)
        (part / max(1, n_targets)).backward()  # max(1, .): a fully masked step gives zero, not NaN
        loss_sum += part.item()
    return loss_sum, n_targets


def make_logger(live_dir: str | None, cfg: TrainConfig, config: dict):
    """log(metrics, step): DVCLive (and W&B when asked for)."""
    live = run = None
    if live_dir:
        from dvclive import Live

        live = Live(live_dir, dvcyaml=False, save_dvc_exp=False)
    if cfg.wandb_project:
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


def train(cfg: TrainConfig, model: Transformer, compute: Compute, train_data: dict, dev_data: dict | None,
          live_dir: str | None = None, desc: str = "train",
          evaluator: Callable[[Transformer], dict[str, float]] | None = None) -> dict:
    """Train `model` in place on packed rows; returns a summary. Data order and init are seeded.
    evaluator(model), if given, runs at every dev evaluation; its floats are logged at that step."""
    device = compute.device
    model.to(device)
    n_steps = total_steps(cfg, len(train_data["ids"]))
    optimizer = make_optimizer(model, cfg, device)
    batches = micro_batches(train_data, cfg, device)
    log, close = make_logger(live_dir, cfg, dataclasses.asdict(cfg) | {"n_steps": n_steps,
                                                                       "n_params": model.num_params()})
    print0(f"{desc}: {model.num_params():,} parameters, {len(train_data['ids'])} rows, {n_steps} steps "
           f"on {device} ({compute.autocast_dtype or torch.float32})")
    tty = sys.stdout.isatty()
    bar = tqdm(total=n_steps, desc=desc, disable=not tty, dynamic_ncols=True)
    skipped = bad_in_row = 0
    summary, t_start = {}, time.time()
    for step in range(n_steps + 1):
        last_step = step == n_steps
        if dev_data is not None and (step % cfg.eval_every == 0 or last_step):
            dev_loss = evaluate_loss(model, dev_data, cfg.batch_size, compute)
            extra = evaluator(model) if evaluator is not None else {}
            log({"dev_loss": dev_loss} | extra, step)
            summary |= {"dev_loss": dev_loss} | extra
        if last_step:
            break
        t0 = time.time()
        model.train()
        micro = [next(batches) for _ in range(cfg.grad_accum)]
        loss_sum, n_targets = accumulate_gradients(model, micro, compute)
        lr = lr_at(step, cfg, n_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        loss = loss_sum / max(1, n_targets)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            optimizer.zero_grad(set_to_none=True)
            skipped, bad_in_row = skipped + 1, bad_in_row + 1
            print0(f"{desc}: step {step} non-finite (loss {loss}, grad norm {grad_norm}); skipped")
            if bad_in_row >= cfg.max_bad_steps:
                raise RuntimeError(f"{desc}: {bad_in_row} non-finite steps in a row; stopping")
            continue
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bad_in_row = 0
        n_tokens = sum(int((doc >= 0).sum()) for _, _, _, doc in micro)
        tok_s = n_tokens / max(1e-9, time.time() - t0)
        log({"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tok_s, "skipped_steps": skipped}, step)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}")
        if not tty and (step % cfg.log_every == 0 or step == n_steps - 1):
            print0(f"{desc} step {step + 1}/{n_steps} loss {loss:.4f} lr {lr:.2e} grad_norm {grad_norm:.3f} "
                   f"tok/s {tok_s:,.0f}")
        summary["loss"] = loss
    bar.close()
    summary |= {"steps": n_steps, "skipped_steps": skipped, "seconds": time.time() - t_start}
    close()
    return summary


@dataclasses.dataclass
class BaseConfig:
    seed: int = 0  # weight-init seed of the bundled base model
    init_from: str = ""  # instead of pretraining: a model folder, a .gguf file or hf://org/name (pipeline/sources.py)
    block_size: int = 256  # tokens per packed pretraining row
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


def make_base(cfg: BaseConfig, model_cfg: ModelConfig, corpus: str, tokenizer: str, out: str,
              live_dir: str) -> None:
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
        log({"corpus_loss": evaluate_loss(model.to(compute.device), rows, cfg.pretrain.batch_size, compute)}, 0)
        close()
    else:
        model = Transformer(dataclasses.replace(model_cfg, vocab_size=tok.get_vocab_size()))
        model.init_weights(cfg.seed)
        train(cfg.pretrain, model, compute, rows, None, live_dir, "base")
    save_model(model.cpu(), tok, out)


def finetune(cfg: TrainConfig, base: str, packed: str, out: str, live_dir: str) -> None:
    """SFT: the base folder's model trained on packed conversations, saved as a model folder."""
    tok = load_tokenizer(base)
    model = load_model(base)
    compute = setup_compute(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    dev = load_packed(f"{packed}/dev")
    # a small generation evaluation on dev prompts at every eval point; sample answers go next to the curves
    during = load_params("evaluate", EvaluateConfig).during_train
    evaluator = make_train_evaluator(tok, dev, during, compute, live_dir)
    summary = train(cfg, model, compute, load_packed(f"{packed}/train"), dev, live_dir, "sft", evaluator)
    print0(f"sft: {summary}")
    save_model(model.cpu(), tok, out)
