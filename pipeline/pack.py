"""Packing: rendered conversations (parquet) -> fixed-length rows (npy), plus batches for training.

A packed row of block_size 8 holding conversations 5 (3 tokens) and 9 (4 tokens), then padding:
    ids    a a a b b b b <pad>
    labels - a a - b b b -      (- is -100; a conversation's own mask, padding never trained)
    pos    0 1 2 0 1 2 3 0      (restarts per conversation)
    doc    5 5 5 9 9 9 9 -1     (rendered row index; the attention mask compares it, -1 is padding)
Under pack.overlong: split a long conversation becomes several such documents (pieces), each its opening (what comes
before its first user turn: BOS, the system turn) and then whole exchanges; a later piece's doc is numbered after
every conversation's."""
import csv
import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.common import IGNORE_INDEX, UserError
from pipeline.config import PackConfig

ARRAYS = ("ids", "labels", "pos", "doc")
PADDING = {"ids": 0, "labels": IGNORE_INDEX, "pos": 0, "doc": -1}  # what a packed row holds after its conversations


def weighted_order(sources: np.ndarray, weights: dict, seed: int) -> np.ndarray:
    """Indices of the conversations to pack: source s with weight w gives floor(w) copies of each of its rows
    plus a seeded sample (without replacement) of round(frac(w) * n_s) rows; then one seeded shuffle of all."""
    names = list(dict.fromkeys(sources.tolist()))
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UserError(f"pack.weights names unknown sources {unknown}; the sources of data.train are {names} (the "
                        "stems of its files); fix the names in pack.weights")
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


def one_per_row(lengths) -> tuple[np.ndarray, np.ndarray, int]:
    """best_fit_decreasing's answer for a model whose layers cannot keep packed conversations apart
    (pipeline/families.py): each conversation alone at the start of a row of its own, the rest padding."""
    n = len(lengths)
    return np.arange(n, dtype=np.int64), np.zeros(n, np.int64), n


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


def rendered_headers(path: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The assistant and user header ids recorded by the render stage in the parquet's metadata (the format's)."""
    meta = pq.read_schema(path).metadata or {}
    if b"assistant_header" not in meta or b"user_header" not in meta:
        raise UserError(f"{path}: no header ids in its metadata (written by an older render stage); rerun the "
                        "render stage (`dvc repro -f render`)")
    return tuple(json.loads(meta[b"assistant_header"])), tuple(json.loads(meta[b"user_header"]))


def starts(x: np.ndarray, key: tuple[int, ...]) -> np.ndarray:
    """Positions where the ids `key` begin in x."""
    if not key or len(x) < len(key):
        return np.zeros(0, np.int64)
    n = len(x) - len(key) + 1
    return np.flatnonzero(np.all([x[j : n + j] == key[j] for j in range(len(key))], axis=0))


def overlong_error(where: str, n: int, block_size: int) -> UserError:
    return UserError(f"{where}: {n} tokens > pack.block_size={block_size} (pack.overlong=fail); raise pack.block_size, "
                     "or set pack.overlong to drop or truncate")


def fit(x: np.ndarray, block_size: int, overlong: str, where: str = "", header: tuple[int, ...] = (),
        user_header: tuple[int, ...] = (), labels: np.ndarray | None = None) -> int:
    """How many leading tokens of a rendered conversation go into the pack (0: dropped).
    truncate: cut only the tail of the last assistant turn, keeping its header (`header` ids) and at least one of
    its tokens. exchanges: keep the longest run of whole leading exchanges that fits, cut where a user turn
    (`user_header`) begins after the first trained answer (`labels`); when not even that exchange fits, cut its
    answer (a cut answer has no end token, so it never teaches stopping mid-sentence). Otherwise dropped."""
    if len(x) <= block_size:
        return len(x)
    if overlong == "fail":
        raise overlong_error(where, len(x), block_size)
    if overlong not in ("truncate", "exchanges"):
        return 0
    if overlong == "exchanges":
        assert labels is not None, "the exchanges policy needs the labels (where the first trained answer is)"
        trained = np.flatnonzero(labels != IGNORE_INDEX)
        if not len(trained) or trained[0] >= block_size:
            return 0
        cuts = starts(x, user_header)  # a user turn after the first trained answer: whole exchanges before it
        cuts = cuts[(cuts > trained[0]) & (cuts <= block_size)]
        return int(cuts[-1]) if len(cuts) else block_size  # else the first answer, cut
    heads = starts(x, header)
    return block_size if len(heads) and heads[-1] + len(header) < block_size else 0  # the last answer, cut


def split_pieces(x: np.ndarray, labels: np.ndarray, block_size: int, user_header: tuple[int, ...]) -> np.ndarray:
    """pack.overlong: split. The pieces of a conversation longer than block_size, as rows of (pre, start, n): the
    first piece is its first n tokens (its opening, what comes before its first user turn, then whole exchanges);
    each later piece carries the opening again (pre tokens, never trained) and then the n tokens from `start`, whole
    exchanges (an exchange begins at a user turn). An exchange that does not fit alone has its answer cut at the
    edge of the row, with no end token (a cut answer never teaches stopping mid-sentence); a piece that would train
    nothing is left out, and so is everything when the opening alone fills a row."""
    user = starts(x, user_header)
    if not len(user):  # no user turn to split at: whole exchanges cannot be told apart
        n = fit(x, block_size, "exchanges", user_header=user_header, labels=labels)
        return np.array([(0, 0, n)] if n else [], np.int64).reshape(-1, 3)
    opening, edges, trained = int(user[0]), np.append(user, len(x)), labels != IGNORE_INDEX
    pieces, i = [], 0
    while i < len(user):
        pre, begin = (0, 0) if i == 0 else (opening, int(edges[i]))
        j = int(np.searchsorted(edges, begin + block_size - pre, side="right")) - 1  # the last edge that fits
        n = int(edges[j]) - begin if j > i else block_size - pre  # whole exchanges i..j-1, or exchange i cut
        if n <= 0:
            break
        if trained[begin : begin + n].any():
            pieces.append((pre, begin, n))
        i = max(j, i + 1)
    return np.array(pieces, np.int64).reshape(-1, 3)


def covered(x: np.ndarray, pieces: np.ndarray, user_header: tuple[int, ...]) -> tuple[int, int]:
    """(the conversation's own tokens in its pieces, its exchanges in none of them)."""
    user = starts(x, user_header)
    inside = np.zeros(len(user), np.bool_)
    for _, start, n in pieces.tolist():
        inside |= (user >= start) & (user < start + n)
    return int(pieces[:, 2].sum()), int((~inside).sum())


@dataclasses.dataclass
class Pieces:
    """What goes into the pack, each piece a document of its own: conversation conv[j]'s first pre[j] tokens (a
    split conversation's opening, carried untrained) then its tokens [start[j], start[j] + n[j]); doc[j] numbers it
    in the packed rows (its conversation's index; a split conversation's later pieces after every conversation)."""
    conv: np.ndarray
    pre: np.ndarray
    start: np.ndarray
    n: np.ndarray
    doc: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.pre + self.n


def plan_pieces(fits: np.ndarray, splits: dict[int, np.ndarray]) -> Pieces:
    """One piece per kept conversation k (its first fits[k] tokens), or the pieces splits[k] of a split one, in
    conversation order."""
    keep = np.flatnonzero(fits > 0)
    single = np.array([k not in splits for k in keep.tolist()], np.bool_) if splits else np.ones(len(keep), np.bool_)
    if single.all():
        zeros = np.zeros(len(keep), np.int64)
        return Pieces(keep, zeros, zeros, fits[keep].astype(np.int64), keep)
    parts = [splits[k] if k in splits else np.array([(0, 0, fits[k])], np.int64) for k in keep.tolist()]
    count = np.array([len(p) for p in parts], np.int64)
    table = np.concatenate(parts)
    conv = np.repeat(keep, count)
    first = np.concatenate([[0], np.cumsum(count)[:-1]])
    later = np.ones(len(table), np.bool_)
    later[first] = False
    doc = conv.copy()
    doc[later] = len(fits) + np.arange(int(later.sum()))
    return Pieces(conv, table[:, 0], table[:, 1], table[:, 2], doc)


def _gather(ids: np.ndarray, labels: np.ndarray, conv_start: np.ndarray, pieces: Pieces, sel=slice(None)
            ) -> tuple[np.ndarray, np.ndarray]:
    """The tokens of pieces[sel], end to end (ids, labels), from conversations held end to end in ids/labels, piece
    j's conversation beginning at conv_start[j]. A carried opening is never trained."""
    pre, start, n = pieces.pre[sel], pieces.start[sel], pieces.n[sel]
    length = pre + n
    within = np.arange(int(length.sum())) - np.repeat(np.cumsum(length) - length, length)
    body = within >= np.repeat(pre, length)
    src = np.repeat(conv_start, length) + within + np.where(body, np.repeat(start - pre, length), 0)
    return ids[src], np.where(body, labels[src], IGNORE_INDEX).astype(np.int32)


def _place(write, ids: np.ndarray, labels: np.ndarray, pieces: Pieces, k: np.ndarray, row: np.ndarray,
           offset: np.ndarray, block_size: int, first_row: int = 0) -> int:
    """Places pieces k (their tokens end to end in ids/labels) at their (row - first_row, offset): write(name, flat
    positions, values) for each array. Returns their trained tokens."""
    n = pieces.lengths[k]
    within = np.arange(int(n.sum())) - np.repeat(np.cumsum(n) - n, n)  # position inside its piece
    dst = np.repeat((row[k] - first_row) * block_size + offset[k], n) + within
    for name, values in (("ids", ids), ("labels", labels), ("pos", within), ("doc", np.repeat(pieces.doc[k], n))):
        write(name, dst, values)
    return int((labels != IGNORE_INDEX).sum())


def _into(arrays: dict):
    """The `write` of _place for arrays in memory."""
    def write(name: str, dst: np.ndarray, values: np.ndarray) -> None:
        arrays[name].reshape(-1)[dst] = values
    return write


def exchanges_left(x: np.ndarray, kept: int, user_header: tuple[int, ...]) -> int:
    """The exchanges (user turns) of a conversation cut to `kept` tokens that begin at or after the cut."""
    return int((starts(x, user_header) >= kept).sum()) if 0 < kept < len(x) else 0


def _overlong(x: np.ndarray, labels, policy: str, block_size: int, where: str, header: tuple[int, ...],
              user_header: tuple[int, ...]) -> tuple[int, int, np.ndarray | None]:
    """An overlong conversation under `policy`: (its tokens that go into the pack, its exchanges left out, its
    pieces when split)."""
    if policy == "split":
        pieces = split_pieces(x, labels, block_size, user_header)
        return *covered(x, pieces, user_header), pieces
    n = fit(x, block_size, policy, where, header, user_header, labels)
    return n, exchanges_left(x, n, user_header), None


def _report(lengths: np.ndarray, fits: np.ndarray, left: np.ndarray, sources: np.ndarray, n: int, B: int,
            trained: int, pieces: Pieces, alone: bool = False) -> dict:
    tokens_in, packed, repeated = int(lengths.sum()), int(fits.sum()), int(pieces.pre.sum())
    in_rows = packed + repeated
    parts = np.bincount(pieces.conv, minlength=len(lengths))
    report = {
        "conversations": len(lengths), "packed": int((fits > 0).sum()), "dropped_overlong": int((fits == 0).sum()),
        "truncated": int(((fits > 0) & (fits < lengths)).sum()), "exchanges_left_out": int(left.sum()),
        "split": int((parts > 1).sum()), "tokens_in": tokens_in, "tokens_packed": packed,
        "tokens_dropped": tokens_in - packed, "tokens_repeated": repeated, "rows": n, "block_size": B,
        "utilisation": in_rows / max(1, n * B), "padding_tokens": n * B - in_rows,
        "ideal_utilisation": in_rows / max(1, -(-in_rows // B) * B),  # every row full but the last
        "trained_tokens": trained, "one_per_row": alone,
        "sources": {},
    }
    for name in dict.fromkeys(sources.tolist()):
        sel = sources == name
        s_in, s_packed = int(lengths[sel].sum()), int(fits[sel].sum())
        report["sources"][name] = {
            "conversations": int(sel.sum()), "dropped_overlong": int((fits[sel] == 0).sum()),
            "truncated": int(((fits[sel] > 0) & (fits[sel] < lengths[sel])).sum()),
            "exchanges_left_out": int(left[sel].sum()), "split": int((parts[sel] > 1).sum()),
            "tokens_dropped": s_in - s_packed,
            "token_share_before": s_in / max(1, tokens_in), "token_share_after": s_packed / max(1, packed),
        }
    return report


def pack(ids: list[np.ndarray], labels: list[np.ndarray], cfg: PackConfig, sources=None, rows=None,
         out: str | None = None, header: tuple[int, ...] = (), user_header: tuple[int, ...] = (),
         alone: bool = False) -> tuple[dict, dict]:
    """Pack whole conversations held in memory into rows; returns the arrays (rows, block_size) and a report (per
    source when `sources` names each conversation's source). With `out`, the arrays are also saved there as .npy
    and returned memory-mapped. `pack_rendered` does the same from a rendered parquet, without holding its tokens.
    alone: one conversation per row (a model that cannot be packed)."""
    B = cfg.block_size
    n_conv = len(ids)
    sources = np.asarray(sources if sources is not None else ["all"] * n_conv, dtype=object)
    lengths = np.fromiter((len(x) for x in ids), np.int64, n_conv)
    fits, left, splits = lengths.copy(), np.zeros(n_conv, np.int64), {}
    for i in np.flatnonzero(lengths > B):
        where = f"conversation {i}" if rows is None else f"{sources[i]}:{int(rows[i]) + 1}"
        fits[i], left[i], pieces = _overlong(ids[i], labels[i], cfg.overlong, B, where, header, user_header)
        if pieces is not None:
            splits[int(i)] = pieces
    pieces = plan_pieces(fits, splits)
    row, offset, n = one_per_row(pieces.lengths) if alone else best_fit_decreasing(pieces.lengths, B)
    arrays = {name: np.full((n, B), PADDING[name], np.int32) for name in ARRAYS}
    first = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    flat = [np.concatenate(x).astype(np.int32, copy=False) if n_conv else np.zeros(0, np.int32) for x in (ids, labels)]
    x, y = _gather(*flat, first[pieces.conv], pieces)
    trained = _place(_into(arrays), x, y, pieces, np.arange(len(pieces.n)), row, offset, B)
    if out is not None:
        save_packed(arrays, out)
        arrays = load_packed(out)
    return arrays, _report(lengths, fits, left, sources, n, B, trained, pieces, alone)


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
    left: np.ndarray  # exchanges left out of a conversation cut to fit (pack.overlong: truncate, exchanges, split)
    splits: dict  # pack.overlong: split: file row -> the pieces of that overlong conversation (see `split_pieces`)


def read_index(path: str, cfg: PackConfig) -> RenderedIndex:
    """Lengths from the list offsets, one row group at a time; only an overlong conversation's tokens are looked
    at (truncation searches them for the header ids the render stage recorded)."""
    f = pq.ParquetFile(path)
    header, user_header = rendered_headers(path)
    policy = "drop" if cfg.overlong == "fail" else cfg.overlong  # fail: checked at packing, naming the row
    lengths, fits, left, splits, base = [], [], [], {}, 0
    columns = ["input_ids", "labels"] if policy in ("exchanges", "split") else ["input_ids"]
    for g in range(f.num_row_groups):
        group = f.read_row_group(g, columns=columns)
        values, off = _flat(group.column("input_ids"))
        labels = _flat(group.column("labels"))[0] if len(columns) == 2 else None
        n = np.diff(off)
        m, cut = n.copy(), np.zeros(len(n), np.int64)
        for i in np.flatnonzero(n > cfg.block_size):
            m[i], cut[i], pieces = _overlong(values[off[i] : off[i + 1]],
                                             None if labels is None else labels[off[i] : off[i + 1]], policy,
                                             cfg.block_size, "", header, user_header)
            if pieces is not None:
                splits[base + int(i)] = pieces
        lengths.append(n)
        fits.append(m)
        left.append(cut)
        base += len(n)
    meta = pq.ParquetFile(path, read_dictionary=["source"]).read(columns=["source", "source_row"])
    names: dict[str, int] = {}
    codes = [np.zeros(0, np.int64)]
    for chunk in meta.column("source").chunks:  # each chunk's dictionary codes -> codes into one list of names
        local = np.array([names.setdefault(s, len(names)) for s in chunk.dictionary.to_pylist()], np.int64)
        codes.append(local[chunk.indices.to_numpy(zero_copy_only=False)])
    sources = np.array(list(names), dtype=object)[np.concatenate(codes)]  # one string object per source
    joined = (np.concatenate([np.zeros(0, np.int64)] + parts) for parts in (lengths, fits, left))
    lengths, fits, left = joined
    return RenderedIndex(lengths, fits, sources, meta.column("source_row").to_numpy(), left, splits)


def pack_rendered(path: str, index: RenderedIndex, order: np.ndarray, cfg: PackConfig, out: str,
                  window: int | None = None, alone: bool = False) -> dict:
    """Pack the conversations order[0], order[1], ... (rows of the rendered parquet; repeats allowed) into .npy
    arrays in `out`; returns the report. The same output as `pack` on those conversations in memory, but only
    lengths are held. The rows are planned first; the output is then made in windows of ~4 MiB per array: one
    pass over the row groups spills each conversation's tokens to its window's file (sequential appends), then
    each window is filled in memory from its spill and written out. Temporary disk: 8 bytes a packed token."""
    B = cfg.block_size
    lengths, fits, left, sources = index.lengths[order], index.fits[order], index.left[order], index.sources[order]
    if cfg.overlong == "fail" and (lengths > B).any():
        i = order[np.argmax(lengths > B)]
        raise overlong_error(f"{index.sources[i]}:{int(index.rows[i]) + 1}", int(index.lengths[i]), B)
    split_at = np.flatnonzero(np.isin(order, list(index.splits))) if index.splits else []
    pieces = plan_pieces(fits, {int(k): index.splits[int(order[k])] for k in split_at})
    row, offset, n = one_per_row(pieces.lengths) if alone else best_fit_decreasing(pieces.lengths, B)
    window = window or max(1, (1 << 20) // B)  # output rows per window: 4 MiB per array
    piece_rows = order[pieces.conv]  # each piece's conversation, as a row of the file
    by_file = np.argsort(piece_rows, kind="stable")  # the pieces, in file order
    Path(out).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=".spill") as spill:
        chunks = _spill(path, by_file, piece_rows, pieces, row // window, spill)
        files = {k: open(Path(out) / f"{k}.npy", "wb") for k in ARRAYS}
        trained = 0
        try:
            for f in files.values():
                np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
                                                         "fortran_order": False, "shape": (n, B)})
            for w, first in enumerate(tqdm(range(0, n, window), desc="pack", unit=" windows", disable=None)):
                block = {k: np.full((min(n, first + window) - first, B), PADDING[k], np.int32) for k in ARRAYS}
                buf, pos = np.fromfile(Path(spill) / str(w), np.int32), 0
                for k in chunks[w]:  # a chunk: pieces k's ids end to end, then their labels
                    m = int(pieces.lengths[k].sum())
                    trained += _place(_into(block), buf[pos : pos + m], buf[pos + m : pos + 2 * m], pieces, k, row,
                                      offset, B, first)
                    pos += 2 * m
                for k, f in files.items():
                    block[k].tofile(f)
        finally:
            for f in files.values():
                f.close()
    return _report(lengths, fits, left, sources, n, B, trained, pieces, alone)


def _spill(path: str, by_file: np.ndarray, piece_rows: np.ndarray, pieces: Pieces, windows: np.ndarray,
           spill: str) -> list[list[np.ndarray]]:
    """One pass over the file, 8k conversations at a time: the tokens of each piece (by_file: the pieces in the
    order of their conversations' rows, piece_rows) are appended to its window's file, as chunks (ids then labels
    of some pieces). Returns per window the pieces of each chunk. Files are opened per chunk, so any number of
    windows works within the open-file limit."""
    chunks: list[list[np.ndarray]] = [[] for _ in range(int(windows.max(initial=-1)) + 1)]
    f, first, groups = pq.ParquetFile(path), 0, []
    file_rows = piece_rows[by_file]
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
            ids, labels = _gather(ids, labels, off[piece_rows[k] - first], pieces, k)
            ends = np.cumsum(pieces.lengths[k])
            w, at = np.unique(windows[k], return_index=True)
            for j, (wj, c) in enumerate(zip(w.tolist(), at.tolist())):
                d = at[j + 1] if j + 1 < len(at) else len(k)
                lo, hi = ends[c] - pieces.lengths[k[c]], ends[d - 1]
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


def pack_split(path: str, cfg: PackConfig, out: str, weighted: bool, alone: bool = False) -> tuple[dict, np.ndarray]:
    """The pack stage for one split: the rendered parquet at `path` packed into `out`/*.npy, in the weighted,
    shuffled order of pack.weights and pack.seed (weighted=True, train) or in file order; alone: one conversation
    per row. Returns the report and the lengths of the packed conversations, in packing order (for the
    histogram)."""
    index = read_index(path, cfg)  # lengths, sources, rows: no tokens held
    order = weighted_order(index.sources, cfg.weights, cfg.seed) if weighted else np.arange(len(index.lengths))
    report = pack_rendered(path, index, order, cfg, out, alone=alone)
    print(f"pack {Path(out).name}: " + ", ".join(f"{k}={v}" for k, v in report.items() if k != "sources"))
    return report, index.lengths[order]


def write_histogram(path: str, lengths: np.ndarray, block_size: int) -> None:
    """A DVC plot of conversations per length bin (CSV)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["length", "conversations"])
        w.writeheader()
        w.writerows(length_histogram(lengths, block_size))


def save_packed(arrays: dict, folder: str) -> None:
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        np.save(Path(folder) / f"{name}.npy", arrays[name])


def load_packed(folder: str) -> dict:
    """The arrays of a packed split, memory-mapped."""
    missing = [name for name in ARRAYS if not (Path(folder) / f"{name}.npy").is_file()]
    if missing:
        raise UserError(f"{folder}: not a packed split (no {', '.join(m + '.npy' for m in missing)}); run the pack "
                        "stage (`dvc repro pack`)")
    return {name: np.load(Path(folder) / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
