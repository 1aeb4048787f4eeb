"""Stage pack: rendered train/dev parquet -> packed rows (ids, labels, pos, doc .npy) and the packing report."""
import sys

from pipeline.common import atomic_dir, load_params, write_json
from pipeline.pack import PackConfig, pack, read_rendered, save_packed


def main(rendered: str, out: str, report: str) -> None:
    cfg = load_params("pack", PackConfig)
    reports = {}
    with atomic_dir(out) as tmp:
        for split in ("train", "dev"):
            ids, labels, _ = read_rendered(f"{rendered}/{split}.parquet")
            arrays, reports[split] = pack(ids, labels, cfg)
            save_packed(arrays, f"{tmp}/{split}")
            print(f"pack {split}: {reports[split]}")
    write_json(report, reports)


if __name__ == "__main__":
    main(*sys.argv[1:])
