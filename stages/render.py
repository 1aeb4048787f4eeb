"""Stage render: conversations (JSONL) -> data/rendered/<split>.parquet (input_ids, labels, source_row)
and the masking report."""
import sys

from pipeline.chat import RenderConfig, load_tokenizer, render_split
from pipeline.common import atomic_dir, load_params, write_json


def main(tokenizer: str, train: str, dev: str, heldout: str, out: str, report: str) -> None:
    cfg, tok = load_params("render", RenderConfig), load_tokenizer(tokenizer)
    reports = {}
    with atomic_dir(out) as tmp:
        for split, path in (("train", train), ("dev", dev), ("heldout", heldout)):
            reports[split] = render_split(path, tok, cfg, f"{tmp}/{split}.parquet")
            print(f"render {split}: {reports[split]}")
    write_json(report, reports)


if __name__ == "__main__":
    main(*sys.argv[1:])
