"""Metrics without a model: the per-example scores of SPEC §5 for short answers and the reference-based ones for
long answers (ROUGE-L and chrF from the packages that define them, token F1, length ratio), means with bootstrap 95%
intervals, paired differences between two models on the same examples, and the "value [lo, hi]" cell every table
prints."""
import math
import re
from collections import Counter
from functools import cache

import numpy as np

RATES = ("exact_match", "contains_answer", "stopped", "length_ok", "distinct3")  # short answers, the during-train set
SHORT = ("exact_match", "contains_answer", "length_ok")  # a few words: right or wrong
LONG = ("rougeL", "chrf", "token_f1", "length_ratio")  # paragraphs: how close to the gold answer
BOTH = ("stopped", "distinct3")  # whatever the answer kind
SHORT_WORDS = 10  # evaluate.answers: auto takes short when the median gold answer has at most this many words


TABLE = ("n", *SHORT, *LONG, *BOTH, "answer_loss", "mc_n", "mc_accuracy", "dev_loss", "dev_ppl")
NOT_RATES = ("n", "length_ratio", "answer_loss", "mc_n", "dev_loss", "dev_ppl")  # not in [0, 1]


def measured(group: dict) -> list[str]:
    """The keys of a model's metrics that tables show, in the order of TABLE: only what was measured."""
    return [k for k in TABLE if k in group]


def scores_for(kind: str) -> tuple[str, ...]:
    """The per-example generation scores summarised for answers of this kind (short | long)."""
    return (*SHORT, *BOTH) if kind == "short" else (*LONG, *BOTH)


def answer_kind(golds: list[str], setting: str) -> str:
    """evaluate.answers: short or long as set, or auto: short when the median gold answer has at most SHORT_WORDS
    words."""
    if setting != "auto":
        return setting
    return "short" if not golds or np.median([len(g.split()) for g in golds]) <= SHORT_WORDS else "long"


def normalize(text: str) -> str:
    """SPEC §5: lowercase, keep [a-z0-9 ], drop a/an/the, collapse whitespace."""
    text = re.sub(r"[^a-z0-9\s]", "", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def words(text: str) -> list[str]:
    return [w for w in re.findall(r"\w+", text.lower()) if w not in ("a", "an", "the")]


def distinct3(text: str) -> float:
    """Unique word trigrams / trigrams; 1.0 means no repetition loop (and for texts under 3 words)."""
    words = text.split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


def token_f1(output: str, gold: str) -> float:
    """F1 of the words shared by output and gold (multiset overlap, as SQuAD scores answers; words are lowercased
    runs of letters and digits of any script, a/an/the left out); 1.0 when both have none, 0.0 when one has none."""
    out, ref = words(output), words(gold)
    if not out or not ref:
        return float(out == ref)
    same = sum((Counter(out) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(out), same / len(ref)
    return 2 * precision * recall / (precision + recall)


@cache
def _rouge():
    from rouge_score import rouge_scorer  # Google's reference implementation of ROUGE

    return rouge_scorer.RougeScorer(["rougeL"])


def rouge_l(output: str, gold: str) -> float:
    """ROUGE-L F1 (longest common subsequence of words) by the rouge-score package: lowercased words of [a-z0-9],
    so text in other scripts scores 0 here (chrF covers every script)."""
    return float(_rouge().score(gold, output)["rougeL"].fmeasure)


@cache
def _chrf():
    from sacrebleu.metrics import CHRF  # the reference implementation of chrF

    return CHRF()


def chrf(output: str, gold: str) -> float:
    """chrF (character n-gram F-score, beta 2) by sacrebleu, on a 0-1 scale: works for any language and script."""
    return float(_chrf().sentence_score(output, [gold]).score) / 100


def long_scores(output: str, gold: str) -> dict:
    """The reference-based scores of a long answer; length_ratio is output over gold characters (1.0: as long)."""
    return {"rougeL": rouge_l(output, gold), "chrf": chrf(output, gold), "token_f1": token_f1(output, gold),
            "length_ratio": len(output.strip()) / max(1, len(gold.strip()))}


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
    """{prefix}n and, per key, the mean with its bootstrap interval: key, key_lo, key_hi. A non-finite value (an
    answer loss that overflowed) is left out of its key's figures, and key_n says over how many they are."""
    out = {f"{prefix}n": len(rows)}
    for key in keys:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        out[key] = float(np.mean(values)) if values else math.nan
        out[f"{key}_lo"], out[f"{key}_hi"] = bootstrap_ci(values, n_boot, seed)
        if len(values) < len(rows):
            out[f"{key}_n"] = len(values)
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


def regressed(diff: dict, margin: float) -> list[str]:
    """The scores of a paired difference (b minus a, from `paired`) whose whole 95% interval lies below -margin:
    worse beyond noise and beyond the margin. Each as `key -0.300 [-0.400, -0.200]`."""
    keys = [k.removesuffix("_hi") for k in diff if k.endswith("_hi") and f"{k[:-3]}_lo" in diff]
    return [f"{k} {cell(diff, k)}" for k in keys if isinstance(diff.get(k), float) and diff[f"{k}_hi"] < -margin]
