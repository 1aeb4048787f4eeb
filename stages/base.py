"""Stage base: corpus + tokenizer -> pretrained base model folder (or a copy of base.init_from).
Resumes from its checkpoint folder after a crash; base.pretrain.nproc > 1 reruns it under torchrun."""
import sys

from pipeline.base import make_base
from pipeline.common import require_inputs, run_stage
from pipeline.config import BaseConfig, ModelConfig, load_params
from pipeline.distributed import launch, output_dir
from pipeline.gpus import claim_gpus


def main(corpus: str, tokenizer: str, out: str, live_dir: str, ckpt_dir: str) -> None:
    cfg, model_cfg = load_params("base", BaseConfig), load_params("model", ModelConfig)
    require_inputs(corpus, tokenizer)
    claim_gpus("base", cfg.pretrain.device, 1 if cfg.init_from else cfg.pretrain.nproc)  # before CUDA starts
    if not cfg.init_from and launch(cfg.pretrain.nproc, "stages.base", sys.argv[1:]):
        return
    with output_dir(out) as tmp:  # rank 0: a sibling temp dir that replaces `out` on success
        make_base(cfg, model_cfg, corpus, tokenizer, tmp, live_dir, ckpt_dir)


if __name__ == "__main__":
    run_stage("base", main)
