"""The verdicts of an optional local judge (evaluate.judge.model, asked by pipeline/evaluate.py): a chat model compares
the base and the SFT answer to each held-out prompt, in both orders to cancel its position bias, by the scores it
gives the letters A and B after the judging prompt (read as multiple choice is: no generation, no network). Per
example each order gives the SFT answer 1 (preferred), 0 (not) or 0.5 (A and B scored alike); the example's score is
the mean of its two orders, the win rate the mean over examples, with a bootstrap interval. A win is 1 (preferred in
both orders), a loss 0, a tie anything between (the judge changed its mind with the order)."""
from collections.abc import Callable

from pipeline.metrics import summarize

MAX_CHARS = 1500  # each answer is shown up to this many characters, so that a prompt fits a small judge's context


def verdicts(examples: list[tuple[str, str, str]], prefer: Callable[[list[tuple[str, str, str]]], list[str]]
             ) -> list[float]:
    """examples: (question, base answer, sft answer). prefer(triples) -> "A", "B" or "tie" per (question, first
    answer, second answer). Each example is judged as (base, sft) and as (sft, base): the SFT answer wins when
    preferred in both orders, loses when the base is, and ties otherwise."""
    first = prefer([(q, base, sft) for q, base, sft in examples])
    second = prefer([(q, sft, base) for q, base, sft in examples])
    return [((x == "B") + (y == "A") + 0.5 * ((x == "tie") + (y == "tie"))) / 2 for x, y in zip(first, second)]


def summarize_verdicts(scores: list[float], n_boot: int, seed: int) -> dict:
    """judge_n, judge_win_rate (+ interval) and the counts of wins, ties and losses of the SFT answers."""
    out = summarize([{"judge_win_rate": s} for s in scores], ["judge_win_rate"], n_boot, seed, prefix="judge_")
    return out | {"judge_wins": sum(s == 1.0 for s in scores), "judge_ties": sum(0.0 < s < 1.0 for s in scores),
                  "judge_losses": sum(s == 0.0 for s in scores)}
