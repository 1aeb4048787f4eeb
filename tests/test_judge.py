"""The optional local judge: both orders cancel a position bias, the win rate follows a real preference, and a
judge folder that cannot be loaded is one line."""
import json

import pytest
import torch

from pipeline.common import UserError, setup_compute
from pipeline.evaluate import evaluate_pair, model_judge, written_answer
from pipeline.hf import save_model
from pipeline.judge import summarize_verdicts, verdicts
from pipeline.pack import save_packed
from tests.conftest import CONVERSATIONS, config, tiny_model

PROMPT = config("evaluate").judge.prompt
EXAMPLES = [("q1", "short", "a much longer answer"), ("q2", "a long base answer", "tiny"),
            ("q3", "ab", "abcdef"), ("q4", "one", "two and three")]


def first_answer_judge(tok, folder: str) -> str:
    """A real model folder whose every next-token distribution is the same and puts "A", as the judge writes it,
    far above "B": all embeddings equal and every block's output projections zero, so each position's hidden state
    is that one embedding, whatever the text."""
    model = tiny_model(tok.get_vocab_size(), tie_embeddings=False)
    _, a_ids = written_answer([{"role": "user", "content": "x"}], "A", tok)
    with torch.no_grad():
        model.embed.weight.copy_(torch.ones_like(model.embed.weight))
        for block in model.blocks:
            block.attn.o.weight.zero_()
            block.mlp.down.weight.zero_()
        model.lm_head.weight.zero_()
        model.lm_head.weight[a_ids] = 5.0  # the final norm of a ones vector is its norm weight: positive
    save_model(model, tok, folder)
    return folder


def test_a_judge_that_always_picks_the_first_answer_gives_half_with_every_example_tied(tok, tmp_path):
    prefer = model_judge(first_answer_judge(tok, str(tmp_path / "judge")), PROMPT, setup_compute("cpu", "float32"), 4)
    assert prefer([(q, a, b) for q, a, b in EXAMPLES]) == ["A"] * 4  # position bias, whatever the answers
    scores = verdicts(EXAMPLES, prefer)
    assert scores == [0.5] * 4
    summary = summarize_verdicts(scores, 200, 0)
    assert summary["judge_win_rate"] == 0.5 and summary["judge_ties"] == 4 and summary["judge_n"] == 4
    assert summary["judge_wins"] == summary["judge_losses"] == 0


def test_the_win_rate_follows_a_judge_that_prefers_the_longer_answer():
    def longer(triples):
        return ["A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie" for _, a, b in triples]
    scores = verdicts(EXAMPLES, longer)
    assert scores == [1.0, 0.0, 1.0, 1.0]  # the SFT answer (the third) is longer in 3 of 4
    summary = summarize_verdicts(scores, 200, 0)
    assert summary["judge_win_rate"] == 0.75 and summary["judge_wins"] == 3 and summary["judge_losses"] == 1
    assert summarize_verdicts(verdicts([("q", "same", "same")], longer), 200, 0)["judge_ties"] == 1


def test_a_judge_folder_that_does_not_load_is_one_line(tmp_path):
    broken = tmp_path / "judge"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match=r"^evaluate.judge.model='.*judge' cannot be loaded as a judge: "):
        model_judge(str(broken), PROMPT, setup_compute("cpu", "float32"), 4)
    with pytest.raises(UserError, match="must contain {answer_b}"):
        config("evaluate", judge=config("evaluate").judge.__class__(str(broken), "{question} {answer_a}"))


def test_evaluate_with_the_judge_reports_the_win_rate(tok, tmp_path):
    folders = {}
    for name, seed in (("base", 0), ("sft", 1)):
        folders[name] = str(tmp_path / name)
        save_model(tiny_model(tok.get_vocab_size(), seed=seed), tok, folders[name])
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    empty = {k: torch.zeros(0, 8, dtype=torch.int32).numpy() for k in ("ids", "labels", "pos", "doc")}
    save_packed(empty, str(tmp_path / "dev"))
    judge = config("evaluate").judge.__class__(first_answer_judge(tok, str(tmp_path / "judge")), PROMPT)
    cfg = config("evaluate", max_new_tokens=4, n_boot=200, multiple_choice=False, judge=judge)
    metrics = evaluate_pair(cfg, folders, str(heldout), "", str(tmp_path / "dev"), str(tmp_path / "metrics.json"),
                            str(tmp_path / "predictions"))
    diff = metrics["sft_minus_base"]
    assert diff["judge_n"] == 4 and diff["judge_win_rate"] == 0.5 and diff["judge_ties"] == 4
    missing = config("evaluate", judge=judge.__class__(str(tmp_path / "nowhere"), PROMPT), multiple_choice=False)
    with pytest.raises(UserError, match="evaluate.judge.model=.*nowhere' does not exist"):
        evaluate_pair(missing, folders, str(heldout), "", str(tmp_path / "dev"), str(tmp_path / "m.json"),
                      str(tmp_path / "p"))
