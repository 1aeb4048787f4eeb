import os
import shutil
import warnings

import pytest
import torch

import pipeline.generate as generate_module
from pipeline.generate import KVCache, Sampling, generate, pick
from tests.conftest import skip_or_fail, tiny_model

STOP = 4
PROMPTS = [[1, 40, 41, 42, 4, 2], [1, 50, 4, 2], [3, 60, 61, 4, 1, 62, 63, 64, 4, 2], [2], [1, 70, 71, 4, 2]]


def one_by_one(model, prompt: list[int], max_new_tokens: int, stop_id: int) -> list[int]:
    """Reference: greedy decoding without a cache, without a batch, re-reading the whole sequence each step."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == stop_id:
                break
    return seq[len(prompt):]


def test_batched_cached_greedy_equals_one_by_one(tok):
    model = tiny_model(tok.get_vocab_size()).eval()
    batched = generate(model, PROMPTS, max_new_tokens=12, stop_id=STOP)
    for prompt, out in zip(PROMPTS, batched):
        assert out == one_by_one(model, prompt, 12, STOP)


def test_rows_stop_on_their_own_and_finished_rows_are_dropped(tok, monkeypatch):
    """The stop id is chosen among the tokens the model really writes, at different steps in different rows:
    rows stop on their own, the batch shrinks (compaction), and every row still equals its one-by-one decoding."""
    model = tiny_model(tok.get_vocab_size(), seed=1, init_std=0.5).eval()  # large weights: varied outputs
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, tok.get_vocab_size(), (int(n),), generator=g).tolist()
               for n in torch.randint(1, 12, (12,), generator=g)]
    free = generate(model, prompts, max_new_tokens=16, stop_id=-1)  # no stop: every row runs 16 tokens
    first = {}  # token -> first step it appears, per row
    for row in free:
        for t in set(row):
            first.setdefault(t, []).append(row.index(t))
    stop = max(first, key=lambda t: (len(set(first[t])), len(first[t])))
    assert len(set(first[stop])) >= 3, "need a token that appears first at several different steps"
    kept = []  # batch sizes after each compaction
    keep = KVCache.keep
    monkeypatch.setattr(KVCache, "keep", lambda self, rows: (kept.append(len(rows)), keep(self, rows)))
    outs = generate(model, prompts, max_new_tokens=16, stop_id=stop)
    assert kept and kept == sorted(kept, reverse=True) and kept[-1] < len(prompts)  # the batch shrank
    assert outs == [one_by_one(model, p, 16, stop) for p in prompts]
    assert len({len(o) for o in outs}) >= 3
    for out, row in zip(outs, free):
        n = row.index(stop) + 1 if stop in row else 16
        assert out == row[:n]  # the free run up to and including its first stop


def test_pick_greedy_top_k_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0, -1.0]]).repeat(400, 1)
    assert pick(logits, Sampling(), None).tolist() == [1] * 400
    gen = torch.Generator().manual_seed(0)
    top2 = pick(logits, Sampling(temperature=1.0, top_k=2), gen)
    assert set(top2.tolist()) == {1, 2}  # only the two most likely, and both occur in 400 draws
    # probabilities ~ [.03, .64, .24, .09, .01]: top_p 0.8 keeps {1, 2} (0.64 < 0.8, 0.88 >= 0.8)
    nucleus = pick(logits, Sampling(temperature=1.0, top_p=0.8), gen)
    assert set(nucleus.tolist()) == {1, 2}
    assert set(pick(logits, Sampling(temperature=1.0, top_p=0.5), gen).tolist()) == {1}
    hot = pick(logits, Sampling(temperature=5.0), gen)
    assert len(set(hot.tolist())) == 5  # a high temperature flattens the distribution: every token occurs


def test_sampling_is_seeded_and_differs_from_greedy(tok):
    model = tiny_model(tok.get_vocab_size()).eval()
    s = Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=7)
    a = generate(model, PROMPTS, 10, STOP, s)
    assert a == generate(model, PROMPTS, 10, STOP, s)
    assert a != generate(model, PROMPTS, 10, STOP, Sampling(temperature=1.5, top_k=50, top_p=0.95, seed=8))
    assert a != generate(model, PROMPTS, 10, STOP)


def test_bad_sampling_params():
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)
    with pytest.raises(ValueError):
        Sampling(temperature=-1.0)


def test_compile_failure_falls_back_to_eager(tok, monkeypatch):
    """Where torch.compile cannot build (no C++ compiler, old torch), generate warns and decodes eagerly."""
    model = tiny_model(tok.get_vocab_size()).eval()
    eager = generate(model, PROMPTS, 12, STOP)

    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(generate_module, "_compiled_hidden", None)  # built afresh with the broken compile
    with pytest.warns(UserWarning, match="torch.compile failed"):
        assert generate(model, PROMPTS, 12, STOP, compile=True) == eager
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not retried: no second warning
        assert generate(model, PROMPTS, 12, STOP, compile=True) == eager


@pytest.mark.slow
def test_compiled_decoding_equals_eager(tok, monkeypatch):
    """The compiled decoding step really compiles (a fallback to eager would warn: an error here) and decodes the
    same tokens. About a minute on 2 CPU cores."""
    if not shutil.which(os.environ.get("CXX", "c++")):
        skip_or_fail("compiling needs a C++ compiler")
    monkeypatch.setattr(generate_module, "_compiled_hidden", None)  # whatever an earlier test left
    model = tiny_model(tok.get_vocab_size(), seed=1, init_std=0.5).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        for prompts in (PROMPTS, PROMPTS[:1]):  # a batch, and a batch of one (its own graph)
            assert generate(model, prompts, 12, STOP, compile=True) == generate(model, prompts, 12, STOP)
