"""Metrics without a model: the per-example scores of SPEC §5, means with bootstrap 95% intervals, paired
differences between two models on the same examples, and the "value [lo, hi]" cell every table prints."""
import math
import re

import numpy as np

RATES = ("exact_match", "contains_answer", "stopped", "length_ok", "distinct3")  # per-example scores, averaged


def normalize(text: str) -> str:
    """SPEC §5: lowercase, keep [a-z0-9 ], drop a/an/the, collapse whitespace."""
    text = re.sub(r"[^a-z0-9\s]", "", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def distinct3(text: str) -> float:
    """Unique word trigrams / trigrams; 1.0 means no repetition loop (and for texts under 3 words)."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def score(output: str, gold: str, stopped: bool) -> dict:
    out, ref = normalize(output), normalize(gold)
    return {
        "exact_match": float(out == ref),
        # whole words: gold "5" is not found in "1250", nor "red" in "bred"
        "contains_answer": float(f" {ref} " in f" {out} ") if ref else 0.0,
        "stopped": float(stopped),
        "length_ok": float(len(output.split()) <= 3 * max(1, len(gold.split()))),
        "distinct3": distinct3(output),
    }


# ---- uncertainty ------------------------------------------------------------------------------------------
def bootstrap_ci(values, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of per-example values (resampling examples)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return math.nan, math.nan
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    lo, hi = np.percentile(x[idx].mean(axis=1), [2.5, 97.5])
    return float(lo), float(hi)


def summarize(rows: list[dict], keys, n_boot: int, seed: int, prefix: str = "") -> dict:
    """{prefix}n and, per key, the mean with its bootstrap interval: key, key_lo, key_hi."""
    out = {f"{prefix}n": len(rows)}
    for key in keys:
        values = [r[key] for r in rows]
        out[key] = float(np.mean(values)) if values else math.nan
        out[f"{key}_lo"], out[f"{key}_hi"] = bootstrap_ci(values, n_boot, seed)
    return out


def paired(a: list[dict], b: list[dict], keys, n_boot: int, seed: int, prefix: str = "") -> dict:
    """b minus a on the same examples (same order): the mean difference per key, a paired bootstrap interval
    (examples resampled together, so per-example correlation narrows it), and wins/losses counts."""
    assert len(a) == len(b), "paired comparison needs the same examples for both models"
    diffs = [{k: rb[k] - ra[k] for k in keys} for ra, rb in zip(a, b)]
    out = summarize(diffs, keys, n_boot, seed, prefix)
    for key in keys:
        out[f"{key}_wins"] = sum(d[key] > 0 for d in diffs)
        out[f"{key}_losses"] = sum(d[key] < 0 for d in diffs)
    return out


def cell(group: dict, key: str) -> str:
    """One table cell: `0.638 [0.602, 0.675]` where the metrics carry an interval (key_lo, key_hi), else the value;
    `-` when absent."""
    value = group.get(key)
    if value is None:
        return "-"
    if not isinstance(value, float):
        return str(value)
    lo, hi = group.get(f"{key}_lo"), group.get(f"{key}_hi")
    return f"{value:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{value:.3f}"
