"""The pretraining corpus: a JSONL file of {"text": "..."} documents -> their texts (the tokenizer and base stages;
conversations are pipeline/data.py's)."""
import json

from pipeline.common import UserError


def read_corpus(path: str) -> list[str]:
    """The pretraining corpus: a JSONL file of {"text": "..."} documents."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            try:
                texts.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{n}: not a JSON object with a \"text\" string; the corpus (data.corpus) is "
                                "JSONL, one {\"text\": ...} document a line") from None
    return texts
