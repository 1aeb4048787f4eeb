import pytest

from pipeline.common import setup_compute
from pipeline.evaluate import EvaluateConfig, answer, distinct3, normalize, score
from tests.conftest import CONVERSATIONS, tiny_model


def test_normalize_per_spec():
    assert normalize("  The Osk! ") == "osk"
    assert normalize("An apple, a day") == "apple day"
    assert normalize("Mira\tTal.\n") == "mira tal"
    assert normalize("théâtre") == "thtre"  # everything but [a-z0-9 ] is dropped


def test_score_rows():
    assert score("Osk", "the Osk", True) == {"exact_match": 1.0, "contains_answer": 1.0, "stopped": 1.0,
                                             "length_ok": 1.0, "distinct3": 1.0}
    wordy = score("I think the river is the Osk, yes indeed", "Osk", False)
    assert wordy["exact_match"] == 0.0 and wordy["contains_answer"] == 1.0
    assert wordy["stopped"] == 0.0 and wordy["length_ok"] == 0.0
    assert score("Ridas", "Osk", True)["contains_answer"] == 0.0
    assert score("It was 1250", "5", True)["contains_answer"] == 0.0  # whole words, not substrings
    assert score("It was 5 or 6", "5", True)["contains_answer"] == 1.0


def test_distinct3_catches_loops():
    assert distinct3("a b c d e") == 1.0
    assert distinct3("x y z x y z x y z") == pytest.approx(3 / 7)
    assert distinct3("short") == 1.0


def test_answer_decodes_and_reports_stopping(tok):
    model = tiny_model(tok.get_vocab_size())
    cfg = EvaluateConfig(max_new_tokens=5, batch_size=2)
    results = answer(model, tok, [c[:-1] for c in CONVERSATIONS], cfg, setup_compute("cpu", "float32"))
    assert len(results) == len(CONVERSATIONS)
    for text, stopped in results:
        assert isinstance(text, str) and isinstance(stopped, bool)
        assert "<|end|>" not in text or not stopped
