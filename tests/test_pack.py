import numpy as np
import pytest

from pipeline.chat import IGNORE_INDEX
from pipeline.pack import PackConfig, best_fit_decreasing, load_packed, pack, read_rendered, save_packed, write_rendered


def conversations(n, seed=0, max_len=60):
    rng = np.random.default_rng(seed)
    ids = [rng.integers(5, 300, rng.integers(3, max_len)).astype(np.int32) for _ in range(n)]
    labels = [np.where(rng.random(len(x)) < 0.4, x, IGNORE_INDEX).astype(np.int32) for x in ids]
    return ids, labels


def test_packing_loses_duplicates_and_splits_nothing():
    ids, labels = conversations(300)
    arrays, report = pack(ids, labels, PackConfig(block_size=64))
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
    rows = best_fit_decreasing([5, 3, 7, 1, 4, 2, 6], 8)
    assert sorted(i for r in rows for i in r) == list(range(7))
    assert all(sum([5, 3, 7, 1, 4, 2, 6][i] for i in r) <= 8 for r in rows)
    assert len(rows) == 4  # 28 tokens in rows of 8: the minimum


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_overlong_policy_is_counted(policy):
    ids, labels = conversations(20, max_len=20)
    ids.append(np.arange(5, 45, dtype=np.int32))
    labels.append(np.arange(5, 45, dtype=np.int32))
    arrays, report = pack(ids, labels, PackConfig(block_size=32, overlong=policy))
    if policy == "drop":
        assert report["dropped_overlong"] == 1 and report["packed"] == 20 and 20 not in arrays["doc"]
        assert report["tokens_dropped"] == 40
    else:
        assert report["truncated"] == 1 and report["packed"] == 21 and report["tokens_dropped"] == 8
        assert (arrays["doc"] == 20).sum() == 32


def test_rendered_and_packed_files_round_trip(tmp_path):
    ids, labels = conversations(10)
    path = str(tmp_path / "r.parquet")
    write_rendered(path, [x.tolist() for x in ids], [x.tolist() for x in labels], list(range(10)))
    ids2, labels2, rows = read_rendered(path)
    assert all(np.array_equal(a, b) for a, b in zip(ids, ids2)) and rows.tolist() == list(range(10))
    arrays, _ = pack(ids2, labels2, PackConfig(block_size=64))
    save_packed(arrays, str(tmp_path / "p"))
    loaded = load_packed(str(tmp_path / "p"))
    assert all(np.array_equal(arrays[k], loaded[k]) for k in arrays)
