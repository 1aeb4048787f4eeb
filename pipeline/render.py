"""The render stage's work: conversations (a file or a folder of sources) -> a parquet of rendered ids and labels,
streamed in batches, with the masking statistics per source and per role that the stage reports as DVC metrics."""
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer
from tqdm import tqdm

from pipeline.common import IGNORE_INDEX, UserError
from pipeline.config import RenderConfig
from pipeline.data import BadRow, iter_conversations
from pipeline.model_template import Unlocatable
from pipeline.template import ROLES, layout, own_rows, render_flat, tokenize_rows

# what render writes and pack reads; the parquet's metadata also records the format's assistant header ids
RENDERED_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                             ("source", pa.string()), ("source_row", pa.int64())])


def _zero_stats() -> dict:
    return {"tokens": 0, "trained_tokens": 0, "fully_masked_rows": 0, "assistant_ends": 0, "assistant_ends_trained": 0,
            "roles": {r: {"tokens": 0, "trained_tokens": 0} for r in ROLES}}


def _zero_counts() -> dict:
    return {"rows_read": 0, "rows_kept": 0, "rows_dropped": 0, "dropped": {}, "empty_files": 0, "trimmed_turns": 0}


class MaskStats:
    """Masking statistics per source and per role, accumulated batch by batch (vectorised over tokens).
    The assistant end count walks the ids (role headers), independently of the mask it checks."""

    def __init__(self, tok: Tokenizer):
        self.layout = layout(tok)
        self.end = self.layout.end
        self.stats: dict[str, dict] = {}

    def add(self, source: str, ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray,
            roles: np.ndarray | None = None) -> None:
        """Conversations of one source end to end: conversation k is ids[offsets[k]:offsets[k+1]]. The role of each
        token is found from the ids (role headers), or given by a model's own template's renderer (`roles`)."""
        s = self.stats.setdefault(source, _zero_stats())
        s["tokens"] += len(ids)
        s["trained_tokens"] += int(mask.sum())
        per_row = np.add.reduceat(mask.astype(np.int64), offsets[:-1]) if len(ids) else np.zeros(0)
        s["fully_masked_rows"] += int((per_row == 0).sum())
        if roles is None:
            code = np.full(len(ids), -1, np.int64)  # role index at each turn's first token, then carried forward
            for r, role in enumerate(ROLES):
                code[self.layout.starts(ids, role)] = r
            last = np.maximum.accumulate(np.where(code >= 0, np.arange(len(ids)), 0)) if len(ids) else code
            role_at = code[last]  # every conversation starts with a header, so this never crosses rows
        else:
            role_at = roles.astype(np.int64)
        for r, role in enumerate(ROLES):
            in_role = role_at == r
            s["roles"][role]["tokens"] += int(in_role.sum())
            s["roles"][role]["trained_tokens"] += int((in_role & mask).sum())
        ends = np.isin(ids, self.layout.ends) & (role_at == list(ROLES).index("assistant"))
        s["assistant_ends"] += int(ends.sum())
        s["assistant_ends_trained"] += int((ends & mask).sum())


def _summary(c: dict, s: dict) -> dict:
    out = {"rows_read": c["rows_read"], "rows_kept": c["rows_kept"], "rows_dropped": c["rows_dropped"],
           "dropped": dict(sorted(c["dropped"].items())), "empty_files": c["empty_files"],
           "trimmed_turns": c["trimmed_turns"],
           "tokens": s["tokens"], "trained_tokens": s["trained_tokens"],
           "trained_fraction": s["trained_tokens"] / max(1, s["tokens"]),
           "assistant_end_trained_fraction": s["assistant_ends_trained"] / max(1, s["assistant_ends"]),
           "end_share_of_trained": s["assistant_ends_trained"] / max(1, s["trained_tokens"]),
           "fully_masked_rows": s["fully_masked_rows"]}
    out["roles"] = {r: {"tokens": v["tokens"], "trained_fraction": v["trained_tokens"] / max(1, v["tokens"])}
                    for r, v in s["roles"].items() if v["tokens"]}
    return out


def mask_report(counts: dict, stats: MaskStats) -> dict:
    """Masking statistics, tracked as DVC metrics so a masking regression shows in `dvc metrics diff`: totals,
    then per source (`sources.<name>.*`) with per-role trained fractions. counts: per source, as
    pipeline.data.iter_conversations counts rows."""
    per = {src: _summary(c, stats.stats.get(src) or _zero_stats()) for src, c in sorted(counts.items())}
    total_counts, total_stats = _zero_counts(), _zero_stats()
    for c in counts.values():
        for k in ("rows_read", "rows_kept", "rows_dropped", "empty_files", "trimmed_turns"):
            total_counts[k] += c[k]
        for reason, n in c["dropped"].items():
            total_counts["dropped"][reason] = total_counts["dropped"].get(reason, 0) + n
    for s in stats.stats.values():
        for k in ("tokens", "trained_tokens", "fully_masked_rows", "assistant_ends", "assistant_ends_trained"):
            total_stats[k] += s[k]
        for r, v in s["roles"].items():
            total_stats["roles"][r]["tokens"] += v["tokens"]
            total_stats["roles"][r]["trained_tokens"] += v["trained_tokens"]
    report = _summary(total_counts, total_stats)
    assert report["rows_read"] == report["rows_kept"] + report["rows_dropped"], "rows read != kept + dropped"
    report["sources"] = per
    return report


def render_split(path: str, tok: Tokenizer, cfg: RenderConfig, out: str, progress: str = "") -> dict:
    """A file or folder of sources -> parquet of (input_ids, labels, source, source_row), streamed: conversations
    are tokenized cfg.batch_size at a time and each batch is one row group. Returns the masking report."""
    counts: dict = {}
    stats = MaskStats(tok)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    lay = layout(tok)  # the header ids pack's overlong policies cut at
    schema = RENDERED_SCHEMA.with_metadata({"assistant_header": json.dumps(lay.header_ids("assistant")),
                                            "user_header": json.dumps(lay.header_ids("user"))})
    writer = pq.ParquetWriter(out, schema)
    bar = tqdm(desc=progress or f"render {path}", unit=" rows", disable=None, mininterval=1.0)

    def flush(batch):
        if own:  # prepared in the reading loop: (messages, rows of the model's own template)
            ids, mask, off, conv, roles = tokenize_rows([rows for _, _, (_, rows) in batch], tok)
        else:
            ids, mask, off, conv, roles = render_flat([m for _, _, m in batch], tok, cfg.train_on)
        sources = [batch[k][0] for k in conv]  # per rendered row (a template may make several rows of one)
        for src in dict.fromkeys(sources):  # per-source statistics, in order of appearance
            sel = [k for k, s in enumerate(sources) if s == src]
            parts = [(off[k], off[k + 1]) for k in sel]
            lens = np.array([b - a for a, b in parts])
            pick = (lambda a: a) if len(sel) == len(sources) else \
                (lambda a: np.concatenate([a[x:y] for x, y in parts]))  # noqa: E731
            stats.add(src, pick(ids), pick(mask), np.concatenate([[0], np.cumsum(lens)]),
                      None if roles is None else pick(roles))
        labels = np.where(mask, ids, IGNORE_INDEX).astype(np.int32)
        offsets = pa.array(off.astype(np.int32))
        writer.write_table(pa.table({
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids)),
            "labels": pa.ListArray.from_arrays(offsets, pa.array(labels)),
            "source": pa.array(sources, pa.string()),
            "source_row": pa.array([batch[k][1] for k in conv], pa.int64()),
        }, schema=schema))
        bar.update(len(batch))

    own = getattr(tok, "own_template", None) is not None

    def prepare(messages):  # a model's own template renders here: a conversation it cannot place is a bad row
        try:
            return messages, own_rows(messages, tok, cfg.train_on)
        except Unlocatable as e:
            raise BadRow(e.reason, e.detail) from None

    try:
        # batch k is tokenized and written in a thread (the tokenizer releases the GIL) while batch k+1 is read
        # and validated: one batch in flight, so the order, the output and the first error are as if in sequence
        with ThreadPoolExecutor(1) as pool:
            batch, pending = [], None
            try:
                for item in iter_conversations(path, cfg.on_error, counts, cfg.unpaired, prepare if own else None):
                    batch.append(item)
                    if len(batch) == cfg.batch_size:
                        if pending is not None:
                            pending.result()
                        pending, batch = pool.submit(flush, batch), []
            finally:
                if pending is not None:
                    pending.result()  # an error in an earlier batch is raised first
            if batch:
                flush(batch)
    finally:
        writer.close()
        bar.close()
    report = mask_report(counts, stats)
    dropped = f" {report['dropped']}" if report["dropped"] else ""
    print(f"{progress or 'render'}: read {report['rows_read']}, kept {report['rows_kept']}, dropped "
          f"{report['rows_dropped']}{dropped}, trained fraction {report['trained_fraction']:.3f}, "
          f"assistant end token trained {report['assistant_end_trained_fraction']:.3f}")
    if report["rows_kept"] == 0:
        raise UserError(f"{path}: no usable conversation (read {report['rows_read']}, dropped {report['dropped']}); "
                        "fix the data (render.on_error: fail stops at the first bad row with its reason)")
    return report
