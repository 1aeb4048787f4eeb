"""Stage train: base model + packed data -> fine-tuned model folder, training curves in DVCLive.
The resume checkpoint folder (last argument) is no DVC out: a rerun after a crash continues from it.
train.nproc > 1 reruns this script under torchrun; started by torchrun (RANK set), it is one rank of the run."""
import sys

from pipeline.common import load_params
from pipeline.train import TrainConfig, finetune, launch, output_dir


def main(base: str, packed: str, out: str, live_dir: str, ckpt_dir: str) -> None:
    cfg = load_params("train", TrainConfig)
    if launch(cfg.nproc, "stages.train", sys.argv[1:]):
        return
    with output_dir(out) as tmp:  # rank 0: a sibling temp dir that replaces `out` on success
        finetune(cfg, base, packed, tmp, live_dir, ckpt_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
