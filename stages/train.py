"""Stage train: base model + packed data -> fine-tuned model folder, training curves in DVCLive."""
import sys

from pipeline.common import atomic_dir, load_params
from pipeline.train import TrainConfig, finetune


def main(base: str, packed: str, out: str, live_dir: str) -> None:
    cfg = load_params("train", TrainConfig)
    with atomic_dir(out) as tmp:
        finetune(cfg, base, packed, str(tmp), live_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
