"""Stage pack: rendered train/dev parquet -> packed rows (ids, labels, pos, doc .npy), the packing report (DVC
metrics, per source) and the length histograms (DVC plots). Train sources are weighted and shuffled by pack.seed."""
import csv
import sys
from pathlib import Path

import numpy as np

from pipeline.common import atomic_dir, load_params, write_json
from pipeline.pack import PackConfig, length_histogram, pack_rendered, read_index, weighted_order


def main(rendered: str, out: str, report: str, histogram: str) -> None:
    cfg = load_params("pack", PackConfig)
    reports, hist = {}, {}
    with atomic_dir(out) as tmp:
        for split in ("train", "dev"):
            path = f"{rendered}/{split}.parquet"
            index = read_index(path, cfg)  # lengths, sources, rows: no tokens held
            order = (weighted_order(index.sources, cfg.weights, cfg.seed) if split == "train"
                     else np.arange(len(index.lengths)))
            reports[split] = pack_rendered(path, index, order, cfg, f"{tmp}/{split}")
            hist[split] = length_histogram(index.lengths[order], cfg.block_size)
            print(f"pack {split}: " + ", ".join(f"{k}={v}" for k, v in reports[split].items() if k != "sources"))
    write_json(report, reports)
    Path(histogram).mkdir(parents=True, exist_ok=True)
    for split, rows in hist.items():  # one DVC plot per split: conversations per length bin
        with open(Path(histogram) / f"{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["length", "conversations"])
            w.writeheader()
            w.writerows(rows)


if __name__ == "__main__":
    main(*sys.argv[1:])
