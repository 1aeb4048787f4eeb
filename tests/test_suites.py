"""General-ability suites (pipeline/suites.py, pipeline/general.py): the log-likelihood of a choice is what a
transformers forward of the same text gives, batched or not; rows are read strictly (file:line) or skipped and counted;
a suite the fine-tuning contradicts is flagged as a regression, reported first and refused by the publish gate."""
import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common import UserError, setup_compute
from pipeline.general import check_general, evaluate_general, find_regressions
from pipeline.hf import save_model
from pipeline.metrics import cell
from pipeline.publish import check_no_regression, general_table
from pipeline.report import write_report
from pipeline.suites import (Question, context, encode_pair, encoder, exact_correct, extract, letter_of,
                             loglikelihoods, parse_row, read_suite, split_shots)
from pipeline.template import chat_format, render
from tests.conftest import ROOT, config, tiny_model, write_params

CPU = setup_compute("cpu", "float32")
COLOURS = ["red", "blue", "green", "yellow"]


def mc_rows(n: int, gold=lambda i: i % 4) -> list[dict]:
    return [{"question": f"What colour is the flag of Velmora {i}?", "choices": COLOURS, "answer": gold(i)}
            for i in range(n)]


def write_suite(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def folder(any_tok, tmp_path):
    model = tiny_model(any_tok.get_vocab_size(), seed=1, init_std=0.5)  # a wide init: no near-ties
    save_model(model, any_tok, str(tmp_path / "model"))
    return str(tmp_path / "model"), model


@pytest.mark.parametrize("prompting", ["chat", "plain"])
def test_choice_loglikelihood_is_the_sum_of_a_transformers_forward_over_the_choice_tokens(any_tok, folder,
                                                                                           prompting):
    import transformers

    path, model = folder
    hf_tok = transformers.AutoTokenizer.from_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    q = Question(1, "Which river flows through Velmora?", ("Osk", "the river Tal", "Mira  12"), 0)
    ctx = context(q, "choice", [q], prompting, any_tok)  # one solved example before the question
    header = chat_format(any_tok).header("assistant")
    assert ctx.endswith("Answer:" if prompting == "plain" else f"Velmora?{chat_format(any_tok).end}"
                        f"{chat_format(any_tok).after_end}{header}")
    lead = " " if prompting == "plain" else ""
    pairs = [encode_pair(encoder(any_tok, prompting), ctx, lead + c) for c in q.choices]
    ours = loglikelihoods(model, pairs, batch_size=8, compute=CPU)
    for choice, (ctx_ids, cont_ids), (score, _) in zip(q.choices, pairs, ours):
        whole = hf_tok(ctx + lead + choice)["input_ids"]  # the same text, tokenized by transformers
        # split at the character boundary, whitespace that ends the context (ChatML's "\n") moved to the choice
        n_ctx = len(hf_tok(ctx.rstrip())["input_ids"])
        assert (ctx_ids, cont_ids) == (whole[:n_ctx], whole[n_ctx:])
        with torch.no_grad():
            logprobs = hf(torch.tensor([whole])).logits[0].log_softmax(-1)
        reference = sum(float(logprobs[t - 1, whole[t]]) for t in range(n_ctx, len(whole)))  # t-1 predicts t
        assert score == pytest.approx(reference, abs=1e-4)
        assert len(cont_ids) >= 1 and score < 0


def test_batched_scoring_equals_one_at_a_time_and_flags_greedy_continuations(tok):
    model = tiny_model(tok.get_vocab_size(), seed=2, init_std=0.5).eval()
    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(6, 300, (int(n),), generator=gen).tolist(), torch.randint(6, 300, (int(m),),
                                                                                     generator=gen).tolist())
             for n, m in zip(torch.randint(1, 40, (11,), generator=gen), torch.randint(1, 6, (11,), generator=gen))]
    with torch.no_grad():  # a continuation made of the model's own greedy tokens is flagged as greedy
        ids = list(pairs[0][0])
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    pairs.append((pairs[0][0], ids[len(pairs[0][0]):]))
    pairs += [(pairs[1][0], [t]) for t in (7, 8, 9)]  # one-token choices after one prompt: one shared forward
    batched = loglikelihoods(model, pairs, batch_size=4, compute=CPU)
    alone = [loglikelihoods(model, [p], batch_size=1, compute=CPU)[0] for p in pairs]
    for (a, ga), (b, gb) in zip(batched, alone):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    assert batched[-4][1] and not all(g for _, g in batched[:-4])
    assert len({score for score, _ in batched[-3:]}) == 3  # each its own token's log-probability
    long = [(list(range(6, 200)) * 2, [7, 8])]  # longer than max_seq_len=128: the last 129 tokens are kept
    kept = loglikelihoods(model, long, 1, CPU)[0][0]
    assert kept == pytest.approx(loglikelihoods(model, [(long[0][0][-127:], [7, 8])], 1, CPU)[0][0], abs=1e-4)


def test_rows_are_parsed_strictly():
    assert parse_row({"question": "q", "choices": ["x", "y"], "answer": "b"}).gold == 1
    assert parse_row({"question": "q", "choices": ["x", "y"], "answer": 0}).kind == "choice"
    assert parse_row({"question": "q", "answer": "He had 3 + 4 = 7 apples.\n#### 7"}).gold == "7"
    assert parse_row({"question": "q", "answer": 12}) == Question(0, "q", (), "12")
    assert parse_row({"question": "q", "choices": ["x", "y"], "answer": 2}).startswith("bad_answer")
    assert parse_row({"question": "q", "choises": ["x"], "answer": 1}).startswith("unknown_keys")
    assert parse_row({"question": "", "answer": "1"}) == "no_question"
    assert parse_row({"question": "q", "choices": ["x"], "answer": 0}).startswith("bad_choices")
    assert parse_row(["q"]) == "not_an_object"


def test_answers_are_extracted_as_gsm8k_scores_them():
    assert extract("3 + 4 = 7, then 7 * 2 = 14.\n#### 14\nmore", "14") == "14"
    assert exact_correct("so she pays $1,200 in all", "1200") == 1.0
    assert exact_correct("12 or maybe 13", "12") == 0.0  # the last number counts
    assert exact_correct("#### 7.0", "7") == 1.0 and exact_correct("The answer: Osk.", "osk") == 0.0
    assert exact_correct("  The Osk ", "osk") == 1.0 and exact_correct("", "osk") == 0.0
    assert [letter_of(t, 4) for t in ("b", "(C).", "B) blue", "I think it is D", "a lot", "E", "nothing")] == \
        [1, 2, 1, 3, 0, None, None]


def test_a_malformed_row_fails_in_one_line_naming_file_and_line_or_is_skipped_and_counted(tmp_path, tok):
    path = write_suite(tmp_path / "world.jsonl", mc_rows(2) + ['{"question": "q", "answer": }'] + mc_rows(1)
                       + [{"question": "q", "choices": ["x", "y"], "answer": 5}])
    with pytest.raises(UserError, match=r"world\.jsonl:3: bad_json"):
        read_suite(tmp_path / "world.jsonl", "fail")
    questions, dropped = read_suite(tmp_path / "world.jsonl", "skip")
    assert [q.line for q in questions] == [1, 2, 4] and dropped == {"bad_json": 1, "bad_answer": 1}
    # the stage: one line on stderr, before any model is loaded
    for name in ("base", "sft", "dev", "curves"):
        (tmp_path / name).mkdir()
    for name in ("heldout.jsonl", "mc.jsonl"):
        (tmp_path / name).write_text("")
    write_params(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "base", "sft", "heldout.jsonl", "mc.jsonl", path,
                           "dev", "curves", "m.json", "pred", "fig", "eval.md"], cwd=tmp_path, capture_output=True,
                          text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert proc.returncode == 1 and proc.stderr.splitlines() == [
        f"evaluate: {path}:3: bad_json: Expecting value; fix the row, or set render.on_error: skip to leave bad rows "
        "out and count them"], proc.stderr


def fit(model, tok, conversations: list[list[dict]], steps: int, lr: float):
    """Train on the rendered conversations (answers only), full batch: a tiny model learns them in seconds."""
    rows = [render(c, tok) for c in conversations]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([[t if m else -100 for t, m in zip(i, mask)] + [-100] * (width - len(i)) for i, mask in rows])
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss_sum, n = model(ids, labels)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def chats(rows: list[dict], answer) -> list[list[dict]]:
    return [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": answer(r)}] for r in rows]


def test_a_suite_the_fine_tuning_contradicts_is_a_regression_reported_first_and_refused(tok, tmp_path):
    rows = mc_rows(8) + [{"question": f"What is {a} plus {b}?", "answer": str(a + b)} for a, b in
                          ((1, 2), (3, 4), (2, 2), (5, 1))]
    suites = tmp_path / "suites"
    suites.mkdir()
    write_suite(suites / "planted.jsonl", rows)
    write_suite(suites / "kept.jsonl", mc_rows(8, gold=lambda i: 0))
    right = lambda r: r["choices"][r["answer"]] if "choices" in r else r["answer"]  # noqa: E731
    wrong = lambda r: r["choices"][(r["answer"] + 1) % 4] if "choices" in r else r["answer"]  # noqa: E731
    base = fit(tiny_model(tok.get_vocab_size(), seed=0), tok, chats(rows, right), steps=80, lr=1.5e-2)
    save_model(base, tok, str(tmp_path / "base"))
    sft = fit(base, tok, chats(rows[:8], wrong), steps=80, lr=1.5e-2)  # contradicts the planted suite's choices
    save_model(sft, tok, str(tmp_path / "sft"))
    (tmp_path / "metrics.json").write_text(json.dumps({"base": {"n": 1}, "sft": {"n": 1, "stopped": 1.0}}))
    cfg = config("evaluate", n_boot=200, batch_size=5, limit=0)
    read = check_general(cfg, str(suites), "fail")
    metrics = evaluate_general(cfg, {"base": str(tmp_path / "base"), "sft": str(tmp_path / "sft")}, read,
                               str(tmp_path / "metrics.json"), str(tmp_path / "pred"))
    planted = metrics["planted"]
    assert planted["base"]["mc_n"] == 8 and planted["base"]["exact_n"] == 4
    assert planted["base"]["acc"] >= 0.75 and planted["sft"]["acc"] <= 0.25  # learnt, then contradicted
    diff = planted["sft_minus_base"]
    assert diff["acc"] == pytest.approx(planted["sft"]["acc"] - planted["base"]["acc"])
    assert diff["acc_lo"] <= diff["acc"] <= diff["acc_hi"] < -cfg.regression_margin
    assert planted["prompting"] == {"base": "chat", "sft": "chat"}
    assert metrics["regressions"]["n"] >= 1 and "acc " in metrics["regressions"]["planted"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    saved = pq.read_table(tmp_path / "pred/suites.parquet").to_pylist()
    assert len(saved) == 2 * (12 + 8) and {r["suite"] for r in saved} == {"planted", "kept"}
    # the report lists it before everything else; the gate refuses it, in one line with the figures
    out = tmp_path / "eval.md"
    write_report(metrics, [], {}, str(out), 0)
    text = out.read_text()
    assert text.index("Regressions:") < text.index("| metric |") < text.index("### Suite `planted`")
    assert f"- **planted**: {metrics['regressions']['planted']}" in text
    card = general_table(metrics)  # the model card shows what fine-tuning cost
    assert f"| suite planted | acc | {cell(planted['base'], 'acc')} | {cell(planted['sft'], 'acc')} | " in card
    with pytest.raises(UserError, match=r"refusing to publish: the fine-tuned model regressed on planted: acc "):
        check_no_regression(config("publish", no_regression=["planted"]), metrics)
    with pytest.raises(UserError, match="names nothere, which the metrics do not have"):
        check_no_regression(config("publish", no_regression=["nothere"]), metrics)
    if "kept" not in metrics["regressions"]:
        check_no_regression(config("publish", no_regression=["kept"]), metrics)  # not regressed: no refusal
    write_params(tmp_path, publish={"no_regression": ["planted"], "gate_min": 0.0})
    proc = subprocess.run([sys.executable, "-m", "stages.publish", "sft", "metrics.json", "out"], cwd=tmp_path,
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          timeout=120)
    assert proc.returncode == 1 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith("publish: refusing to publish: the fine-tuned model regressed on planted: acc -")


def test_few_shot_examples_are_shown_and_not_scored_and_regressions_need_the_whole_interval(tok):
    questions = [Question(i + 1, f"q{i}", ("x", "y") if i % 2 else (), 1 if i % 2 else str(i)) for i in range(7)]
    shots, scored = split_shots(questions, 2, 0)
    assert [q.line for q in shots["choice"]] == [2, 4] and [q.line for q in shots["exact"]] == [1, 3]
    assert [q.line for q in scored] == [5, 6, 7] and [q.line for q in split_shots(questions, 2, 2)[1]] == [5, 6]
    plain = context(scored[1], "letter", shots["choice"], "plain", tok)
    assert plain == ("Question: q1\nA) x\nB) y\nAnswer with the letter of the right option.\nAnswer: B\n\n"
                     "Question: q3\nA) x\nB) y\nAnswer with the letter of the right option.\nAnswer: B\n\n"
                     "Question: q5\nA) x\nB) y\nAnswer with the letter of the right option.\nAnswer:")
    chat = context(scored[0], "exact", shots["exact"], "chat", tok)
    assert chat == "<|user|>q0<|end|><|assistant|>0<|end|><|user|>q2<|end|><|assistant|>2<|end|><|user|>q4<|end|>" \
                   "<|assistant|>"
    group = {"sft_minus_base": {"acc": -0.30, "acc_lo": -0.40, "acc_hi": -0.21, "letter_acc": -0.30,
                                "letter_acc_lo": -0.6, "letter_acc_hi": 0.01}}
    found = find_regressions({"s": group}, ["s"], [], 0.02)
    assert found == {"n": 1, "s": "acc -0.300 [-0.400, -0.210]"}  # letter_acc's interval reaches above 0
    assert find_regressions({"s": group}, ["s"], [], 0.25) == {"n": 0}  # -0.21 is not below -0.25


def test_the_bundled_world_suite_asks_what_the_chat_data_does_not_teach(tmp_path):
    from pipeline.synth import TEMPLATES, generate

    small = dict(n_towns=6, n_people=12, n_regions=3, n_rivers=3, n_syllables=20, docs_per_entity=3, n_arith_docs=5,
                 n_train=300, n_dev=40, n_heldout=40, n_mc_train=0, n_suite_mc=20, n_suite_arith=10)
    generate(config("synth", **small), str(tmp_path))
    questions, dropped = read_suite(tmp_path / "suites/world.jsonl", "fail")
    assert not dropped and [q.kind for q in questions] == ["choice"] * 20 + ["exact"] * 10
    world = json.loads((tmp_path / "world.json").read_text())
    held = {(e, a) for e, a in world["heldout_facts"]}
    asked = {u["content"] for line in (tmp_path / "train.jsonl").read_text().splitlines()
             for u in json.loads(line)["messages"] if u["role"] == "user"}
    for q in questions[:20]:  # the true value among others of its attribute, about a held-out fact
        facts = [(e, a) for e, a in held if q.question in [t.format(e=e) for t in TEMPLATES[a]["ask"]]]
        assert len(facts) == 1 and world["entities"][facts[0][0]][facts[0][1]] == q.choices[q.gold], q
        assert len(set(q.choices)) == len(q.choices) >= 2 and q.question not in asked
    for q in questions[20:]:  # sums and differences, in phrasings the chat data never uses
        a, b = map(int, re.findall(r"\d+", q.question))
        assert int(q.gold) in (a + b, abs(a - b)) and q.question not in asked
