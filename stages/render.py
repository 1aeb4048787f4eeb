"""Stage render: conversations (a file or a folder of sources: JSONL, JSON, parquet) ->
data/rendered/<split>.parquet (input_ids, labels, source, source_row) and the masking report (DVC metrics)."""
from pipeline.common import atomic_dir, require_inputs, run_stage, write_json
from pipeline.config import RenderConfig, load_params
from pipeline.render import render_split
from pipeline.tokenizer import load_tokenizer


def main(tokenizer: str, train: str, dev: str, heldout: str, out: str, report: str) -> None:
    cfg = load_params("render", RenderConfig)
    require_inputs(tokenizer, train, dev, heldout)
    tok = load_tokenizer(tokenizer)
    with atomic_dir(out) as tmp:
        reports = {split: render_split(path, tok, cfg, f"{tmp}/{split}.parquet", f"render {split}")
                   for split, path in (("train", train), ("dev", dev), ("heldout", heldout))}
    write_json(report, reports)


if __name__ == "__main__":
    run_stage("render", main)
