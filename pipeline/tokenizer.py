"""Tokenizers: the bundled byte-level BPE trained with the chat format's special tokens reserved, the checks that a
tokenizer speaks a known format, and tokenizer.json / tokenizer_config.json (with the format's chat template) on
disk."""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.common import UserError
from pipeline.config import TokenizerConfig
from pipeline.template import (
    FORMATS,
    MARKERS,
    REQUIRED_TOKENS,
    SPECIAL_TOKENS,
    ChatFormat,
    chat_format,
    chat_template,
    layout,
)


def train_tokenizer(texts, vocab_size: int, fmt: ChatFormat = MARKERS) -> Tokenizer:
    """Byte-level BPE with the format's special tokens reserved as single ids; digits split one by one.
    Each text segment gets a prefix space, so an answer right after <|assistant|> is spelled with the same
    tokens as in the middle of a pretraining sentence ("ĠBrodren", not "B" "rod" "ren")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.ByteLevel(add_prefix_space=True), pre_tokenizers.Digits(individual_digits=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(fmt.specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok: Tokenizer) -> ChatFormat:
    """The tokenizer speaks a known chat format; with markers, they are the special ids 0..4 (and <|tool|> is 5
    when present). Returns the format."""
    fmt = chat_format(tok)
    if fmt.name != "markers":
        return fmt
    for i, t in enumerate(SPECIAL_TOKENS):
        got = tok.token_to_id(t)
        if got is None and t in REQUIRED_TOKENS:
            raise UserError(f"the tokenizer lacks the chat marker {t} as a single token; retrain it (the tokenizer "
                            "stage)")
        if got is not None and got != i:
            raise UserError(f"the tokenizer must reserve {t} as id {i}, found {got}; retrain it (the tokenizer stage)")
    return fmt


def special_ids(tok: Tokenizer) -> dict[str, int]:
    """pad and eos (= end: the end of an assistant turn) ids of the tokenizer's chat format."""
    lay = layout(tok)
    return {"pad": lay.pad, "eos": lay.end, "end": lay.end}


def load_tokenizer(path: str) -> Tokenizer:
    """tokenizer.json (file or model folder), with marker-like text inside content kept as plain text."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{file}: no such file; a model folder needs its tokenizer.json (run the tokenizer stage, or "
                        "copy the model's tokenizer.json next to its weights)")
    tok = Tokenizer.from_file(str(file))
    check_tokenizer(tok)
    tok.encode_special_tokens = True  # content is encoded alone: "<|assistant|>" typed by a user stays text
    return tok


def save_tokenizer(tok: Tokenizer, folder: str) -> None:
    """tokenizer.json plus tokenizer_config.json carrying the chat template of its format, for transformers."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(folder) / "tokenizer.json"))
    lay = layout(tok)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template(lay.fmt),
        "eos_token": lay.fmt.end,
        "pad_token": tok.id_to_token(lay.pad),
        "bos_token": None,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
    }
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")



def make_tokenizer(cfg: TokenizerConfig, corpus_texts, model_folder: str | None = None, init_from: str = ""
                   ) -> Tokenizer:
    """The tokenizer stage: the tokenizer of an imported model (model_folder, from base.init_from), which must speak
    cfg.chat_format unless it is auto, or else a byte-level BPE trained on the corpus texts in cfg.chat_format
    (markers for auto)."""
    if model_folder is None:
        fmt = FORMATS["markers" if cfg.chat_format == "auto" else cfg.chat_format]
        texts = list(corpus_texts)
        tok = train_tokenizer(texts, cfg.vocab_size, fmt)
        print(f"tokenizer: trained on {len(texts)} documents, vocabulary {tok.get_vocab_size()}, chat format "
              f"{fmt.name}")
        return tok
    try:
        tok = load_tokenizer(model_folder)
    except UserError as e:
        raise UserError(f"base.init_from={init_from}: {e}. Supported chat formats: {', '.join(FORMATS)}, each with "
                        "its special tokens as single tokens in the base model's tokenizer") from None
    own = chat_format(tok).name
    if cfg.chat_format not in ("auto", own):
        raise UserError(f"tokenizer.chat_format={cfg.chat_format}, but the tokenizer of base.init_from={init_from} "
                        f"speaks {own}; set tokenizer.chat_format to {own} or auto (a model is fine-tuned in the "
                        "format its tokenizer has special tokens for)")
    print(f"tokenizer: taken from base.init_from={init_from} (chat format {own})")
    return tok
