"""Packing: rendered conversations (parquet) -> fixed-length rows (npy), plus batches for training.

A packed row of block_size 8 holding conversations 5 (3 tokens) and 9 (4 tokens), then padding:
    ids    a a a b b b b <pad>
    labels - a a - b b b -      (- is -100; a conversation's own mask, padding never trained)
    pos    0 1 2 0 1 2 3 0      (restarts per conversation)
    doc    5 5 5 9 9 9 9 -1     (rendered row index; the attention mask compares it, -1 is padding)"""
import contextlib
import dataclasses
import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.chat import IGNORE_INDEX

ARRAYS = ("ids", "labels", "pos", "doc")
PADDING = {"ids": 0, "labels": IGNORE_INDEX, "pos": 0, "doc": -1}  # what a packed row holds after its conversations
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
            if isinstance(w, str):  # `dvc exp run -S +pack.weights.a=3e-5` writes 3e-05, which YAML reads as a string
                with contextlib.suppress(ValueError):
                    w = self.weights[name] = float(w)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                raise ValueError(f"pack.weights.{name} must be a number >= 0, got {w!r}")


def write_rendered(path: str, input_ids: list[list[int]], labels: list[list[int]], source_row: list[int],
                   source: list[str] | None = None, row_group_size: int = 8192) -> None:
    table = pa.table({
        "input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
        "labels": pa.array(labels, type=pa.list_(pa.int32())),
        "source": pa.array(source or ["data"] * len(input_ids), type=pa.string()),
        "source_row": pa.array(source_row, type=pa.int64()),
    }, schema=RENDERED_SCHEMA)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


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


def best_fit_decreasing(lengths, block_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Each conversation's (row, offset) and the number of rows: longest first (ties in index order), each into the
    row with the least room that fits it, after the conversations already there. Rows are bucketed by free space,
    and a bit set of the nonempty buckets finds the best fit in a few integer operations. Only lengths are needed."""
    lengths = np.asarray(lengths, np.int64)
    row, offset = np.zeros(len(lengths), np.int64), np.zeros(len(lengths), np.int64)
    n_rows = 0
    by_space: list[list[int]] = [[] for _ in range(block_size + 1)]  # free space -> row numbers
    nonempty = 0  # bit s set: some row has exactly s tokens free
    order = np.argsort(-lengths, kind="stable")
    for first in range(0, len(order), 1 << 16):  # in slices, so that no list of every index is held
        part = order[first : first + (1 << 16)]
        rows, offsets = [], []
        for n in lengths[part].tolist():
            room = nonempty >> n  # bit j: a row with n + j tokens free
            if not room:
                r, space = n_rows, block_size
                n_rows += 1
            else:
                space = n + (room & -room).bit_length() - 1  # the lowest set bit: the least room that fits
                r = by_space[space].pop()
                if not by_space[space]:
                    nonempty ^= 1 << space
            rows.append(r)
            offsets.append(block_size - space)
            by_space[space - n].append(r)
            nonempty |= 1 << (space - n)
        row[part], offset[part] = rows, offsets
    return row, offset, n_rows


def rendered_header(path: str) -> tuple[int, ...]:
    """The assistant header ids recorded by the render stage in the parquet's metadata (the chat format's)."""
    meta = pq.read_schema(path).metadata or {}
    return tuple(json.loads(meta[b"assistant_header"])) if b"assistant_header" in meta else ASSISTANT_HEADER


def overlong_error(where: str, n: int, block_size: int) -> ValueError:
    return ValueError(f"{where}: {n} tokens > pack.block_size={block_size} (pack.overlong=fail)")


def fit(x: np.ndarray, block_size: int, overlong: str, where: str = "", header=ASSISTANT_HEADER) -> int:
    """How many tokens of a rendered conversation go into the pack (0: dropped). Truncation cuts only the tail of
    the last assistant turn, keeping its header (`header` ids) and at least one of its tokens; otherwise the row
    is dropped."""
    if len(x) <= block_size:
        return len(x)
    if overlong == "fail":
        raise overlong_error(where, len(x), block_size)
    if overlong == "truncate":
        h = len(header)
        at = np.flatnonzero(np.all([x[j : len(x) - h + 1 + j] == header[j] for j in range(h)], axis=0))
        if len(at) and at[-1] + h < block_size:
            return block_size
    return 0


def _scatter(write, ids: np.ndarray, labels: np.ndarray, starts: np.ndarray, k: np.ndarray, fits: np.ndarray,
             row: np.ndarray, offset: np.ndarray, block_size: int, first_row: int = 0) -> int:
    """Places conversations k (tokens ids[starts[j]:starts[j] + fits[k[j]]], all conversations end to end) at
    their (row - first_row, offset): write(name, flat positions, values) for each array. Returns their trained
    tokens."""
    n = fits[k]
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # position inside its conversation
    src = np.repeat(starts, n) + within
    dst = np.repeat((row[k] - first_row) * block_size + offset[k], n) + within
    lab = labels[src]
    for name, values in (("ids", ids[src]), ("labels", lab), ("pos", within), ("doc", np.repeat(k, n))):
        write(name, dst, values)
    return int((lab != IGNORE_INDEX).sum())


def _into(arrays: dict):
    """The `write` of _scatter for arrays in memory."""
    def write(name: str, dst: np.ndarray, values: np.ndarray) -> None:
        arrays[name].reshape(-1)[dst] = values
    return write


def _report(lengths: np.ndarray, fits: np.ndarray, sources: np.ndarray, n: int, B: int, trained: int) -> dict:
    tokens_in, packed = int(lengths.sum()), int(fits.sum())
    report = {
        "conversations": len(lengths), "packed": int((fits > 0).sum()), "dropped_overlong": int((fits == 0).sum()),
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
    return report


def pack(ids: list[np.ndarray], labels: list[np.ndarray], cfg: PackConfig, sources=None, rows=None,
         out: str | None = None, header=ASSISTANT_HEADER) -> tuple[dict, dict]:
    """Pack whole conversations held in memory into rows; returns the arrays (rows, block_size) and a report (per
    source when `sources` names each conversation's source). With `out`, the arrays are also saved there as .npy
    and returned memory-mapped. `pack_rendered` does the same from a rendered parquet, without holding its tokens."""
    B = cfg.block_size
    n_conv = len(ids)
    sources = np.asarray(sources if sources is not None else ["all"] * n_conv, dtype=object)
    lengths = np.fromiter((len(x) for x in ids), np.int64, n_conv)
    fits = lengths.copy()
    for i in np.flatnonzero(lengths > B):
        where = f"conversation {i}" if rows is None else f"{sources[i]}:{int(rows[i]) + 1}"
        fits[i] = fit(ids[i], B, cfg.overlong, where, header)
    keep = np.flatnonzero(fits > 0)
    row, offset, n = np.full(n_conv, -1), np.full(n_conv, -1), 0
    if len(keep):
        row[keep], offset[keep], n = best_fit_decreasing(fits[keep], B)
    arrays = {name: np.full((n, B), PADDING[name], np.int32) for name in ARRAYS}
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = [np.concatenate(x).astype(np.int32, copy=False) if n_conv else np.zeros(0, np.int32) for x in (ids, labels)]
    trained = _scatter(_into(arrays), *flat, starts[keep], keep, fits, row, offset, B)
    if out is not None:
        save_packed(arrays, out)
        arrays = load_packed(out)
    return arrays, _report(lengths, fits, sources, n, B, trained)


def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    """A list<int32> column -> (all values end to end, offsets from 0): row i is values[offsets[i]:offsets[i+1]]."""
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    off = col.offsets.to_numpy().astype(np.int64)
    return col.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False), off - off[0]


@dataclasses.dataclass
class RenderedIndex:
    """Per conversation of a rendered parquet (file order), without its tokens."""
    lengths: np.ndarray  # tokens
    fits: np.ndarray  # tokens that go into the pack under pack.overlong (0: dropped; `fail` is checked at packing)
    sources: np.ndarray  # source names (object)
    rows: np.ndarray  # 0-based rows in their source


def read_index(path: str, cfg: PackConfig) -> RenderedIndex:
    """Lengths from the list offsets, one row group at a time; only an overlong conversation's tokens are looked
    at (truncation searches them for the last assistant header)."""
    f = pq.ParquetFile(path)
    header = rendered_header(path)
    lengths, fits = [], []
    for g in range(f.num_row_groups):
        values, off = _flat(f.read_row_group(g, columns=["input_ids"]).column("input_ids"))
        n = np.diff(off)
        m = n.copy()
        for i in np.flatnonzero(n > cfg.block_size):
            m[i] = fit(values[off[i] : off[i + 1]], cfg.block_size, "drop" if cfg.overlong == "fail" else cfg.overlong,
                       header=header)
        lengths.append(n)
        fits.append(m)
    meta = pq.ParquetFile(path, read_dictionary=["source"]).read(columns=["source", "source_row"])
    names: dict[str, int] = {}
    codes = [np.zeros(0, np.int64)]
    for chunk in meta.column("source").chunks:  # each chunk's dictionary codes -> codes into one list of names
        local = np.array([names.setdefault(s, len(names)) for s in chunk.dictionary.to_pylist()], np.int64)
        codes.append(local[chunk.indices.to_numpy(zero_copy_only=False)])
    sources = np.array(list(names), dtype=object)[np.concatenate(codes)]  # one string object per source
    return RenderedIndex(np.concatenate([np.zeros(0, np.int64)] + lengths),
                         np.concatenate([np.zeros(0, np.int64)] + fits), sources, meta.column("source_row").to_numpy())


def pack_rendered(path: str, index: RenderedIndex, order: np.ndarray, cfg: PackConfig, out: str,
                  window: int | None = None) -> dict:
    """Pack the conversations order[0], order[1], ... (rows of the rendered parquet; repeats allowed) into .npy
    arrays in `out`; returns the report. The same output as `pack` on those conversations in memory, but only
    lengths are held. The rows are planned first; the output is then made in windows of ~4 MiB per array: one
    pass over the row groups spills each conversation's tokens to its window's file (sequential appends), then
    each window is filled in memory from its spill and written out. Temporary disk: 8 bytes a packed token."""
    B = cfg.block_size
    lengths, fits, sources = index.lengths[order], index.fits[order], index.sources[order]
    if cfg.overlong == "fail" and (lengths > B).any():
        i = order[np.argmax(lengths > B)]
        raise overlong_error(f"{index.sources[i]}:{int(index.rows[i]) + 1}", int(index.lengths[i]), B)
    keep = np.flatnonzero(fits > 0)
    row, offset, n = np.full(len(order), -1), np.full(len(order), -1), 0
    if len(keep):
        row[keep], offset[keep], n = best_fit_decreasing(fits[keep], B)
    window = window or max(1, (1 << 20) // B)  # output rows per window: 4 MiB per array
    by_file = keep[np.argsort(order[keep], kind="stable")]  # the kept conversations, in file order
    file_rows = order[by_file]
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".spill") as spill:
        chunks = _spill(path, by_file, file_rows, order, fits, row // window, spill)
        files = {k: open(Path(out) / f"{k}.npy", "wb") for k in ARRAYS}
        trained = 0
        try:
            for f in files.values():
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
                                                         "fortran_order": False, "shape": (n, B)})
            for w, first in enumerate(tqdm(range(0, n, window), desc="pack", unit=" windows", disable=None)):
                block = {k: np.full((min(n, first + window) - first, B), PADDING[k], np.int32) for k in ARRAYS}
                buf, pos = np.fromfile(Path(spill) / str(w), np.int32), 0
                for k in chunks[w]:  # a chunk: conversations k's ids end to end, then their labels
                    m = int(fits[k].sum())
                    trained += _scatter(_into(block), buf[pos : pos + m], buf[pos + m : pos + 2 * m],
                                        np.cumsum(fits[k]) - fits[k], k, fits, row, offset, B, first)
                    pos += 2 * m
                for k, f in files.items():
                    block[k].tofile(f)
        finally:
            for f in files.values():
                f.close()
    return _report(lengths, fits, sources, n, B, trained)


def _spill(path: str, by_file: np.ndarray, file_rows: np.ndarray, order: np.ndarray, fits: np.ndarray,
           windows: np.ndarray, spill: str) -> list[list[np.ndarray]]:
    """One pass over the file, 8k conversations at a time: the tokens of each kept conversation are appended to
    its window's file, as chunks (ids then labels of some conversations). Returns per window the conversations of
    each chunk. Files are opened per chunk, so any number of windows works within the open-file limit."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(int(windows.max(initial=-1)) + 1)]
    f, first, groups = pq.ParquetFile(path), 0, []
    for g in range(f.num_row_groups):  # consecutive row groups of at least 8k conversations
        if not groups or sum(f.metadata.row_group(i).num_rows for i in groups[-1]) >= 1 << 13:
            groups.append([])
        groups[-1].append(g)
    for gs in groups:
        t = f.read_row_groups(gs, columns=["input_ids", "labels"])
        last = first + t.num_rows
        a, b = np.searchsorted(file_rows, [first, last])
        k = by_file[a:b][np.argsort(windows[by_file[a:b]], kind="stable")]  # grouped by window
        if len(k):
            (ids, off), (labels, _) = _flat(t.column("input_ids")), _flat(t.column("labels"))
            n = fits[k]
            src = np.repeat(off[order[k] - first], n) + np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)
            ids, labels, ends = ids[src], labels[src], np.cumsum(n)
            w, at = np.unique(windows[k], return_index=True)
            for j, (wj, c) in enumerate(zip(w.tolist(), at.tolist())):
                d = at[j + 1] if j + 1 < len(at) else len(k)
                lo, hi = ends[c] - n[c], ends[d - 1]
                with open(Path(spill) / str(wj), "ab") as out:
                    ids[lo:hi].tofile(out)
                    labels[lo:hi].tofile(out)
                chunks[wj].append(k[c:d])
        first = last
    return chunks


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
