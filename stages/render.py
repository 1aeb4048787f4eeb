"""Stage render: conversations (a file or a folder of sources: JSONL, JSON, parquet) ->
data/rendered/<split>.parquet (input_ids, labels, source, source_row) and the masking report (DVC metrics)."""
import sys

from pipeline.chat import RenderConfig, load_tokenizer, render_split
from pipeline.common import atomic_dir, load_params, write_json


def main(tokenizer: str, train: str, dev: str, heldout: str, out: str, report: str) -> None:
    cfg, tok = load_params("render", RenderConfig), load_tokenizer(tokenizer)
    reports = {}
    with atomic_dir(out) as tmp:
        for split, path in (("train", train), ("dev", dev), ("heldout", heldout)):
            r = reports[split] = render_split(path, tok, cfg, f"{tmp}/{split}.parquet", progress=f"render {split}")
            print(f"render {split}: read {r['rows_read']}, kept {r['rows_kept']}, dropped {r['dropped']}, "
                  f"trained fraction {r['trained_fraction']:.3f}, "
                  f"assistant end token trained {r['assistant_end_trained_fraction']:.3f}")
    write_json(report, reports)


if __name__ == "__main__":
    main(*sys.argv[1:])
