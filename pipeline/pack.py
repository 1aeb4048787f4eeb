"""Packing: rendered conversations (parquet) -> fixed-length rows (npy), plus batches for training.

A packed row of block_size 8 holding conversations 5 (3 tokens) and 9 (4 tokens), then padding:
    ids    a a a b b b b <pad>
    labels - a a - b b b -      (- is -100; a conversation's own mask, padding never trained)
    pos    0 1 2 0 1 2 3 0      (restarts per conversation)
    doc    5 5 5 9 9 9 9 -1     (rendered row index; the attention mask compares it, -1 is padding)"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.chat import IGNORE_INDEX

ARRAYS = ("ids", "labels", "pos", "doc")
ASSISTANT_HEADER = (2,)  # <|assistant|> (markers pinned to ids 0..4); a rendered parquet records its own header
RENDERED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                             ("source", pa.string()), ("source_row", pa.int64())])


@dataclasses.dataclass
class PackConfig:
    block_size: int = 256  # tokens per packed row
    overlong: str = "drop"  # longer than block_size: drop | truncate (the tail of the last assistant turn) | fail
    seed: int = 0  # the weighted, shuffled order of the train conversations
    weights: dict = dataclasses.field(default_factory=dict)  # train source -> weight (repeat/subsample); absent: 1

    def __post_init__(self):
        if self.block_size < 8:
            raise ValueError(f"pack.block_size={self.block_size} is too small")
        if self.overlong not in ("drop", "truncate", "fail"):
            raise ValueError(f"pack.overlong must be 'drop', 'truncate' or 'fail', got {self.overlong!r}")
        if not isinstance(self.weights, dict):
            raise ValueError(f"pack.weights must be a mapping source -> weight, got {self.weights!r}")
        for name, w in self.weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
                raise ValueError(f"pack.weights.{name} must be a number >= 0, got {w!r}")


def write_rendered(path: str, input_ids: list[list[int]], labels: list[list[int]], source_row: list[int],
                   source: list[str] | None = None) -> None:
    table = pa.table({
        "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
        "labels": pa.array(labels, type=pa.list_(pa.int32())),
        "source": pa.array(source or ["data"] * len(input_ids), type=pa.string()),
        "source_row": pa.array(source_row, type=pa.int64()),
    }, schema=RENDERED_SCHEMA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=8192)


def read_rendered(path: str, with_sources: bool = False):
    """(ids, labels, source_row) of a rendered parquet, plus the source names with with_sources=True.
    Token columns are read flat (int32 buffers, zero-copy per row group) and cut into views, not row by row."""
    table = pq.read_table(path)
    out = []
    for name in ("input_ids", "labels"):
        views = []
        for chunk in table.column(name).chunks:
            values = chunk.values.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
            offsets = chunk.offsets.to_numpy()
            views += [values[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
        out.append(views)
    rows = table.column("source_row").to_numpy()
    if with_sources:
        return out[0], out[1], rows, np.asarray(table.column("source").to_pylist(), dtype=object)
    return out[0], out[1], rows


def weighted_order(sources: np.ndarray, weights: dict, seed: int) -> np.ndarray:
    """Indices of the conversations to pack: source s with weight w gives floor(w) copies of each of its rows
    plus a seeded sample (without replacement) of round(frac(w) * n_s) rows; then one seeded shuffle of all."""
    names = list(dict.fromkeys(sources.tolist()))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise ValueError(f"pack.weights names unknown sources {unknown}; the sources are {names}")
    rng = np.random.default_rng(seed)
    parts = []
    for name in names:
        idx = np.flatnonzero(sources == name)
        w = float(weights.get(name, 1.0))
        whole, frac = int(w), w - int(w)
        parts += [idx] * whole
        parts.append(np.sort(rng.choice(idx, int(round(frac * len(idx))), replace=False)))
    order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return order[rng.permutation(len(order))]


def best_fit_decreasing(lengths: list[int], block_size: int) -> list[list[int]]:
    """Indices grouped into rows: longest first, each into the row with the least room that fits it.
    Rows are bucketed by free space, so finding the best fit is a scan over at most block_size buckets."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    by_space: list[list[int]] = [[] for _ in range(block_size + 1)]  # free space -> row numbers
    nonempty = np.zeros(block_size + 2, bool)  # nonempty[s]: some row has exactly s tokens free
    for i in order:
        n = lengths[i]
        hit = np.flatnonzero(nonempty[n:block_size + 1])
        if not len(hit):
            rows.append([])
            r, space = len(rows) - 1, block_size
        else:
            space = n + int(hit[0])
            r = by_space[space].pop()
            nonempty[space] = bool(by_space[space])
        rows[r].append(i)
        by_space[space - n].append(r)
        nonempty[space - n] = True
    return rows


def rendered_header(path: str) -> tuple[int, ...]:
    """The assistant header ids recorded by the render stage in the parquet's metadata (the chat format's)."""
    meta = pq.read_schema(path).metadata or {}
    return tuple(json.loads(meta[b"assistant_header"])) if b"assistant_header" in meta else ASSISTANT_HEADER


def fit(x: np.ndarray, block_size: int, overlong: str, where: str = "", header=ASSISTANT_HEADER) -> int:
    """How many tokens of a rendered conversation go into the pack (0: dropped). Truncation cuts only the tail of
    the last assistant turn, keeping its header (`header` ids) and at least one of its tokens; otherwise the row
    is dropped."""
    if len(x) <= block_size:
        return len(x)
    if overlong == "fail":
        raise ValueError(f"{where}: {len(x)} tokens > pack.block_size={block_size} (pack.overlong=fail)")
    if overlong == "truncate":
        h = len(header)
        at = np.flatnonzero(np.all([x[j : len(x) - h + 1 + j] == header[j] for j in range(h)], axis=0))
        if len(at) and at[-1] + h < block_size:
            return block_size
    return 0


def pack(ids: list[np.ndarray], labels: list[np.ndarray], cfg: PackConfig, sources=None, rows=None,
         out: str | None = None, header=ASSISTANT_HEADER) -> tuple[dict, dict]:
    """Pack whole conversations into rows; returns the arrays (rows, block_size) and a report (per source when
    `sources` names each conversation's source). With `out`, the arrays are written there as .npy block by block
    and returned memory-mapped."""
    B = cfg.block_size
    n_conv = len(ids)
    sources = np.asarray(sources if sources is not None else ["all"] * n_conv, dtype=object)
    lengths = np.fromiter((len(x) for x in ids), np.int64, n_conv)
    fits = lengths.copy()
    for i in np.flatnonzero(lengths > B):
        where = f"conversation {i}" if rows is None else f"{sources[i]}:{int(rows[i]) + 1}"
        fits[i] = fit(ids[i], B, cfg.overlong, where, header)
    keep = np.flatnonzero(fits > 0)
    plan = best_fit_decreasing(fits[keep].tolist(), B)
    n = len(plan)
    arange = np.arange(B, dtype=np.int32)

    def fill(first: int, last: int) -> dict:
        shape = (last - first, B)
        block = {"ids": np.zeros(shape, np.int32), "labels": np.full(shape, IGNORE_INDEX, np.int32),
                 "pos": np.zeros(shape, np.int32), "doc": np.full(shape, -1, np.int32)}
        for r in range(first, last):
            t = 0
            for j in plan[r]:
                i = keep[j]
                L = int(fits[i])
                block["ids"][r - first, t : t + L] = ids[i][:L]
                block["labels"][r - first, t : t + L] = labels[i][:L]
                block["pos"][r - first, t : t + L] = arange[:L]
                block["doc"][r - first, t : t + L] = i
                t += L
        return block

    if out is None:
        arrays = fill(0, n)
    else:  # written block by block, so memory holds one block of rows, not the whole output
        Path(out).mkdir(parents=True, exist_ok=True)
        files = {k: open(Path(out) / f"{k}.npy", "wb") for k in ARRAYS}
        try:
            for f in files.values():
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
                                                         "fortran_order": False, "shape": (n, B)})
            step = max(1, (1 << 22) // B)  # ~16 MiB per array per block
            for first in tqdm(range(0, n, step), desc="pack", unit=" blocks", disable=None, mininterval=1.0):
                block = fill(first, min(n, first + step))
                for k, f in files.items():
                    f.write(block[k].tobytes())
        finally:
            for f in files.values():
                f.close()
        arrays = load_packed(out)
    tokens_in, packed = int(lengths.sum()), int(fits.sum())
    trained = int(sum(int((labels[i][: fits[i]] != IGNORE_INDEX).sum()) for i in keep))
    report = {
        "conversations": n_conv, "packed": len(keep), "dropped_overlong": int((fits == 0).sum()),
        "truncated": int(((fits > 0) & (fits < lengths)).sum()), "tokens_in": tokens_in, "tokens_packed": packed,
        "tokens_dropped": tokens_in - packed, "rows": n, "block_size": B,
        "utilisation": packed / max(1, n * B), "padding_tokens": n * B - packed,
        "ideal_utilisation": packed / max(1, -(-packed // B) * B),  # every row full but the last
        "trained_tokens": trained,
        "sources": {},
    }
    for name in dict.fromkeys(sources.tolist()):
        sel = sources == name
        s_in, s_packed = int(lengths[sel].sum()), int(fits[sel].sum())
        report["sources"][name] = {
            "conversations": int(sel.sum()), "dropped_overlong": int((fits[sel] == 0).sum()),
            "truncated": int(((fits[sel] > 0) & (fits[sel] < lengths[sel])).sum()),
            "tokens_dropped": s_in - s_packed,
            "token_share_before": s_in / max(1, tokens_in), "token_share_after": s_packed / max(1, packed),
        }
    return arrays, report


def length_histogram(lengths: np.ndarray, block_size: int, bins: int = 32) -> list[dict]:
    """Conversation lengths in `bins` equal bins up to block_size, plus one bin for the longer ones."""
    width = max(1, -(-block_size // bins))
    edges = list(range(0, block_size + 1, width))
    counts = np.bincount(np.minimum(lengths // width, len(edges) - 1), minlength=len(edges))
    return [{"length": int(e), "conversations": int(c)} for e, c in zip(edges, counts)]


def save_packed(arrays: dict, folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(Path(folder) / f"{name}.npy", arrays[name])


def load_packed(folder: str) -> dict:
    return {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r") for name in ARRAYS}


def to_batch(arrays: dict, rows, device) -> tuple:
    """(ids, labels, pos, doc) int64 tensors for the given row numbers."""
    import torch  # here, so rendering and packing a million rows do not pay for importing torch

    return tuple(torch.from_numpy(np.asarray(arrays[k][rows], dtype=np.int64)).to(device) for k in ARRAYS)


def row_order(n_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The seeded data order of one epoch: a permutation of row numbers."""
    return np.random.default_rng([seed, epoch]).permutation(n_rows)
