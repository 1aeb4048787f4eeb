"""lm-evaluation-harness through our model code (pipeline/harness.py): a local task (YAML + JSONL written here, no
download) scored by our lm-eval model class gives what lm-eval's own `hf` class gives on the same exported folder,
with the chat template and without; the evaluate stage's harness run pairs base and fine-tuned per document."""
import json
from pathlib import Path

import pytest

from pipeline.common import UserError
from pipeline.hf import save_model
from tests.conftest import config, skip_or_fail, tiny_model

try:
    import lm_eval
except ImportError:
    lm_eval = None


@pytest.fixture(autouse=True)
def needs_lm_eval():
    if lm_eval is None:  # requirements-test.txt installs it: in CI this fails instead
        skip_or_fail("lm-eval is not installed (pip install lm-eval==0.4.13)")

COLOURS = ["red", "blue", "green", "yellow"]
MC = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
GEN = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """A folder of local lm-eval tasks: two multiple-choice ones, a group of both, and a generation one."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, offset in (("tiny_mc", 0), ("tiny_mc_b", 1)):
        rows = [{"question": f"What colour is the river of Velmora {i}?", "choices": COLOURS if i % 3 else
                 ["Osk", "the river Tal", "café"], "gold": (i + offset) % 3} for i in range(10)]
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / f"{name}.yaml").write_text(MC.format(name=name, data=folder / f"{name}.jsonl"))
    (folder / "tiny_group.yaml").write_text("group: tiny_group\ntask: [tiny_mc, tiny_mc_b]\n")
    rows = [{"question": f"What is {i} plus {i}?", "answer": str(2 * i)} for i in range(6)]
    (folder / "tiny_gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "tiny_gen.yaml").write_text(GEN.format(data=folder / "tiny_gen.jsonl"))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tok):
    out = {}
    for name, seed in (("base", 1), ("sft", 2)):
        out[name] = str(tmp_path_factory.mktemp(name))
        save_model(tiny_model(tok.get_vocab_size(), seed=seed, init_std=0.5), tok, out[name])  # no near-ties
        # the exported max_new_tokens (200, a default for chat) overrides lm-eval's max_gen_toks in transformers'
        # generate, so the `hf` class would write 200 tokens where the task asks for 8: leave it out here
        path = Path(out[name]) / "generation_config.json"
        path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "max_new_tokens"}))
    return out


def test_our_model_class_scores_a_local_task_as_lm_evals_hf_class(tasks, folders):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pipeline.harness import model_class

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    ours_lm = model_class()(folders["base"], batch_size=4, device="cpu")
    for chat in (True, False):
        runs = {}
        for name, model, args in (("ours", ours_lm, None), ("hf", "hf", f"pretrained={folders['base']}")):
            runs[name] = simple_evaluate(model=model, model_args=args, tasks=["tiny_mc", "tiny_gen"], device="cpu",
                                         batch_size=4, apply_chat_template=chat, log_samples=True,
                                         task_manager=manager, bootstrap_iters=0)
        ours, hf = runs["ours"], runs["hf"]
        for task, metric in (("tiny_mc", "acc,none"), ("tiny_mc", "acc_norm,none"), ("tiny_gen", "exact_match,none")):
            assert ours["results"][task][metric] == hf["results"][task][metric], (chat, task, metric)
        for a, b in zip(ours["samples"]["tiny_mc"], hf["samples"]["tiny_mc"], strict=True):
            assert a["arguments"] == b["arguments"]  # the same text: chat-templated the same way
            for (la, ga), (lb, gb) in ((x[0], y[0]) for x, y in zip(a["resps"], b["resps"], strict=True)):
                assert la == pytest.approx(lb, abs=1e-4) and ga == gb
        assert [s["filtered_resps"] for s in ours["samples"]["tiny_gen"]] == \
            [s["filtered_resps"] for s in hf["samples"]["tiny_gen"]]  # greedy text, cut at the stop string
        first = ours["samples"]["tiny_mc"][0]["arguments"][0][0]
        assert first.startswith("<|user|>Question:") == chat and first.endswith("<|assistant|>" if chat else "Answer:")


def test_the_evaluate_stage_pairs_base_and_sft_per_document(tasks, folders):
    from pipeline.general import evaluate_harness, find_regressions

    harness = config("evaluate").harness
    cfg = config("evaluate", n_boot=200, batch_size=8,
                 harness=harness.__class__(tasks=["tiny_group", "tiny_gen"], limit=0, num_fewshot=-1,
                                           include_path=str(tasks)))
    group, rows = evaluate_harness(cfg, folders)
    assert group["prompting"] == {"base": "chat_template", "sft": "chat_template"}
    mc = group["tiny_group"]
    assert mc["base"]["n"] == mc["sft"]["n"] == 20  # both tasks of the group, every document
    assert mc["sft_minus_base"]["acc"] == pytest.approx(mc["sft"]["acc"] - mc["base"]["acc"])
    assert mc["base"]["acc_lo"] <= mc["base"]["acc"] <= mc["base"]["acc_hi"]
    assert group["tiny_gen"]["base"]["n"] == 6 and "exact_match" in group["tiny_gen"]["sft_minus_base"]
    assert len(rows) == 2 * (20 + 6) and {r["task"] for r in rows} == {"tiny_mc", "tiny_mc_b", "tiny_gen"}
    base = [r["acc"] for r in rows if r["model"] == "base" and r["harness_task"] == "tiny_group"]
    assert mc["base"]["acc"] == pytest.approx(sum(base) / len(base))
    metrics = {"harness": group}
    assert find_regressions(metrics, [], ["tiny_group", "tiny_gen"], margin=2.0) == {"n": 0}  # nothing below -2


def test_without_lm_eval_the_stage_fails_in_one_line_saying_what_to_install(tasks, monkeypatch, tmp_path):
    import importlib.util

    from pipeline.general import check_general

    harness = config("evaluate").harness
    cfg = config("evaluate", harness=harness.__class__(tasks=["tiny_mc"], limit=0, num_fewshot=-1,
                                                       include_path=str(tasks)))
    suite = tmp_path / "s.jsonl"
    suite.write_text('{"question": "q", "answer": "1"}\n')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    with pytest.raises(UserError, match=r"lm-eval is not installed; run `pip install lm-eval==0\.4\.13`"):
        check_general(cfg, str(suite), "fail")
