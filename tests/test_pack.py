import re

import numpy as np
import pytest

from pipeline.common import IGNORE_INDEX
from pipeline.pack import (
    best_fit_decreasing,
    fit,
    length_histogram,
    load_packed,
    pack,
    pack_rendered,
    read_index,
    save_packed,
    split_pieces,
    weighted_order,
)
from tests.conftest import config, read_rendered, write_rendered


def conversations(n, seed=0, max_len=60, vocab=300):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, vocab, rng.integers(3, max_len)).astype(np.int32) for _ in range(n)]
    labels = [np.where(rng.random(len(x)) < 0.4, x, IGNORE_INDEX).astype(np.int32) for x in ids]
    return ids, labels


def test_packing_loses_duplicates_and_splits_nothing():
    ids, labels = conversations(300)
    arrays, report = pack(ids, labels, config("pack", block_size=64))
    seen = {}
    for r in range(len(arrays["ids"])):
        doc = arrays["doc"][r]
        for d in np.unique(doc[doc >= 0]):
            where = np.flatnonzero(doc == d)
            assert d not in seen, "a conversation appears in two rows (split or duplicated)"
            assert np.all(np.diff(where) == 1), "a conversation is not contiguous"
            seen[d] = True
            np.testing.assert_array_equal(arrays["ids"][r, where], ids[d])
            np.testing.assert_array_equal(arrays["labels"][r, where], labels[d])
            np.testing.assert_array_equal(arrays["pos"][r, where], np.arange(len(ids[d])))  # positions restart
        pad = doc < 0
        assert np.all(arrays["labels"][r, pad] == IGNORE_INDEX)
    assert sorted(seen) == list(range(300))
    assert report["tokens_packed"] == report["tokens_in"] == sum(map(len, ids))
    assert report["utilisation"] > 0.95


def test_best_fit_decreasing_fills_rows_tightly():
    lengths = np.array([5, 3, 7, 1, 4, 2, 6])
    row, offset, n = best_fit_decreasing(lengths, 8)
    assert n == 4  # 28 tokens in rows of 8: the minimum
    for r in range(n):  # each row's conversations lie end to end from offset 0, within the row
        mine = np.flatnonzero(row == r)
        mine = mine[np.argsort(offset[mine])]
        assert offset[mine[0]] == 0 and np.all(offset[mine[1:]] == (offset + lengths)[mine[:-1]])
        assert (offset + lengths)[mine[-1]] <= 8
    assert row.tolist() == [2, 2, 0, 0, 3, 1, 1] and offset.tolist() == [0, 5, 0, 7, 0, 6, 0]  # longest first


@pytest.mark.parametrize("policy", ["drop", "truncate", "fail"])
def test_overlong_policy_is_counted(policy):
    ids, labels = conversations(20, max_len=20)
    # user turn (10 tokens), then the last assistant turn starting at 11: 40 tokens in all
    long = np.array([1] + [7] * 9 + [4] + [2] + [9] * 27 + [4], np.int32)
    ids.append(long)
    labels.append(np.where(np.arange(40) > 11, long, IGNORE_INDEX).astype(np.int32))
    # a conversation whose last assistant turn starts after the cut cannot be truncated to its tail
    late = np.array([1] + [7] * 35 + [4] + [2] + [9, 4], np.int32)
    ids.append(late)
    labels.append(np.where(np.arange(40) > 37, late, IGNORE_INDEX).astype(np.int32))
    cfg = config("pack", block_size=32, overlong=policy)
    if policy == "fail":
        with pytest.raises(ValueError, match="conversation 20: 40 tokens > pack.block_size=32"):
            pack(ids, labels, cfg)
        return
    arrays, report = pack(ids, labels, cfg, header=(2,))  # <|assistant|>: truncation keeps the answer's head
    assert report["conversations"] == report["packed"] + report["dropped_overlong"]
    if policy == "drop":
        assert report["dropped_overlong"] == 2 and report["packed"] == 20 and 20 not in arrays["doc"]
        assert report["tokens_dropped"] == 80
    else:
        assert report["truncated"] == 1 and report["dropped_overlong"] == 1 and report["tokens_dropped"] == 8 + 40
        where = arrays["doc"] == 20
        np.testing.assert_array_equal(arrays["ids"][where], long[:32])  # the head is whole, the answer's tail cut
        np.testing.assert_array_equal(arrays["labels"][where], labels[20][:32])
        assert 21 not in arrays["doc"]


def test_weights_repeat_and_subsample_by_seed():
    sources = np.array(["a"] * 10 + ["b"] * 20 + ["c"] * 5, dtype=object)
    order = weighted_order(sources, {"a": 2.0, "b": 0.25}, seed=3)
    picked = sources[order]
    assert (picked == "a").sum() == 20 and (picked == "b").sum() == 5 and (picked == "c").sum() == 5
    assert np.bincount(order[picked == "a"], minlength=10).tolist() == [2] * 10  # every row twice
    assert len(set(order[picked == "b"].tolist())) == 5  # a sample without repeats
    np.testing.assert_array_equal(order, weighted_order(sources, {"a": 2.0, "b": 0.25}, seed=3))
    assert not np.array_equal(order, weighted_order(sources, {"a": 2.0, "b": 0.25}, seed=4))
    assert len(weighted_order(sources, {"c": 0}, seed=0)) == 30
    with pytest.raises(ValueError, match="unknown sources"):
        weighted_order(sources, {"z": 1.0}, seed=0)
    with pytest.raises(ValueError):
        config("pack", weights={"a": -1})


def test_report_per_source_and_memmap_output(tmp_path):
    ids, labels = conversations(60, max_len=40)
    sources = np.array(["x"] * 20 + ["y"] * 40, dtype=object)
    ids[0] = np.full(50, 9, np.int32)  # one overlong conversation in x
    labels[0] = ids[0].copy()
    cfg = config("pack", block_size=48)
    arrays, report = pack(ids, labels, cfg, sources=sources)
    x, y = report["sources"]["x"], report["sources"]["y"]
    assert x["dropped_overlong"] == 1 and y["dropped_overlong"] == 0 and x["tokens_dropped"] == 50
    assert x["token_share_before"] + y["token_share_before"] == pytest.approx(1.0)
    assert x["token_share_after"] + y["token_share_after"] == pytest.approx(1.0)
    assert x["token_share_after"] < x["token_share_before"]
    assert report["padding_tokens"] == report["rows"] * 48 - report["tokens_packed"]
    assert report["utilisation"] <= report["ideal_utilisation"] <= 1.0
    mm, report2 = pack(ids, labels, cfg, sources=sources, out=str(tmp_path / "p"))
    loaded = load_packed(str(tmp_path / "p"))
    assert report2 == report and all(np.array_equal(arrays[k], loaded[k]) for k in arrays)
    hist = length_histogram(np.array([0, 1, 47, 48, 100]), 48, bins=16)
    assert hist[0] == {"length": 0, "conversations": 2} and hist[-1] == {"length": 48, "conversations": 2}
    assert sum(h["conversations"] for h in hist) == 5


def test_rendered_and_packed_files_round_trip(tmp_path):
    ids, labels = conversations(10)
    path = str(tmp_path / "r.parquet")
    write_rendered(path, [x.tolist() for x in ids], [x.tolist() for x in labels], list(range(10)))
    ids2, labels2, rows = read_rendered(path)
    assert all(np.array_equal(a, b) for a, b in zip(ids, ids2)) and rows.tolist() == list(range(10))
    arrays, _ = pack(ids2, labels2, config("pack", block_size=64))
    save_packed(arrays, str(tmp_path / "p"))
    loaded = load_packed(str(tmp_path / "p"))
    assert all(np.array_equal(arrays[k], loaded[k]) for k in arrays)


@pytest.mark.parametrize("policy", ["drop", "truncate", "fail"])
def test_pack_rendered_streams_the_same_rows_as_pack_in_memory(tmp_path, policy):
    ids, labels = conversations(300, max_len=50)
    for i in (7, 150, 299):  # overlong, with an assistant header (2) early enough to truncate after it
        ids[i] = np.array([1] + [7] * 5 + [4, 2] + [9] * (40 + i % 11), np.int32)
        labels[i] = np.where(np.arange(len(ids[i])) > 7, ids[i], IGNORE_INDEX).astype(np.int32)
    sources = ["a"] * 120 + ["b"] * 100 + ["c"] * 80
    rows = list(range(120)) + list(range(100)) + list(range(80))
    path = str(tmp_path / "r.parquet")
    write_rendered(path, [x.tolist() for x in ids], [x.tolist() for x in labels], rows, sources, row_group_size=64)
    cfg = config("pack", block_size=48, overlong=policy)
    index = read_index(path, cfg)
    assert index.lengths.tolist() == [len(x) for x in ids] and index.sources.tolist() == sources
    order = weighted_order(index.sources, {"a": 1.5, "b": 2.0, "c": 0.5}, seed=2)
    in_memory = ([ids[i] for i in order], [labels[i] for i in order], cfg, index.sources[order], index.rows[order])
    if policy == "fail":
        with pytest.raises(ValueError, match="tokens > pack.block_size=48") as e:
            pack(*in_memory)
        with pytest.raises(ValueError, match=re.escape(str(e.value))):  # the same conversation is named
            pack_rendered(path, index, order, cfg, str(tmp_path / "p"))
        return
    arrays, report = pack(*in_memory, header=(2,))
    for window in (None, 7):  # output rows per window: all at once, or filled 7 rows at a time
        assert pack_rendered(path, index, order, cfg, str(tmp_path / "p"), window) == report
        loaded = load_packed(str(tmp_path / "p"))
        assert all(np.array_equal(arrays[k], loaded[k]) for k in arrays)
        assert sorted(p.name for p in (tmp_path / "p").iterdir()) == sorted(f"{k}.npy" for k in arrays)  # no spill
    assert report["dropped_overlong"] > 0 and (report["truncated"] > 0) == (policy == "truncate")


def test_pack_stage_weights_sources_and_writes_plots(tmp_path, monkeypatch, tok):
    import json

    from pipeline.render import render_split
    from stages.pack import main
    from tests.conftest import CONVERSATIONS, write_params

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    (src / "b.jsonl").write_text("".join(json.dumps({"messages": CONVERSATIONS[0]}) + "\n" for _ in range(8)))
    for split in ("train", "dev"):
        render_split(str(src), tok, config("render"), str(tmp_path / "rendered" / f"{split}.parquet"))
    write_params(tmp_path, pack={"block_size": 64, "overlong": "drop", "seed": 1, "weights": {"a": 3.0, "b": 0.5}})
    (tmp_path / "base").mkdir()
    (tmp_path / "base/config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    monkeypatch.chdir(tmp_path)
    main("rendered", "base", "packed", "pack.json", "lengths")
    report = json.loads((tmp_path / "pack.json").read_text())
    train, dev = report["train"], report["dev"]
    assert train["one_per_row"] is False and train["rows"] < train["conversations"]
    assert train["sources"]["a"]["conversations"] == 12 and train["sources"]["b"]["conversations"] == 4
    assert dev["sources"]["a"]["conversations"] == 4 and dev["sources"]["b"]["conversations"] == 8  # not weighted
    assert train["conversations"] == train["packed"] == 16
    packed = load_packed(str(tmp_path / "packed" / "train"))
    assert len(np.unique(packed["doc"][packed["doc"] >= 0])) == 16  # each copy is its own document
    rows = (tmp_path / "lengths" / "train.csv").read_text().splitlines()
    assert rows[0] == "length,conversations" and sum(int(r.split(",")[1]) for r in rows[1:]) == 16


def exchanges(*lengths):
    """A markers conversation of exchanges (user length, answer length): <|user|> u.. <|end|> <|assistant|> a.. <|end|>
    per exchange (ids 1, 2, 4 as in the bundled tokenizer); labels train the answers and their <|end|>."""
    ids, labels = [], []
    for u, a in lengths:
        ids += [1] + [7] * u + [4] + [2] + [9] * a + [4]
        labels += [IGNORE_INDEX] * (u + 3) + [9] * a + [4]
    return np.array(ids, np.int32), np.array(labels, np.int32)


def test_exchanges_policy_keeps_whole_leading_exchanges_and_cuts_a_first_answer_without_its_end():
    x, lab = exchanges((5, 10), (5, 10), (5, 10))  # 19 tokens an exchange
    exchanges_fit = lambda x, lab, B: fit(x, B, "exchanges", header=(2,), user_header=(1,), labels=lab)  # noqa: E731
    assert exchanges_fit(x, lab, 40) == 38  # two whole exchanges
    assert exchanges_fit(x, lab, 38) == 38
    assert exchanges_fit(x, lab, 37) == 19  # one
    assert fit(x, 40, "truncate", header=(2,)) == 0  # truncate cuts the last answer only: its header is at 45
    long_first, lab = exchanges((5, 40), (5, 10))
    assert exchanges_fit(long_first, lab, 20) == 20  # the first answer, cut
    assert long_first[:20].tolist().count(4) == 1  # only the user's <|end|>: the cut answer has no end token
    assert exchanges_fit(long_first, lab, 8) == 0  # not even the prompt fits
    late = lab.copy()
    late[:45] = IGNORE_INDEX  # nothing trained before 45: a row of 40 would train nothing, so it is dropped
    assert exchanges_fit(long_first, late, 40) == 0 and exchanges_fit(long_first, late, 47) == 47


def test_exchanges_policy_in_the_packed_rows_and_the_report(tmp_path):
    convs = [exchanges((5, 10), (5, 10), (5, 10)), exchanges((3, 4)), exchanges((5, 40), (5, 10))]
    ids, labels = [c[0] for c in convs], [c[1] for c in convs]
    cfg = config("pack", block_size=40, overlong="exchanges")
    arrays, report = pack(ids, labels, cfg, header=(2,), user_header=(1,))
    assert report["packed"] == 3 and report["truncated"] == 2 and report["exchanges_left_out"] == 1 + 1
    assert report["tokens_packed"] == 38 + 11 + 40 and report["tokens_dropped"] == report["tokens_in"] - 89
    cut = arrays["labels"][arrays["doc"] == 2]
    assert (cut != IGNORE_INDEX).sum() == 40 - 8 and 4 not in cut.tolist()  # trained, but no end token
    path = str(tmp_path / "r.parquet")
    write_rendered(path, [x.tolist() for x in ids], [x.tolist() for x in labels], [0, 1, 2], ["all"] * 3)
    index = read_index(path, cfg)
    assert pack_rendered(path, index, np.arange(3), cfg, str(tmp_path / "p")) == report


SYSTEM = [3, 8, 8, 4]  # <|system|> .. <|end|>: the opening a split conversation's every piece carries


def with_opening(*lengths, opening=SYSTEM, trained_answers=None):
    """exchanges(...) after a system turn; trained_answers: which answers are trained (all by default)."""
    x, lab = exchanges(*lengths)
    if trained_answers is not None:
        at = 0
        for j, (u, a) in enumerate(lengths):
            if j not in trained_answers:
                lab[at : at + u + a + 4] = IGNORE_INDEX
            at += u + a + 4
    return (np.array(opening + x.tolist(), np.int32),
            np.array([IGNORE_INDEX] * len(opening) + lab.tolist(), np.int32))


def test_split_policy_makes_rows_of_whole_exchanges_each_with_the_opening():
    x, lab = with_opening((5, 10), (5, 10), (5, 10))  # 4 + 3 x 19 tokens; user turns at 4, 23, 42
    assert split_pieces(x, lab, 30, (1,)).tolist() == [[0, 0, 23], [4, 23, 19], [4, 42, 19]]
    assert split_pieces(x, lab, 61, (1,)).tolist() == [[0, 0, 61]]
    assert split_pieces(x, lab, 42, (1,)).tolist() == [[0, 0, 42], [4, 42, 19]]
    long_middle, lab2 = with_opening((5, 10), (5, 40), (5, 10))  # the second exchange (49 tokens) fits no row of 30
    assert split_pieces(long_middle, lab2, 30, (1,)).tolist() == [[0, 0, 23], [4, 23, 26], [4, 72, 19]]
    assert 4 not in long_middle[23 : 23 + 26][8:].tolist()  # its answer, cut: no end token
    last_only, lab3 = with_opening((5, 10), (5, 10), (5, 10), trained_answers={2})  # train_on: last_assistant
    assert split_pieces(last_only, lab3, 30, (1,)).tolist() == [[4, 42, 19]]  # pieces that train nothing are left out
    assert split_pieces(x, lab, 12, (1,)).size == 0  # rows of 12 hold an opening and a user turn, no answer: none kept
    assert split_pieces(x, lab, 4, (1,)).size == 0  # the opening alone fills a row


def test_split_policy_in_the_packed_rows_and_the_report(tmp_path):
    convs = [with_opening((5, 10), (5, 10), (5, 10)), with_opening((3, 4)), with_opening((5, 10), (5, 40), (5, 10))]
    ids, labels = [c[0] for c in convs], [c[1] for c in convs]
    cfg = config("pack", block_size=30, overlong="split")
    arrays, report = pack(ids, labels, cfg, header=(2,), user_header=(1,))
    assert report["packed"] == 3 and report["split"] == 2 and report["exchanges_left_out"] == 0
    assert report["tokens_packed"] == 61 + 15 + (23 + 26 + 19) and report["tokens_repeated"] == 4 * 4
    assert report["truncated"] == 1 and report["tokens_dropped"] == report["tokens_in"] - report["tokens_packed"]
    assert report["utilisation"] == (report["tokens_packed"] + report["tokens_repeated"]) / (report["rows"] * 30)
    docs = np.unique(arrays["doc"][arrays["doc"] >= 0])
    assert len(docs) == 3 + 2 + 2  # every piece its own document
    ends = 0
    for d in docs:
        where = arrays["doc"] == d
        x, y, pos = arrays["ids"][where], arrays["labels"][where], arrays["pos"][where]
        assert x[:4].tolist() == SYSTEM and (y[:4] == IGNORE_INDEX).all() and pos.tolist() == list(range(len(x)))
        assert x[4] == 1  # then whole exchanges from a user turn
        trained = np.flatnonzero(y != IGNORE_INDEX)
        ends += x[trained[-1]] == 4  # ends on an answer's end token, trained, but for the cut answer
    assert ends == len(docs) - 1
    path = str(tmp_path / "r.parquet")
    write_rendered(path, [x.tolist() for x in ids], [x.tolist() for x in labels], [0, 1, 2], ["all"] * 3)
    assert pack_rendered(path, read_index(path, cfg), np.arange(3), cfg, str(tmp_path / "p")) == report
    assert all(np.array_equal(arrays[k], load_packed(str(tmp_path / "p"))[k]) for k in arrays)


@pytest.mark.parametrize("policy", ["exchanges", "split"])
def test_pack_rendered_streams_the_same_rows_as_pack_in_memory_by_exchanges(tmp_path, policy):
    """Many multi-exchange conversations, weighted and shuffled (repeats of a split conversation included), packed
    in windows: the streamed pack writes what the in-memory one does."""
    rng = np.random.default_rng(4)
    convs = [with_opening(*[(int(rng.integers(1, 12)), int(rng.integers(1, 45))) for _ in range(rng.integers(1, 5))],
                          opening=SYSTEM if rng.random() < 0.5 else [])
             for _ in range(200)]
    ids, labels = [c[0] for c in convs], [c[1] for c in convs]
    sources = ["a"] * 120 + ["b"] * 80
    path = str(tmp_path / "r.parquet")
    write_rendered(path, [x.tolist() for x in ids], [x.tolist() for x in labels], list(range(200)), sources,
                   row_group_size=32)
    cfg = config("pack", block_size=48, overlong=policy)
    index = read_index(path, cfg)
    order = weighted_order(index.sources, {"a": 1.5, "b": 2.0}, seed=3)
    arrays, report = pack([ids[i] for i in order], [labels[i] for i in order], cfg, index.sources[order],
                          index.rows[order], header=(2,), user_header=(1,))
    assert report["truncated"] > 0 and (report["split"] > 0) == (policy == "split")
    for window in (None, 5):
        assert pack_rendered(path, index, order, cfg, str(tmp_path / "p"), window) == report
        loaded = load_packed(str(tmp_path / "p"))
        assert all(np.array_equal(arrays[k], loaded[k]) for k in arrays)
