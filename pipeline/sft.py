"""The train stage's work (SFT): the base model folder fine-tuned on packed conversations, with a dev loss and a
small generation check on dev prompts at every evaluation, saved as a model folder."""
import torch

from pipeline.common import print0, setup_compute
from pipeline.config import DuringTrainConfig, TrainConfig
from pipeline.evaluate import make_train_evaluator
from pipeline.hf import load_model, save_model, save_options
from pipeline.pack import load_packed
from pipeline.tokenizer import load_tokenizer
from pipeline.train import clear_checkpoint, train


def finetune(cfg: TrainConfig, during: DuringTrainConfig, base: str, packed: str, out: str | None, live_dir: str,
             ckpt_dir: str | None = None) -> dict:
    """SFT of the model in `base` on `packed`/{train,dev}, saved in `out` (None: a rank other than 0, which saves
    nothing). A rerun after a crash resumes from ckpt_dir. Returns the training summary."""
    tok = load_tokenizer(base)
    model = load_model(base)
    compute = setup_compute(cfg.device, cfg.dtype)
    torch.manual_seed(cfg.seed)
    dev = load_packed(f"{packed}/dev")
    # a small generation evaluation on dev prompts at every eval point; sample answers go next to the curves
    evaluator = make_train_evaluator(tok, dev, during, compute, live_dir if out is not None else None)
    summary = train(cfg, model, compute, load_packed(f"{packed}/train"), dev, live_dir, "sft", evaluator,
                    ckpt_dir=ckpt_dir)
    print0(f"sft: {summary}")
    if out is not None:
        save_model(model.cpu(), tok, out, like=base, **save_options(cfg))  # the base's config, dtype, shards
        clear_checkpoint(ckpt_dir, cfg)
    return summary
