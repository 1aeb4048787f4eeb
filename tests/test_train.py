import json
import math

import numpy as np
import pytest
import torch

from pipeline.common import setup_compute
from pipeline.pack import pack
from pipeline.train import accumulate_gradients, lr_at, make_optimizer, to_batch, total_steps, train
from tests.conftest import config, tiny_model
from tests.test_pack import conversations

CPU = setup_compute("cpu", "float32")


def packed_rows(n=60, block=48, seed=0):
    ids, labels = conversations(n, seed=seed, max_len=40)
    arrays, _ = pack(ids, labels, config("pack", block_size=block))
    return arrays


def test_schedule_matches_spec():
    cfg = config("train", lr=3e-4, warmup_frac=0.03, min_lr_frac=0.1)
    T = 1000
    W = 30
    assert lr_at(0, cfg, T) == pytest.approx(3e-4 / W)
    assert lr_at(W - 1, cfg, T) == pytest.approx(3e-4)
    assert lr_at(W, cfg, T) == pytest.approx(3e-4)
    mid = W + (T - W) // 2
    p = (mid - W) / (T - W)
    assert lr_at(mid, cfg, T) == pytest.approx(3e-4 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    assert lr_at(T - 1, cfg, T) == pytest.approx(3e-5, rel=1e-3)  # the floor: 10% of peak
    assert min(lr_at(t, cfg, T) for t in range(W, T)) >= 3e-5 - 1e-12  # never below the floor after warmup


def test_weight_decay_on_matrices_only():
    model = tiny_model(300)
    opt = make_optimizer(model, config("train"), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and all(p.dim() == 2 for p in decayed["params"])
    assert plain["weight_decay"] == 0.0 and all(p.dim() == 1 for p in plain["params"])
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["eps"] == 1e-8


def test_one_batch_of_8_equals_four_micro_batches_of_2():
    arrays = packed_rows()
    rows = list(range(8))
    grads = []
    for split in ([rows], [rows[i : i + 2] for i in range(0, 8, 2)]):
        model = tiny_model(300)
        micro = [to_batch(arrays, r, "cpu") for r in split]
        loss, n = accumulate_gradients(model, micro, CPU)
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # the trap it guards against: averaging micro-batch means weights tokens unequally, and differs here
    model = tiny_model(300)
    for r in split:
        loss_sum, n_micro = model(*to_batch(arrays, r, "cpu").inputs())
        (loss_sum / n_micro / len(split)).backward()
    assert any(not torch.allclose(a, p.grad, rtol=1e-3, atol=1e-6) for a, p in zip(grads[0], model.parameters()))


def test_tiny_model_overfits_8_rows():
    arrays = {k: v[:8] for k, v in packed_rows().items()}
    model = tiny_model(300)
    cfg = config("train", lr=1e-2, warmup_frac=0.0, max_steps=150, batch_size=8, weight_decay=0.0, device="cpu")
    summary = train(cfg, model, CPU, arrays, arrays, desc="overfit")
    assert summary["loss"] < 0.05 and summary["dev_loss"] < 0.05 and summary["skipped_steps"] == 0


def test_non_finite_steps_are_skipped_counted_and_stop_the_run():
    arrays = packed_rows()
    model = tiny_model(300)
    with torch.no_grad():
        model.blocks[0].mlp.up.weight[0, 0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    summary = train(config("train", max_steps=3, batch_size=4, max_bad_steps=5), model, CPU, arrays, None)
    assert summary["skipped_steps"] == 3
    assert all(torch.equal(a, b) or torch.isnan(a).any() for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="non-finite steps in a row"):
        train(config("train", max_steps=5, batch_size=4, max_bad_steps=2), model, CPU, arrays, None)


def test_logged_lr_is_the_schedule_stepped_per_optimizer_step(tmp_path):
    arrays = packed_rows()
    cfg = config("train", lr=1e-3, max_steps=12, batch_size=2, grad_accum=3, warmup_frac=0.25, eval_every=5)
    train(cfg, tiny_model(300), CPU, arrays, arrays, live_dir=str(tmp_path / "live"))
    logged = np.loadtxt(tmp_path / "live/plots/metrics/lr.tsv", skiprows=1)
    assert [int(s) for s in logged[:, 0]] == list(range(12))
    np.testing.assert_allclose(logged[:, 1], [lr_at(t, cfg, 12) for t in range(12)], rtol=1e-6)
    dev = np.loadtxt(tmp_path / "live/plots/metrics/dev_loss.tsv", skiprows=1, usecols=(0,))
    assert dev.tolist() == [0, 5, 10, 12]


def test_total_steps_from_epochs():
    assert total_steps(config("train", epochs=2.0, batch_size=4, grad_accum=2), 100) == 25
    assert total_steps(config("train", max_steps=7), 100) == 7
    with pytest.raises(ValueError):
        config("train", lr=0.0)


def test_bf16_autocast_on_the_cpu_tracks_fp32(tok, tmp_path):
    """The CUDA precision (bf16 autocast, fp32 weights and loss) run on the CPU: the matrix products really run in
    bf16, the loss curve stays within 1% of fp32 step by step, and generation and multiple choice under autocast
    agree with fp32 (greedy tokens; letter log-probabilities within 0.05)."""
    from pipeline.evaluate import mc_rows
    from pipeline.generate import generate

    ids, labels = conversations(60, max_len=40, vocab=tok.get_vocab_size())
    arrays, _ = pack(ids, labels, config("pack", block_size=48))
    runs = {}
    for dtype in ("float32", "bfloat16"):
        compute, model = setup_compute("cpu", dtype), tiny_model(tok.get_vocab_size())
        seen = []
        hook = model.blocks[0].attn.q.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
        cfg = config("train", max_steps=20, batch_size=4, lr=3e-3, device="cpu", dtype=dtype, save_every=0)
        train(cfg, model, compute, arrays, None, live_dir=str(tmp_path / dtype))
        hook.remove()
        assert set(seen) == {torch.bfloat16 if dtype == "bfloat16" else torch.float32}
        runs[dtype] = (compute, model, np.loadtxt(tmp_path / dtype / "plots/metrics/loss.tsv", skiprows=1)[:, 1])
    (bf16, _, bf16_loss), (_, model, fp32_loss) = runs["bfloat16"], runs["float32"]
    assert len(fp32_loss) == 20 and fp32_loss[-1] < fp32_loss[0]
    np.testing.assert_allclose(bf16_loss, fp32_loss, rtol=1e-2)
    prompts = [x[:n].tolist() for x, n in zip(ids, (3, 8, 17, 30))]
    reference = generate(model, prompts, 10, stop_id=-1)
    with bf16.autocast():
        assert generate(model, prompts, 10, stop_id=-1) == reference
    questions = [[{"role": "user", "content": f"Q{i}?\na) x\nb) y\nc) z"}, {"role": "assistant", "content": "b"}]
                 for i in range(4)]
    letters = [mc_rows(model, tok, questions, 8, c, "m") for c in (CPU, bf16)]
    for a, b in zip(*letters):
        assert json.loads(b["letter_logprobs"]) == pytest.approx(json.loads(a["letter_logprobs"]), abs=0.05)
