"""Stage tokenizer: corpus -> byte-level BPE with the chat markers reserved (or the base.init_from model's)."""
import json
import sys

from pipeline.chat import TokenizerConfig, load_tokenizer, save_tokenizer, train_tokenizer
from pipeline.common import atomic_dir, load_params
from pipeline.sources import IMPORT_DIR, resolve_model
from pipeline.train import BaseConfig


def main(corpus: str, out: str) -> None:
    cfg, base = load_params("tokenizer", TokenizerConfig), load_params("base", BaseConfig)
    if base.init_from:
        folder = resolve_model(base.init_from, IMPORT_DIR)
        try:
            tok = load_tokenizer(folder)
        except ValueError as e:
            raise ValueError(f"base.init_from={base.init_from}: {e}. This pipeline's chat format needs its markers "
                             "as single special tokens in the base model's tokenizer (other formats such as ChatML "
                             "are not supported yet)") from None
        print(f"tokenizer: taken from base.init_from={base.init_from}")
    else:
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        tok = train_tokenizer(texts, cfg.vocab_size)
        print(f"tokenizer: trained on {len(texts)} documents, vocabulary {tok.get_vocab_size()}")
    with atomic_dir(out) as tmp:
        save_tokenizer(tok, str(tmp))


if __name__ == "__main__":
    main(*sys.argv[1:])
