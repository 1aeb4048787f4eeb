"""Stage pack: rendered train/dev parquet -> packed rows (ids, labels, pos, doc .npy), the packing report (DVC
metrics, per source) and the length histograms (DVC plots). Train sources are weighted and shuffled by pack.seed.
A base model whose layers cannot keep packed conversations apart (pipeline/families.py) gets one per row."""
from pipeline.common import atomic_dir, print0, require_inputs, run_stage, write_json
from pipeline.config import PackConfig, load_params
from pipeline.families import packing, read_config
from pipeline.pack import pack_split, write_histogram


def main(rendered: str, base: str, out: str, report: str, histogram: str) -> None:
    cfg = load_params("pack", PackConfig)
    require_inputs(rendered, base)
    packable, why = packing(read_config(base))
    if not packable:
        print0(f"pack: {why}")
    reports = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "dev"):  # only train is weighted and shuffled
            reports[split], lengths = pack_split(f"{rendered}/{split}.parquet", cfg, f"{tmp}/{split}",
                                                 split == "train", alone=not packable)
            write_histogram(f"{histogram}/{split}.csv", lengths, cfg.block_size)
    write_json(report, reports | ({} if packable else {"one_per_row_why": why}))


if __name__ == "__main__":
    run_stage("pack", main)
