"""Stage tokenizer: corpus -> byte-level BPE with the chat format's special tokens reserved (or the base.init_from
model's tokenizer, which must speak the format asked for)."""
from pipeline.common import atomic_dir, require_inputs, run_stage
from pipeline.config import BaseConfig, TokenizerConfig, load_params
from pipeline.corpus import read_corpus
from pipeline.sources import IMPORT_DIR, resolve_model
from pipeline.tokenizer import make_tokenizer, save_tokenizer


def main(corpus: str, out: str) -> None:
    cfg, base = load_params("tokenizer", TokenizerConfig), load_params("base", BaseConfig)
    if base.init_from:
        tok = make_tokenizer(cfg, [], resolve_model(base.init_from, IMPORT_DIR), base.init_from)
    else:
        require_inputs(corpus)
        tok = make_tokenizer(cfg, read_corpus(corpus))
    with atomic_dir(out) as tmp:
        save_tokenizer(tok, str(tmp))


if __name__ == "__main__":
    run_stage("tokenizer", main)
