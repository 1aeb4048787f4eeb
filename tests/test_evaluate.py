import json

import matplotlib.pyplot as plt
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common import setup_compute
from pipeline.compare import compare
from pipeline.compare import main as compare_main
from pipeline.config import DuringTrainConfig
from pipeline.evaluate import (
    answer,
    dev_prompts,
    evaluate_pair,
    make_train_evaluator,
    mc_rows,
    option_letters,
    write_parquet,
)
from pipeline.hf import save_model
from pipeline.metrics import bootstrap_ci, distinct3, normalize, paired, score, summarize
from pipeline.pack import pack, save_packed
from pipeline.report import make_report
from pipeline.template import layout, render, render_prompt
from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
from pipeline.train import train
from tests.conftest import CONVERSATIONS, TEXTS, config, labels_of, tiny_model


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


def test_answer_decodes_and_reports_stopping(tok, monkeypatch):
    """answer() decodes what generation wrote, without the end token, says which rows stopped at it, and hands
    each result back in the order of the prompts (it decodes them sorted by length)."""
    import pipeline.evaluate as evaluate_module

    end = tok.token_to_id("<|end|>")
    osk, tal = (tok.encode(w, add_special_tokens=False).ids for w in (" Osk", " Mira Tal"))

    def scripted(model, prompts, max_new_tokens, stop_id):  # stands in for decoding: stops on odd prompt lengths
        assert stop_id == [end]  # every id that ends an answer
        return [osk + [end] if len(p) % 2 else tal for p in prompts]

    monkeypatch.setattr(evaluate_module, "generate", scripted)
    prompts = [c[:-1] for c in CONVERSATIONS]
    results = answer(None, tok, prompts, 5, 2, setup_compute("cpu", "float32"))
    odd = [len(render_prompt(p, tok)) % 2 == 1 for p in prompts]
    assert results == [("Osk", True) if o else ("Mira Tal", False) for o in odd] and set(odd) == {True, False}


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.random(50) < 0.4, rng.random(2000) < 0.4
    lo_s, hi_s = bootstrap_ci(small, 1000, 0)
    lo_l, hi_l = bootstrap_ci(large, 1000, 0)
    assert lo_s <= small.mean() <= hi_s and lo_l <= large.mean() <= hi_l
    assert (hi_l - lo_l) < (hi_s - lo_s) / 3  # ~ 1/sqrt(n): 2000 vs 50 examples
    assert 0.35 < lo_l < 0.4 < hi_l < 0.45  # binomial: 0.4 ± 1.96 * sqrt(.24 / 2000) ≈ ± 0.021
    assert bootstrap_ci([1.0] * 30, 1000, 0) == (1.0, 1.0)
    losses = rng.random(50)  # per-example values on a continuum: each resampling lands its percentiles elsewhere
    assert bootstrap_ci(losses, 1000, 3) == bootstrap_ci(losses, 1000, 3) != bootstrap_ci(losses, 1000, 4)  # seeded


def test_summarize_and_paired_difference():
    rows_a = [{"m": float(i % 2 == 0)} for i in range(200)]  # 0.5
    rows_b = [{"m": float(i % 2 == 0 or i % 10 == 1)} for i in range(200)]  # 0.6: b wins 20, loses none
    s = summarize(rows_b, ["m"], 500, 0, prefix="x_")
    assert s["x_n"] == 200 and s["m"] == pytest.approx(0.6) and s["m_lo"] < 0.6 < s["m_hi"]
    d = paired(rows_a, rows_b, ["m"], 500, 0)
    assert d["m"] == pytest.approx(0.1) and d["m_wins"] == 20 and d["m_losses"] == 0 and d["n"] == 200
    assert d["m_lo"] > 0  # every changed example improved: the paired interval excludes 0
    unpaired_width = (s["m_hi"] - s["m_lo"]) + (summarize(rows_a, ["m"], 500, 0)["m_hi"] - 0.4)
    assert d["m_hi"] - d["m_lo"] < unpaired_width / 2  # pairing removes the shared per-example variation
    with pytest.raises(AssertionError):
        paired(rows_a, rows_b[:10], ["m"], 500, 0)


def test_option_letters():
    q = "Which river?\na) Osk\nb) Tal\nc) Pim d) no\nd) Vel\nAnswer with a, b, c or d."
    assert option_letters(q) == ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def letter_tok(tmp_path_factory):
    """A tokenizer in which a, b, c are single tokens (" a", " b", " c") but "Zq" is not."""
    folder = tmp_path_factory.mktemp("letters")
    texts = [f"Pick {x} or {y} please" for x in "abc" for y in "abc"] * 30 + TEXTS
    save_tokenizer(train_tokenizer(texts, 330), str(folder))
    return load_tokenizer(str(folder))


def test_multiple_choice_compares_letter_logits_at_the_answer_position(letter_tok):
    tok = letter_tok
    assert all(len(tok.encode(x, add_special_tokens=False).ids) == 1 for x in "abc")
    model = tiny_model(tok.get_vocab_size(), seed=2, init_std=0.3).eval()
    questions = [[{"role": "user", "content": f"Question {i}?\na) x\nb) y\nc) z"}, {"role": "assistant", "content": g}]
                 for i, g in enumerate("abcabc")]
    rows = mc_rows(model, tok, questions, 4, setup_compute("cpu", "float32"), "m")
    letters = [tok.encode(x, add_special_tokens=False).ids[0] for x in "abc"]
    for q, row in zip(questions, rows):
        with torch.no_grad():
            logits = model(torch.tensor([render_prompt(q[:-1], tok)]))[0, -1]  # at <|assistant|>
        assert row["choice"] == "abc"[int(logits[letters].argmax())]
        assert row["mc_accuracy"] == float(row["choice"] == row["gold"])
    assert [r["gold"] for r in rows] == list("abcabc")
    bad = [[{"role": "user", "content": "Q?\na) x\nb) y"}, {"role": "assistant", "content": "c"}]]
    with pytest.raises(ValueError, match="not one of its options"):
        mc_rows(model, tok, bad, 4, setup_compute("cpu", "float32"), "m")


def test_multi_token_letters_are_scored_by_their_summed_log_probability(tok):
    model = tiny_model(tok.get_vocab_size(), seed=1).eval()
    split = [x for x in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if len(tok.encode(x, add_special_tokens=False).ids) > 1][:2]
    assert len(split) == 2, "the test needs two letters that are several tokens in this tokenizer"
    question = [{"role": "user", "content": f"Q?\n{split[0]}) x\n{split[1]}) y"},
                {"role": "assistant", "content": split[1]}]
    row = mc_rows(model, tok, [question], 8, setup_compute("cpu", "float32"), "m")[0]
    prompt = render_prompt(question[:-1], tok)
    by_hand = {}
    for letter in split:
        cont = tok.encode(letter, add_special_tokens=False).ids
        assert len(cont) > 1
        with torch.no_grad():
            logp = model(torch.tensor([prompt + cont]))[0].log_softmax(-1)
        by_hand[letter] = sum(float(logp[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
    assert row["choice"] == max(by_hand, key=by_hand.get)
    assert json.loads(row["letter_logprobs"]) == pytest.approx(by_hand, abs=1e-3)


def test_dev_prompts_recover_prompt_and_gold_from_packed_rows(tok):
    rendered = [render(c, tok) for c in CONVERSATIONS]
    arrays, _ = pack([np.array(ids, np.int32) for ids, _ in rendered],
                     [np.array(labels_of(ids, m), np.int32) for ids, m in rendered], config("pack", block_size=128))
    got = dev_prompts(arrays, tok, 10)
    expected = {(tuple(render_prompt(c[:-1], tok)), normalize(c[-1]["content"])) for c in CONVERSATIONS}
    assert {(tuple(p), normalize(g)) for p, g in got} == expected
    assert len(dev_prompts(arrays, tok, 2)) == 2


def evaluation_inputs(tok, tmp_path) -> dict:
    """Two tiny model folders, held-out and multiple-choice files, packed dev rows: evaluate_pair's inputs."""
    folders = {}
    for name, seed in (("base", 0), ("sft", 1)):
        folders[name] = str(tmp_path / name)
        save_model(tiny_model(tok.get_vocab_size(), seed=seed), tok, folders[name])
    heldout, mc = tmp_path / "heldout.jsonl", tmp_path / "mc.jsonl"
    heldout.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    mcq = [[{"role": "user", "content": f"Who? {i}\na) Osk\nb) Tal"}, {"role": "assistant", "content": "ab"[i % 2]}]
           for i in range(6)]
    mc.write_text("".join(json.dumps({"messages": c}) + "\n" for c in mcq))
    rendered = [render(c, tok) for c in CONVERSATIONS]
    arrays, _ = pack([np.array(ids, np.int32) for ids, _ in rendered],
                     [np.array(labels_of(ids, m), np.int32) for ids, m in rendered], config("pack", block_size=64))
    save_packed(arrays, str(tmp_path / "dev"))
    curves = tmp_path / "curves"
    curves.mkdir()
    (curves / "loss.tsv").write_text("step\tloss\n0\t5.0\n1\t4.0\n2\t3.5\n")
    (curves / "dev_loss.tsv").write_text("step\tdev_loss\n0\t5.5\n2\t4.1\n")
    (curves / "lr.tsv").write_text("step\tlr\n0\t1e-4\n1\t2e-4\n2\t1e-4\n")
    (curves / "gen_stopped.tsv").write_text("step\tgen_stopped\n0\t0.0\n2\t0.5\n")
    return {"models": folders, "heldout": str(heldout), "mc": str(mc), "dev": str(tmp_path / "dev"),
            "curves": curves}


def test_evaluate_pair_writes_metrics_predictions_and_report(tok, tmp_path):
    inputs = evaluation_inputs(tok, tmp_path)
    curves = inputs["curves"]
    cfg = config("evaluate", max_new_tokens=6, batch_size=3, n_boot=200, n_report=2)
    out = tmp_path / "out"
    metrics = evaluate_pair(cfg, inputs["models"], inputs["heldout"], inputs["mc"], inputs["dev"],
                            str(out / "metrics.json"), str(out / "predictions"))
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for name in ("base", "sft"):
        m = metrics[name]
        assert m["n"] == 4 and m["mc_n"] == 6 and m["dev_loss"] > 0
        for key in ("contains_answer", "stopped", "distinct3", "mc_accuracy"):
            assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"]
    diff = metrics["sft_minus_base"]
    assert diff["n"] == 4 and diff["mc_n"] == 6
    assert diff["stopped"] == pytest.approx(metrics["sft"]["stopped"] - metrics["base"]["stopped"])
    gen = pq.read_table(out / "predictions/generation.parquet").to_pylist()
    assert len(gen) == 8 and {r["model"] for r in gen} == {"base", "sft"}
    assert {"example", "prompt", "gold", "output", "contains_answer", "stopped"} <= set(gen[0])
    assert [r["gold"] for r in gen if r["model"] == "sft"] == [c[-1]["content"] for c in CONVERSATIONS]
    mc_rows_out = pq.read_table(out / "predictions/mc.parquet").to_pylist()
    assert len(mc_rows_out) == 12 and all(r["choice"] in "ab" for r in mc_rows_out)
    figures = make_report(str(out / "metrics.json"), str(out / "predictions"), str(curves), str(out / "figures"),
                          str(out / "eval.md"), cfg.n_report)
    for png in figures.values():
        image = plt.imread(png)
        assert image.shape[0] > 200 and image.shape[1] > 400 and image.std() > 0  # a real, non-blank picture
    report = (out / "eval.md").read_text()
    assert "| contains_answer |" in report and "figures/metrics.png" in report and "figures/training.png" in report
    m = metrics["sft"]
    assert f"{m['contains_answer']:.3f} [{m['contains_answer_lo']:.3f}, {m['contains_answer_hi']:.3f}]" in report
    assert CONVERSATIONS[0][-2]["content"] in report and CONVERSATIONS[2][-2]["content"] not in report  # n_report=2


def test_train_logs_generation_metrics_and_samples_at_eval_points(tok, tmp_path):
    rendered = [render(c, tok) for c in CONVERSATIONS * 4]
    arrays, _ = pack([np.array(ids, np.int32) for ids, _ in rendered],
                     [np.array(labels_of(ids, m), np.int32) for ids, m in rendered], config("pack", block_size=64))
    compute = setup_compute("cpu", "float32")
    live = tmp_path / "live"
    evaluator = make_train_evaluator(tok, arrays, DuringTrainConfig(prompts=3, max_new_tokens=4, samples=3),
                                     compute, str(live))
    cfg = config("train", max_steps=5, batch_size=2, eval_every=2, lr=1e-3)
    summary = train(cfg, tiny_model(tok.get_vocab_size()), compute, arrays, arrays, str(live), "t", evaluator)
    steps = [int(line.split("\t")[0]) for line in (live / "plots/metrics/gen_stopped.tsv").read_text().splitlines()[1:]]
    assert steps == [0, 2, 4, 5]  # every eval_every steps and at the end, like dev_loss
    dev_steps = [line.split("\t")[0] for line in (live / "plots/metrics/dev_loss.tsv").read_text().splitlines()[1:]]
    assert dev_steps == [str(s) for s in steps]
    samples = [json.loads(line) for line in (live / "samples.jsonl").read_text().splitlines()]
    assert [s["eval"] for s in samples] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    last = [score(s["output"], s["gold"], s["stopped"]) for s in samples[-3:]]  # the answers of the last evaluation
    for rate in ("contains_answer", "stopped", "exact_match"):
        assert summary[f"gen_{rate}"] == pytest.approx(np.mean([r[rate] for r in last]))
    assert "## evaluation 3" in (live / "samples.md").read_text()


def test_compare_two_experiments_example_by_example(tmp_path, capsys):
    def rows(outputs):
        return [{"example": i, "model": "sft", "prompt": f"q{i}", "gold": "osk", "output": o} | score(o, "osk", True)
                for i, o in enumerate(outputs)]
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    write_parquet(str(a), rows(["osk", "tal", "tal", "osk"]))
    write_parquet(str(b), rows(["osk", "osk", "the osk", "tal"]))
    summary, changed = compare(str(a), str(b))
    assert summary["n"] == 4 and summary["contains_answer"] == pytest.approx(0.25)
    assert summary["contains_answer_wins"] == 2 and summary["contains_answer_losses"] == 1
    assert [ra["example"] for ra, _ in changed] == [1, 2, 3]
    compare_main([str(a), str(b)])
    assert "contains_answer" in capsys.readouterr().out
    write_parquet(str(b), rows(["osk", "osk"]))
    with pytest.raises(ValueError, match="same examples"):
        compare(str(a), str(b))


def test_chatml_letters_are_scored_as_the_model_writes_them(chatml_tok):
    """After `<|im_start|>assistant\n` the answer is written without a prefix space ("b", not " b"): multiple
    choice scores the letters as the renderer writes an assistant answer, not as they are encoded alone."""
    from pipeline.evaluate import written_answer

    tok = chatml_tok
    question = [{"role": "user", "content": "Q?\na) x\nb) y"}, {"role": "assistant", "content": "b"}]
    trained_ids, mask = render(question, tok)
    prompt, answer_ids = written_answer(question[:-1], "b", tok)
    after_end = layout(tok).after_end  # the newline after <|im_end|>
    assert prompt + answer_ids + [tok.token_to_id("<|im_end|>")] + after_end == trained_ids
    assert tok.decode(answer_ids) == "b" and answer_ids != tok.encode("b", add_special_tokens=False).ids
    model = tiny_model(tok.get_vocab_size(), seed=3, init_std=0.3).eval()
    row = mc_rows(model, tok, [question], 4, setup_compute("cpu", "float32"), "m")[0]
    with torch.no_grad():
        logp = model(torch.tensor([prompt]))[0, -1].log_softmax(-1)
    by_hand = {x: float(logp[written_answer(question[:-1], x, tok)[1][0]]) for x in "ab"}
    assert json.loads(row["letter_logprobs"]) == pytest.approx(by_hand, abs=1e-4)
    assert row["choice"] == max(by_hand, key=by_hand.get)


def test_a_non_finite_answer_loss_never_reaches_metrics_json(tok, tmp_path, monkeypatch):
    """One held-out answer whose loss overflows (NaN): left out of the answer-loss figures, which say over how many
    answers they are (answer_loss_n), and metrics.json stays strict JSON, as DVC reads it."""
    import pipeline.evaluate as evaluate_module

    real = evaluate_module.answer_losses

    def overflowing(model, spans, compute):
        losses = real(model, spans, compute)
        return [float("nan") if i == 1 else x for i, x in enumerate(losses)]

    monkeypatch.setattr(evaluate_module, "answer_losses", overflowing)
    inputs = evaluation_inputs(tok, tmp_path)
    cfg = config("evaluate", max_new_tokens=4, batch_size=4, n_boot=100, multiple_choice=False)
    out = tmp_path / "out"
    evaluate_pair(cfg, inputs["models"], inputs["heldout"], inputs["mc"], inputs["dev"], str(out / "metrics.json"),
                  str(out / "predictions"))

    def refuse(constant):
        raise ValueError(f"{constant} in metrics.json")

    metrics = json.loads((out / "metrics.json").read_text(), parse_constant=refuse)
    gen = pq.read_table(out / "predictions/generation.parquet").to_pylist()
    for name in ("base", "sft"):
        kept = [r["answer_loss"] for r in gen if r["model"] == name and r["example"] != 1]
        assert metrics[name]["n"] == 4 and metrics[name]["answer_loss_n"] == 3
        assert metrics[name]["answer_loss"] == pytest.approx(np.mean(kept))
    assert metrics["sft_minus_base"]["answer_loss_n"] == 3 and "contains_answer_n" not in metrics["sft"]
