"""Stage pack: rendered train/dev parquet -> packed rows (ids, labels, pos, doc .npy), the packing report (DVC
metrics, per source) and the length histograms (DVC plots). Train sources are weighted and shuffled by pack.seed."""
import csv
import sys
from pathlib import Path

import numpy as np

from pipeline.common import atomic_dir, load_params, write_json
from pipeline.pack import PackConfig, length_histogram, pack, read_rendered, rendered_header, weighted_order


def main(rendered: str, out: str, report: str, histogram: str) -> None:
    cfg = load_params("pack", PackConfig)
    reports, hist = {}, {}
    with atomic_dir(out) as tmp:
        for split in ("train", "dev"):
            ids, labels, rows, sources = read_rendered(f"{rendered}/{split}.parquet", with_sources=True)
            if split == "train":
                order = weighted_order(sources, cfg.weights, cfg.seed)
                ids, labels, rows, sources = [ids[i] for i in order], [labels[i] for i in order], rows[order], \
                    sources[order]
            _, reports[split] = pack(ids, labels, cfg, sources=sources, rows=rows, out=f"{tmp}/{split}",
                                     header=rendered_header(f"{rendered}/{split}.parquet"))
            hist[split] = length_histogram(np.fromiter(map(len, ids), np.int64, len(ids)), cfg.block_size)
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
