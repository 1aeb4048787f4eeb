"""See what is trained: rendered conversations with trained tokens green and masked tokens red.

    python -m pipeline.view data/synth/train.jsonl                  # 2 sampled rows per source, in the terminal
    python -m pipeline.view my_data/ --rows 3 --html view.html      # a folder of sources, plus an HTML page

Rows are sampled per source (seeded reservoir, streamed), rendered exactly as the render stage renders them
(tokenizer, render.train_on and render.on_error from params.yaml unless given). Without colour (not a terminal,
or NO_COLOR set), trained text is written between « and »."""
import argparse
import html
import os
import sys

import numpy as np

from pipeline.common import one_line_errors
from pipeline.config import PARAMS_FILE, RenderConfig, load_params
from pipeline.data import iter_conversations
from pipeline.template import render
from pipeline.tokenizer import load_tokenizer

GREEN, RED, RESET = "\033[32m", "\033[31m", "\033[0m"


def sample(path: str, rows: int, seed: int, on_error: str) -> dict[str, list[tuple[int, list[dict]]]]:
    """Up to `rows` conversations per source, a seeded uniform sample (reservoir), in file order."""
    rng = np.random.default_rng(seed)
    picked: dict[str, list] = {}
    seen: dict[str, int] = {}
    for source, row, messages in iter_conversations(path, on_error):
        n = seen[source] = seen.get(source, 0) + 1
        bucket = picked.setdefault(source, [])
        if len(bucket) < rows:
            bucket.append((row, messages))
        else:
            j = int(rng.integers(n))
            if j < rows:
                bucket[j] = (row, messages)
    return {s: sorted(b, key=lambda x: x[0]) for s, b in picked.items()}


def segments(ids: list[int], mask: list[bool], tok) -> list[tuple[str, bool]]:
    """Runs of tokens with the same mask, decoded together (so multi-byte characters stay whole); markers apart."""
    out, start = [], 0
    special = set(tok.get_added_tokens_decoder())
    for k in range(1, len(ids) + 1):
        if k == len(ids) or mask[k] != mask[start] or ids[k] in special or ids[k - 1] in special:
            out.append((tok.decode(ids[start:k], skip_special_tokens=False), bool(mask[start])))
            start = k
    return out


def terminal(segs: list[tuple[str, bool]], color: bool) -> str:
    if color:
        return "".join(f"{GREEN if m else RED}{text}{RESET}" for text, m in segs)
    return "".join(f"«{text}»" if m else text for text, m in segs)


def page(blocks: list[tuple[str, int, list[tuple[str, bool]], int, int]]) -> str:
    body = []
    for source, row, segs, trained, total in blocks:
        spans = "".join(f'<span class="{"t" if m else "m"}">{html.escape(text)}</span>' for text, m in segs)
        body.append(f"<h2>{html.escape(source)}, row {row + 1}: {trained} of {total} tokens trained</h2>"
                    f"<pre>{spans}</pre>")
    return ("<!doctype html><meta charset='utf-8'><title>What is trained</title><style>"
            "pre{white-space:pre-wrap;font:14px monospace}.t{background:#c8f7c5;color:#064}"
            ".m{background:#fbd3d0;color:#800}</style>"
            "<h1>What is trained</h1><p><span class='t'>trained</span> <span class='m'>masked</span></p>"
            + "\n".join(body) + "\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="a conversations file (.jsonl, .json, .parquet) or a folder of them")
    p.add_argument("--tokenizer", default="models/tokenizer", help="tokenizer.json or a model folder")
    p.add_argument("--rows", type=int, default=2, help="sampled rows per source")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-on", default=None, help="all_assistant | last_assistant | everything "
                                                     "(default: render.train_on in params.yaml)")
    p.add_argument("--on-error", default=None, help="fail | skip (default: render.on_error in params.yaml)")
    p.add_argument("--html", default="", help="also write the sampled rows as an HTML page here")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto")
    a = p.parse_args(argv)
    train_on, on_error = "all_assistant", "fail"
    if os.path.exists(PARAMS_FILE):
        cfg = load_params("render", RenderConfig)
        train_on, on_error = cfg.train_on, cfg.on_error
    cfg = RenderConfig(on_error=a.on_error or on_error, train_on=a.train_on or train_on, batch_size=1,
                       unpaired="drop")
    tok = load_tokenizer(a.tokenizer)
    color = a.color == "always" or (a.color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    blocks = []
    for source, picked in sample(a.path, a.rows, a.seed, cfg.on_error).items():
        for row, messages in picked:
            ids, mask = render(messages, tok, cfg.train_on)
            segs = segments(ids, mask, tok)
            blocks.append((source, row, segs, sum(mask), len(ids)))
            print(f"== {source}, row {row + 1}: {sum(mask)} of {len(ids)} tokens trained "
                  f"(train_on={cfg.train_on}) ==")
            print(terminal(segs, color))
    if a.html:
        with open(a.html, "w", encoding="utf-8") as f:
            f.write(page(blocks))
        print(f"wrote {a.html}")


if __name__ == "__main__":
    with one_line_errors("view"):
        main()
