import json
import re
from pathlib import Path

import pytest

from pipeline.synth import TEMPLATES, generate
from tests.conftest import config

SMALL = dict(n_towns=6, n_people=12, n_regions=3, n_rivers=3, n_syllables=20, docs_per_entity=3, n_arith_docs=5,
             n_train=300, n_dev=40, n_heldout=40, n_mc_train=0)
FILES = ("corpus.jsonl", "train.jsonl", "dev.jsonl", "heldout.jsonl", "world.json")
MARKERS = ("<|user|>", "<|assistant|>", "<|system|>", "<|end|>")
ARITH = re.compile(r"\d+ (\+|-|plus|minus) \d+")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    counts = generate(config("synth", **SMALL), str(out))
    splits = {s: read_jsonl(out / f"{s}.jsonl") for s in ("train", "dev", "heldout")}
    corpus = [d["text"] for d in read_jsonl(out / "corpus.jsonl")]
    return counts, splits, corpus, json.loads((out / "world.json").read_text()), out


def users(conv: dict) -> list[str]:
    return [m["content"] for m in conv["messages"] if m["role"] == "user"]


def test_deterministic(data, tmp_path):
    out = data[4]
    generate(config("synth", **SMALL), str(tmp_path / "again"))
    generate(config("synth", **SMALL | {"seed": 1}), str(tmp_path / "other"))
    for f in FILES:
        assert (tmp_path / "again" / f).read_bytes() == (out / f).read_bytes(), f
        assert (tmp_path / "other" / f).read_bytes() != (out / f).read_bytes(), f


def test_counts(data):
    counts, splits, corpus, world, _ = data
    assert [counts[s] for s in splits] == [len(splits[s]) for s in splits] == [300, 40, 40]
    assert counts["corpus_docs"] == len(corpus)
    assert counts["facts"] == 5 * (6 + 12) and counts["heldout_facts"] == len(world["heldout_facts"]) == 18


def test_conversations_valid(data):
    for split, convs in data[1].items():
        for conv in convs:
            assert list(conv) == ["messages"], split
            msgs = conv["messages"]
            roles = [m["role"] for m in msgs]
            body = roles[1:] if roles[0] == "system" else roles
            assert body and body == ["user", "assistant"] * (len(body) // 2), (split, roles)
            for m in msgs:
                assert list(m) == ["role", "content"] and isinstance(m["content"], str) and m["content"].strip()
            answer = msgs[-1]["content"]
            assert len(answer.split()) <= 3 and answer[-1].isalnum(), answer


def test_heldout_facts_only_in_heldout(data):
    _, splits, _, world, _ = data
    held = {tuple(f) for f in world["heldout_facts"]}
    for split in ("train", "dev"):
        assert not held & {tuple(f) for f in world["asked"][split]}, split
    assert held <= {tuple(f) for f in world["asked"]["heldout"]}  # every held-out fact gets asked
    questions = {t.format(e=e) for e, a in held for t in TEMPLATES[a]["ask"]}
    for split in ("train", "dev"):  # independent of the bookkeeping: no direct question text leaks
        assert not questions & {q for c in splits[split] for q in users(c)}, split
    train_users = {tuple(users(c)) for c in splits["train"]}
    assert not any(tuple(users(c)) in train_users for c in splits["heldout"])
    train_convs = {json.dumps(c) for c in splits["train"]}
    assert not any(json.dumps(c) in train_convs for c in splits["dev"] + splits["heldout"])


def test_facts_in_corpus(data):
    _, _, corpus, world, _ = data
    for e, a in world["heldout_facts"]:
        value = world["entities"][e][a]
        assert any(e in d and value in d for d in corpus), (e, a, value)
    for name, ent in world["entities"].items():  # every fact, several times
        for attr, value in ent.items():
            if attr != "kind":
                assert sum(name in d and value in d for d in corpus) >= 3, (name, attr)


def test_no_chat_markers_in_corpus(data):
    assert not any(m in d for d in data[2] for m in MARKERS)


def test_task_mix(data):
    for split, convs in data[1].items():
        multi = [c for c in convs if len(users(c)) > 1]
        system = [c for c in convs if c["messages"][0]["role"] == "system"]
        arith = [c for c in convs if ARITH.search(users(c)[0])]
        passage = [c for c in convs if re.search(r"question:|passage", users(c)[0].lower())]
        assert multi and system and arith and passage, split
        assert len(system) == round(0.3 * len(convs)), split
        for c in passage:  # the answer is a span of the passage
            assert c["messages"][-1]["content"] in users(c)[0]
        for c in arith:
            a, op, b = re.search(r"(\d+) (\+|-|plus|minus) (\d+)", users(c)[0]).groups()
            assert int(c["messages"][-1]["content"]) == (int(a) + int(b) if op in "+plus" else int(a) - int(b))


@pytest.mark.parametrize("bad", [
    dict(heldout_frac=1.5), dict(system_frac=-0.1), dict(frac_fact=0.9), dict(n_towns=0),
    dict(n_people=5, n_towns=6), dict(n_syllables=3), dict(n_syllables=500), dict(max_turns=1),
    dict(n_towns=300, n_people=600, n_syllables=40),
])
def test_bad_config(bad):
    with pytest.raises(ValueError):
        config("synth", **bad)


def mc_fact(question: str, world: dict) -> tuple[str, str]:
    """The (entity, attribute) a multiple-choice question asks about, found from the question templates."""
    first = question.split("\n")[0] if not question.startswith("Choose") else question.split("\n")[1]
    hits = [(e, a) for e, ent in world["entities"].items() for a in ent if a != "kind"
            for t in TEMPLATES[a]["ask"] if first.startswith(t.format(e=e))]
    assert len(hits) == 1, (question, hits)
    return hits[0]


def test_multiple_choice_split(data, tmp_path):
    _, splits, _, world, out = data
    counts = generate(config("synth", **SMALL | dict(n_mc=30, n_mc_train=20)), str(tmp_path))
    assert counts["mc"] == 30 and counts["train"] == 300 + 20
    for f in ("corpus.jsonl", "dev.jsonl", "heldout.jsonl"):  # the MC stream leaves the other files alone
        assert (tmp_path / f).read_bytes() == (out / f).read_bytes(), f
    train = read_jsonl(tmp_path / "train.jsonl")
    assert train[:300] == splits["train"]
    held = {tuple(f) for f in world["heldout_facts"]}
    facts = {}
    for name, convs in (("mc", read_jsonl(tmp_path / "mc.jsonl")), ("train", train[300:])):
        facts[name] = set()
        for conv in convs:
            (user, gold) = [m["content"] for m in conv["messages"]]
            options = dict(re.findall(r"^([a-d])\) (.+)$", user, re.MULTILINE))
            assert list(options) == list("abcd")[: len(options)] and len(options) >= 2 and gold in options
            e, a = mc_fact(user, world)
            assert options[gold] == world["entities"][e][a]  # the gold letter labels the true value
            assert len(set(options.values())) == len(options)  # distractors differ from it and each other
            assert (e, a) not in held  # asked about known facts only
            facts[name].add((e, a))
    assert facts["mc"] and facts["train"] and not facts["mc"] & facts["train"]
    golds = [c["messages"][-1]["content"] for c in read_jsonl(tmp_path / "mc.jsonl")]
    assert len(set(golds)) >= 3  # the right answer is not always under the same letter
