"""Tokenizers: the bundled byte-level BPE trained with the chat format's special tokens reserved, the checks that a
tokenizer speaks a known format, and tokenizer.json / tokenizer_config.json (with the format's chat template) on
disk."""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from pipeline.common import UserError
from pipeline.config import TokenizerConfig
from pipeline.model_template import own_template
from pipeline.template import (
    FORMATS,
    MARKERS,
    REQUIRED_TOKENS,
    SPECIAL_TOKENS,
    ChatFormat,
    TemplateFormat,
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


OWN = "sft_chat_format"  # tokenizer_config.json key: "template" when the folder is fine-tuned in its own template


def _tokenizer_config(folder: Path) -> dict:
    path = folder / "tokenizer_config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def end_tokens(folder: str, tok: Tokenizer) -> list[str]:
    """The strings of every token that ends an answer of the model in `folder`: its generation_config.json eos ids
    (Llama 3 declares several) and its tokenizer's eos_token, in that order."""
    path, config = Path(folder), _tokenizer_config(Path(folder))
    ends = []
    for name in ("generation_config.json", "config.json"):
        if (path / name).is_file():
            eos = json.loads((path / name).read_text()).get("eos_token_id")
            ends += [tok.id_to_token(i) for i in (eos if isinstance(eos, list) else [eos]) if isinstance(i, int)]
    eos = config.get("eos_token")
    ends.append(eos if isinstance(eos, str) else (eos or {}).get("content"))
    return [e for e in dict.fromkeys(ends) if e and tok.token_to_id(e) is not None]


def attach_template(tok: Tokenizer, folder: str, ends: list[str] | None = None, thinking: str | None = None
                    ) -> Tokenizer:
    """The model's own chat template (its tokenizer_config.json) attached to its tokenizer: chat_format is then
    `template`, and every renderer of the pipeline renders with it (and with the thinking policy recorded there, or
    `thinking`)."""
    config = _tokenizer_config(Path(folder))
    ends = ends if ends is not None else config.get("sft_end_tokens") or end_tokens(folder, tok)
    if not ends:
        raise UserError(f"{folder}: no end-of-turn token (eos_token_id in generation_config.json or config.json, "
                        "eos_token in tokenizer_config.json); chat_format template needs one to stop answers")
    tok.own_template = own_template(config, ends, f"{folder}/tokenizer_config.json",
                                    thinking or config.get("sft_thinking", "context"))
    return tok


def load_tokenizer(path: str) -> Tokenizer:
    """tokenizer.json (file or model folder), with marker-like text inside content kept as plain text; a folder
    fine-tuned in its own template (tokenizer_config.json says so) comes with that template attached."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise UserError(f"{file}: no such file; a model folder needs its tokenizer.json (run the tokenizer stage, or "
                        "copy the model's tokenizer.json next to its weights)")
    tok = Tokenizer.from_file(str(file))
    if _tokenizer_config(file.parent).get(OWN) == "template":
        attach_template(tok, str(file.parent))
    else:
        check_tokenizer(tok)
    tok.encode_special_tokens = True  # content is encoded alone: "<|assistant|>" typed by a user stays text
    return tok


def save_tokenizer(tok: Tokenizer, folder: str) -> None:
    """tokenizer.json plus tokenizer_config.json carrying the chat template of its format, for transformers (a
    model's own template, unchanged, with the special-token strings it names)."""
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
    if isinstance(lay.fmt, TemplateFormat):
        config |= dict(lay.fmt.own.variables) | {OWN: "template", "sft_end_tokens": list(lay.fmt.own.ends),
                                                 "sft_thinking": lay.fmt.own.thinking}
    (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def ours(path: Path, template) -> bool:
    """The template is the one this pipeline writes for a format the tokenizer speaks (a folder it exported)."""
    try:
        return template == chat_template(chat_format(Tokenizer.from_file(str(path))))
    except UserError:
        return False


def make_tokenizer(cfg: TokenizerConfig, corpus_texts, model_folder: str | None = None, init_from: str = ""
                   ) -> Tokenizer:
    """The tokenizer stage: the tokenizer of an imported model (model_folder, from base.init_from), or else a
    byte-level BPE trained on the corpus texts in cfg.chat_format (markers for auto). An imported model is
    fine-tuned in its own chat template (`template`; what `auto` takes when the model ships one), or in markers or
    chatml when its tokenizer has their special tokens."""
    if model_folder is None:
        if cfg.chat_format == "template":
            raise UserError("tokenizer.chat_format=template needs a model of your own (base.init_from) that ships "
                            "a chat template; the bundled tokenizer speaks markers or chatml")
        fmt = FORMATS["markers" if cfg.chat_format == "auto" else cfg.chat_format]
        texts = list(corpus_texts)
        tok = train_tokenizer(texts, cfg.vocab_size, fmt)
        print(f"tokenizer: trained on {len(texts)} documents, vocabulary {tok.get_vocab_size()}, chat format "
              f"{fmt.name}")
        return tok
    path = Path(model_folder) / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"base.init_from={init_from}: no tokenizer.json in {model_folder}")
    shipped = _tokenizer_config(Path(model_folder)).get("chat_template")
    if cfg.chat_format == "template" or (cfg.chat_format == "auto" and shipped and not ours(path, shipped)):
        tok = attach_template(Tokenizer.from_file(str(path)), model_folder, thinking=cfg.thinking)
        tok.encode_special_tokens = True
        print(f"tokenizer: taken from base.init_from={init_from} (chat format template: the model's own, ends "
              f"{', '.join(tok.own_template.ends)})")
        return tok
    try:
        tok = load_tokenizer(model_folder)
    except UserError as e:
        raise UserError(f"base.init_from={init_from}: {e}. Supported chat formats: template (the model's own, when "
                        f"it ships one), {', '.join(FORMATS)}") from None
    own = chat_format(tok).name
    if cfg.chat_format not in ("auto", own):
        raise UserError(f"tokenizer.chat_format={cfg.chat_format}, but the tokenizer of base.init_from={init_from} "
                        f"speaks {own}; set tokenizer.chat_format to {own}, template or auto (a model is fine-tuned "
                        "in the format its tokenizer has special tokens for)")
    print(f"tokenizer: taken from base.init_from={init_from} (chat format {own})")
    return tok
