"""Packing: rendered conversations (parquet) -> fixed-length rows (npy), plus batches for training.

A packed row of block_size 8 holding conversations 5 (3 tokens) and 9 (4 tokens), then padding:
    ids    a a a b b b b <pad>
    labels - a a - b b b -      (- is -100; a conversation's own mask, padding never trained)
    pos    0 1 2 0 1 2 3 0      (restarts per conversation)
    doc    5 5 5 9 9 9 9 -1     (rendered row index; the attention mask compares it, -1 is padding)"""
import dataclasses
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from pipeline.chat import IGNORE_INDEX

ARRAYS = ("ids", "labels", "pos", "doc")


@dataclasses.dataclass
class PackConfig:
    block_size: int = 256  # tokens per packed row
    overlong: str = "drop"  # conversations longer than block_size: drop | truncate (keep the first block_size)

    def __post_init__(self):
        if self.block_size < 8:
            raise ValueError(f"pack.block_size={self.block_size} is too small")
        if self.overlong not in ("drop", "truncate"):
            raise ValueError(f"pack.overlong must be 'drop' or 'truncate', got {self.overlong!r}")


def write_rendered(path: str, input_ids: list[list[int]], labels: list[list[int]], source_row: list[int]) -> None:
    table = pa.table({
        "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
        "labels": pa.array(labels, type=pa.list_(pa.int32())),
        "source_row": pa.array(source_row, type=pa.int64()),
    })
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8192)


def read_rendered(path: str) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    table = pq.read_table(path)
    ids = [np.asarray(x, dtype=np.int32) for x in table.column("input_ids").to_pylist()]
    labels = [np.asarray(x, dtype=np.int32) for x in table.column("labels").to_pylist()]
    return ids, labels, table.column("source_row").to_numpy()


def best_fit_decreasing(lengths: list[int], block_size: int) -> list[list[int]]:
    """Indices grouped into rows: longest first, each into the row with the least room that fits it.
    Rows are bucketed by free space, so finding the best fit is a scan over at most block_size buckets."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(block_size + 1)]  # free space -> row numbers
    for i in order:
        n = lengths[i]
        space = next((s for s in range(n, block_size + 1) if by_space[s]), None)
        if space is None:
            rows.append([])
            r, space = len(rows) - 1, block_size
        else:
            r = by_space[space].pop()
        rows[r].append(i)
        by_space[space - n].append(r)
    return rows


def pack(ids: list[np.ndarray], labels: list[np.ndarray], cfg: PackConfig) -> tuple[dict, dict]:
    """Pack whole conversations into rows; returns the arrays (rows, block_size) and a report."""
    B = cfg.block_size
    lengths, keep, truncated = [], [], 0
    for i, x in enumerate(ids):
        if len(x) > B and cfg.overlong == "drop":
            continue
        truncated += len(x) > B
        keep.append(i)
        lengths.append(min(len(x), B))
    rows = best_fit_decreasing(lengths, B)
    n = len(rows)
    out = {"ids": np.zeros((n, B), np.int32), "labels": np.full((n, B), IGNORE_INDEX, np.int32),
           "pos": np.zeros((n, B), np.int32), "doc": np.full((n, B), -1, np.int32)}
    for r, members in enumerate(rows):
        t = 0
        for j in members:
            i, L = keep[j], lengths[j]
            out["ids"][r, t : t + L] = ids[i][:L]
            out["labels"][r, t : t + L] = labels[i][:L]
            out["pos"][r, t : t + L] = np.arange(L)
            out["doc"][r, t : t + L] = i
            t += L
    tokens_in = int(sum(len(x) for x in ids))
    packed = int(sum(lengths))
    report = {
        "conversations": len(ids), "packed": len(keep), "dropped_overlong": len(ids) - len(keep),
        "truncated": truncated, "tokens_in": tokens_in, "tokens_packed": packed,
        "tokens_dropped": tokens_in - packed, "rows": n, "block_size": B,
        "utilisation": packed / max(1, n * B),
        "trained_tokens": int((out["labels"] != IGNORE_INDEX).sum()),
    }
    return out, report


def save_packed(arrays: dict, folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(Path(folder) / f"{name}.npy", arrays[name])


def load_packed(folder: str) -> dict:
    return {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r") for name in ARRAYS}


def to_batch(arrays: dict, rows, device) -> tuple[torch.Tensor, ...]:
    """(ids, labels, pos, doc) int64 tensors for the given row numbers."""
    return tuple(torch.from_numpy(np.asarray(arrays[k][rows], dtype=np.int64)).to(device) for k in ARRAYS)


def row_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded data order of one epoch: a permutation of row numbers."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
