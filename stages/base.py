"""Stage base: corpus + tokenizer -> pretrained base model folder (or a copy of base.init_from)."""
import sys

from pipeline.common import atomic_dir, load_params
from pipeline.model import ModelConfig
from pipeline.train import BaseConfig, make_base


def main(corpus: str, tokenizer: str, out: str, live_dir: str) -> None:
    cfg, model_cfg = load_params("base", BaseConfig), load_params("model", ModelConfig)
    with atomic_dir(out) as tmp:
        make_base(cfg, model_cfg, corpus, tokenizer, str(tmp), live_dir)


if __name__ == "__main__":
    main(*sys.argv[1:])
