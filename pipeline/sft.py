"""The train stage's work (SFT): the base model folder fine-tuned on packed conversations (in full, or LoRA
adapters), with a dev loss and a small generation check on dev prompts at every evaluation, saved as a model folder
(LoRA: the adapters merged) and, with LoRA, the adapter alone in PEFT's layout. A memory plan from config.json comes
first: a run that cannot fit the GPU (or, offloaded, the host) stops before the model is loaded. The model runs on
either backend (pipeline/backend.py: native, or transformers for any other decoder)."""
import os
from pathlib import Path

import torch

from pipeline.backend import add_adapters, check_rows, describe, load_model, planner, save_adapter, save_model
from pipeline.common import print0, setup_compute
from pipeline.config import DuringTrainConfig, SftConfig
from pipeline.evaluate import make_train_evaluator
from pipeline.hf import save_options
from pipeline.lora import merge_into
from pipeline.memory import plan_and_check
from pipeline.pack import load_packed
from pipeline.tokenizer import load_tokenizer
from pipeline.train import clear_checkpoint, train, trained_weights

NO_ADAPTER = """# No adapter

This run fine-tuned every weight (`train.lora.rank: 0`); its model is `models/sft`. With `train.lora.rank` > 0
this folder holds the LoRA adapter in PEFT's layout (`adapter_config.json`, `adapter_model.safetensors`).
"""


def finetune(cfg: SftConfig, during: DuringTrainConfig, base: str, packed: str, out: str | None, live_dir: str,
             ckpt_dir: str | None = None, adapter_out: str | None = None, backend: str = "auto",
             trust_remote_code: bool = False) -> dict:
    """SFT of the model in `base` on `packed`/{train,dev}, saved in `out` (None: a rank other than 0, which saves
    nothing), the LoRA adapter in `adapter_out`. A rerun after a crash resumes from ckpt_dir. backend: base.backend
    (pipeline/backend.py). Returns the training summary."""
    tok = load_tokenizer(base)
    compute = setup_compute(cfg.device, cfg.dtype)
    train_rows, dev = load_packed(f"{packed}/train"), load_packed(f"{packed}/dev")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if compute.device.type == "cuda" \
        else compute.device
    print0(f"sft: {describe(base, backend)}")
    planner_of_model, shape = planner(base, backend, trust_remote_code)
    # before anything heavy: a run that cannot fit stops in one line naming what would
    cfg, plan = plan_and_check(shape, cfg, train_rows["ids"].shape[1], compute, "sft", planner_of_model)
    model = load_model(base, backend, trust_remote_code=trust_remote_code)
    for split, rows in (("train", train_rows), ("dev", dev)):
        check_rows(model, f"{packed}/{split}", rows)  # a model that cannot be packed: one conversation per row
    if cfg.lora.rank:  # QLoRA: the base quantized on the GPU, one projection at a time
        add_adapters(model, cfg.lora, cfg.seed, device)
    torch.manual_seed(cfg.seed + int(os.environ.get("RANK", "0")))  # dropout and NEFTune: each rank its own draws
    # a small generation evaluation on dev prompts at every eval point; sample answers go next to the curves
    evaluator = make_train_evaluator(tok, dev, during, compute, live_dir if out is not None else None)
    summary = train(cfg, model, compute, train_rows, dev, live_dir, "sft", evaluator, ckpt_dir=ckpt_dir, plan=plan)
    print0(f"sft: {summary}")
    sharded = (cfg.parallel == "fsdp" and world > 1) or cfg.offload == "optimizer"
    weights = trained_weights(model) if cfg.lora.rank or sharded else None  # FSDP: gathered to rank 0
    if out is None:
        return summary
    if cfg.lora.rank:
        adapters = weights  # what a LoRA run trains: its adapters, nothing else
        # onto the base as it is on disk, in fp32 (never onto dequantized NF4 weights)
        trained = merge_into(load_model(base, backend, trust_remote_code=trust_remote_code), adapters, cfg.lora)
    elif sharded:
        trained = load_model(base, backend, trust_remote_code=trust_remote_code)
        trained.load_state_dict(weights)
    else:
        trained = model.cpu()
    save_model(trained, tok, out, like=base, **save_options(cfg))  # the base's config, dtype, shards
    if adapter_out is not None:
        if cfg.lora.rank:
            save_adapter(trained, adapters, cfg.lora, adapter_out, base)
        else:
            Path(adapter_out).mkdir(parents=True, exist_ok=True)
            (Path(adapter_out) / "README.md").write_text(NO_ADAPTER)
    clear_checkpoint(ckpt_dir, cfg)
    return summary
