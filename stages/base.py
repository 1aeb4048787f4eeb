"""Stage base: corpus + tokenizer -> pretrained base model folder (or a copy of base.init_from).
Resumes from its checkpoint folder after a crash; base.pretrain.nproc > 1 reruns it under torchrun."""
import sys

from pipeline.common import load_params
from pipeline.model import ModelConfig
from pipeline.train import BaseConfig, launch, make_base, output_dir


def main(corpus: str, tokenizer: str, out: str, live_dir: str, ckpt_dir: str) -> None:
    cfg, model_cfg = load_params("base", BaseConfig), load_params("model", ModelConfig)
    if not cfg.init_from and launch(cfg.pretrain.nproc, "stages.base", sys.argv[1:]):
        return
    with output_dir(out) as tmp:
        make_base(cfg, model_cfg, corpus, tokenizer, tmp, live_dir, ckpt_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
