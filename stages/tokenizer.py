"""Stage tokenizer: corpus -> byte-level BPE with the chat format's special tokens reserved (or the base.init_from
model's tokenizer, which must speak the format asked for)."""
import json
import sys

from pipeline.chat import FORMATS, TokenizerConfig, chat_format, load_tokenizer, save_tokenizer, train_tokenizer
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
            raise ValueError(f"base.init_from={base.init_from}: {e}. Supported chat formats: {list(FORMATS)}, each "
                             "with its special tokens as single tokens in the base model's tokenizer") from None
        own = chat_format(tok).name
        if cfg.chat_format not in ("auto", own):
            raise ValueError(f"tokenizer.chat_format={cfg.chat_format}, but the tokenizer of base.init_from="
                             f"{base.init_from} speaks {own}; set tokenizer.chat_format to {own} or auto (a model "
                             "is fine-tuned in the format its tokenizer has special tokens for)")
        print(f"tokenizer: taken from base.init_from={base.init_from} (chat format {own})")
    else:
        fmt = FORMATS["markers" if cfg.chat_format == "auto" else cfg.chat_format]
        with open(corpus, encoding="utf-8") as f:
            texts = [json.loads(line)["text"] for line in f]
        tok = train_tokenizer(texts, cfg.vocab_size, fmt)
        print(f"tokenizer: trained on {len(texts)} documents, vocabulary {tok.get_vocab_size()}, chat format "
              f"{fmt.name}")
    with atomic_dir(out) as tmp:
        save_tokenizer(tok, str(tmp))


if __name__ == "__main__":
    main(*sys.argv[1:])
