"""Evaluation of long answers: the reference-based scores against published and hand-worked values, the budget
sized from each gold answer, and the loss of each gold answer under a model."""
import math

import numpy as np
import pytest
import torch

import pipeline.evaluate as evaluate_module
from pipeline.common import UserError, setup_compute
from pipeline.config import BudgetConfig
from pipeline.evaluate import answer_losses, generation_rows, gold_spans, without_prompt
from pipeline.metrics import answer_kind, chrf, long_scores, paired, rouge_l, token_f1
from pipeline.pack import pack
from pipeline.template import layout, render
from pipeline.train import train
from tests.conftest import config, labels_of, tiny_model

ANSWERS = [
    "Velmora lies on the river Osk, and its old town climbs the hill above the eastern bank.",
    "Mira Tal has been the mayor since the spring election; before that she ran the harbour office for years.",
    "Founded in 1203 by traders from the coast, the town grew around a bridge and a market square.",
    "The market opens at dawn on market days, and the fish stalls close first, long before noon.",
    "Two ferries cross the river: the old one near the mill and a new one by the harbour office.",
    "The river Osk floods in spring, so the lower streets keep their doors raised above the road.",
]
LONG = [[{"role": "user", "content": f"Tell me about Velmora, part {i + 1}."}, {"role": "assistant", "content": a}]
        for i, a in enumerate(ANSWERS)]


def test_rouge_l_and_chrf_match_their_published_values():
    # rouge-score's README: target "The quick brown fox jumps over the lazy dog", prediction "The quick brown dog
    # jumps on the log." -> rougeL precision 0.625, recall 0.5556, fmeasure 0.5882 (LCS "the quick brown jumps the")
    assert rouge_l("The quick brown dog jumps on the log.", "The quick brown fox jumps over the lazy dog") == \
        pytest.approx(0.5882352941176471)
    assert rouge_l("same words here", "Same words, here!") == 1.0 and rouge_l("", "gold") == 0.0
    # chrF by hand, "ab" against "abc" (spaces ignored): 1-grams P 2/2 R 2/3, 2-grams P 1/1 R 1/2, no 3-grams in the
    # output (orders without n-grams do not count): P 1, R 7/12, F2 = 5PR / (4P + R) = 35/55
    assert chrf("ab", "abc") == pytest.approx(35 / 55) and chrf("a b", "a b c") == pytest.approx(35 / 55)
    assert chrf("abcdefg", "hijklmnop") == 0.0 and chrf("Osk", "Osk") == pytest.approx(1.0)
    assert chrf("你好世界", "你好") > 0.5  # every script: character n-grams


def test_token_f1_and_length_ratio_by_hand():
    # SQuAD-style F1: output "the cat sat on a mat" -> [cat, sat, on, mat]; gold "a cat on the hat" -> [cat, on, hat]
    # shared 2: P 2/4, R 2/3, F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7
    assert token_f1("the cat sat on a mat", "a cat on the hat") == pytest.approx(4 / 7)
    assert token_f1("Osk Osk", "Osk") == pytest.approx(2 * 0.5 * 1 / 1.5)  # multiset: the second Osk is extra
    assert token_f1("", "") == 1.0 and token_f1("the", "Osk") == 0.0
    assert long_scores("abcd", "ab")["length_ratio"] == 2.0 and long_scores(" ab ", "abcd")["length_ratio"] == 0.5


def test_answer_kind():
    assert answer_kind(["Osk", "Mira Tal", "1203"], "auto") == "short"
    assert answer_kind(ANSWERS, "auto") == "long"
    assert answer_kind(ANSWERS, "short") == "short"


def scripted(tok, conversations, extra: int | None):
    """A decoder that writes each gold answer as rendered, then `extra` more tokens before its end token (None:
    never ends), within the budget it is given."""
    end = layout(tok).ends[0]
    gold = {tuple(ids[:a]): ids[a : b - 1] for ids, a, b in gold_spans(tok, conversations)}
    filler = tok.token_to_id("a") or 5

    def generate(model, prompts, max_new_tokens, stop_id):
        outs = []
        for p in prompts:
            ids = gold[tuple(p)] + [filler] * (extra or 0) + [end] if extra is not None else [filler] * max_new_tokens
            outs.append(ids[:max_new_tokens])  # as generate: up to the end token, or the whole budget
        return outs
    return generate


def test_auto_budget_measures_stopping_not_the_budget(tok, monkeypatch):
    compute = setup_compute("cpu", "float32")
    model = tiny_model(tok.get_vocab_size())
    spans = gold_spans(tok, LONG)
    gold_tokens = [b - a for _, a, b in spans]  # answer + end token
    assert min(gold_tokens) > 16
    auto = config("evaluate", max_new_tokens="auto", budget=BudgetConfig(2.0, 4, 1000),
                  batch_size=4)

    def stopped(cfg, extra):
        monkeypatch.setattr(evaluate_module, "generate", scripted(tok, LONG, extra))
        rows = generation_rows(model, tok, LONG, cfg, compute, "m", "long")
        return [r["stopped"] for r in rows], [r["budget"] for r in rows], rows

    ends, budget, rows = stopped(auto, 0)  # ends right after the gold answer
    assert ends == [1.0] * 6 and budget == [2 * n for n in gold_tokens]
    assert [r["output"] for r in rows] == ANSWERS and all(r["rougeL"] == 1.0 for r in rows)
    assert stopped(auto, None)[0] == [0.0] * 6  # never ends
    assert stopped(config("evaluate", max_new_tokens=12), 0)[0] == [0.0] * 6  # a fixed budget shorter than the gold
    tight = config("evaluate", max_new_tokens="auto", budget=BudgetConfig(1.0, 4, 1000), batch_size=6)
    # one token over each answer's own budget, in batches decoded to the largest budget: none counts as stopped
    assert stopped(tight, 1)[0] == [0.0] * 6 and stopped(tight, 0)[0] == [1.0] * 6
    capped = config("evaluate", max_new_tokens="auto", budget=BudgetConfig(2.0, 4, 10))
    assert set(stopped(capped, 0)[1]) == {10}


def hand_answer_loss(model, ids: list[int], a: int, b: int, limit: int) -> float:
    """-mean log p(answer token | everything before it), position by position, over the last `limit` tokens."""
    first = max(0, b - limit)
    with torch.no_grad():
        logp = model(torch.tensor([ids[first:b]]))[0].log_softmax(-1)
    terms = [-float(logp[t - first - 1, ids[t]]) for t in range(max(a, first + 1), b)]
    return sum(terms) / len(terms)


def test_answer_loss_is_the_masked_loss_of_the_gold_answer(tok):
    compute = setup_compute("cpu", "float32")
    model = tiny_model(tok.get_vocab_size()).eval()
    spans = gold_spans(tok, LONG)
    for (ids, a, b), loss in zip(spans, answer_losses(model, spans, compute)):
        assert loss == pytest.approx(hand_answer_loss(model, ids, a, b, len(ids)), rel=1e-5)
    ids, a, b = spans[0]
    short = tiny_model(tok.get_vocab_size(), max_seq_len=b - a + 3).eval()  # the answer fits, most context does not
    assert answer_losses(short, [spans[0]], compute)[0] == pytest.approx(hand_answer_loss(short, ids, a, b, b - a + 3),
                                                                         rel=1e-5)


def test_answer_loss_tells_a_model_trained_on_the_answers_from_its_base(tok, tmp_path):
    compute = setup_compute("cpu", "float32")
    base = tiny_model(tok.get_vocab_size())
    tuned = tiny_model(tok.get_vocab_size())
    rendered = [render(c, tok) for c in LONG]
    arrays, _ = pack([np.array(ids, np.int32) for ids, _ in rendered],
                     [np.array(labels_of(ids, m), np.int32) for ids, m in rendered], config("pack", block_size=128))
    train(config("train", max_steps=30, batch_size=2, eval_every=30, lr=3e-3), tuned, compute, arrays, None,
          str(tmp_path / "live"))
    spans = gold_spans(tok, LONG)
    rows = {name: [{"answer_loss": x} for x in answer_losses(m, spans, compute)]
            for name, m in (("base", base), ("tuned", tuned))}
    diff = paired(rows["base"], rows["tuned"], ["answer_loss"], 1000, 0)
    assert diff["answer_loss_hi"] < 0 and diff["answer_loss_losses"] == 6 and math.isfinite(diff["answer_loss"])


def test_a_held_out_answer_without_a_prompt_fails_or_is_left_out(capsys):
    lone = [{"role": "assistant", "content": "An answer cut from its question."}]
    system_only = [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello."}]
    with pytest.raises(UserError, match=r"^held.jsonl: held-out conversation 2 has no user turn before its last"):
        without_prompt([LONG[0], lone, LONG[1]], "held.jsonl", "fail")
    assert without_prompt([LONG[0], lone, system_only, LONG[1]], "held.jsonl", "skip") == [LONG[0], LONG[1]]
    assert "2 held-out conversations left out" in capsys.readouterr().out
