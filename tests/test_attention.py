"""Packed-row attention (SDPA + boolean mask on CPU, FlexAttention block mask on CUDA), the chunked
output-layer loss and activation checkpointing, each against a plain reference."""
import pytest
import torch

import pipeline.model as model_module
from pipeline.common import IGNORE_INDEX, Compute, setup_compute
from pipeline.model import doc_causal_mask, output_loss
from pipeline.train import configure
from tests.conftest import config, skip_or_fail, tiny_model

V = 300


def packed_row(lengths=(7, 12, 5), pad=4, seed=0):
    """One row of len(lengths) conversations then padding, with the conversations on their own."""
    g = torch.Generator().manual_seed(seed)
    convs = [torch.randint(5, V, (n,), generator=g) for n in lengths]
    ids = torch.cat(convs + [torch.zeros(pad, dtype=torch.long)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths] + [torch.zeros(pad, dtype=torch.long)])[None]
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)] + [torch.full((pad,), -1)])[None]
    return convs, ids, pos, doc


def test_cpu_mask_path_equals_each_conversation_alone_forward_and_backward():
    convs, ids, pos, doc = packed_row()
    model = tiny_model(V)
    configure(model, config("train"), setup_compute("cpu", "float32"))
    assert not model.use_flex  # FlexAttention has no CPU backward: the CPU keeps SDPA with a boolean mask
    labels = torch.where(doc >= 0, ids, IGNORE_INDEX)
    loss, n = model(ids, labels, pos, doc)
    loss.backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    alone, n_alone = 0.0, 0
    for c in convs:
        part, k = model(c[None], c[None])
        alone, n_alone = alone + part, n_alone + int(k)
    alone.backward()
    assert int(n) == n_alone == sum(len(c) - 1 for c in convs)
    torch.testing.assert_close(loss, alone, rtol=1e-5, atol=1e-5)
    for a, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-6)


def assert_flex_equals_sdpa(model, ids, pos, doc) -> None:
    """The model's logits on real tokens are the same through FlexAttention (eager, forward) as through SDPA."""
    with torch.no_grad():
        model.use_flex = False
        dense = model(ids, pos=pos, doc=doc)
        model.use_flex = True
        block = model(ids, pos=pos, doc=doc)
    torch.testing.assert_close(block[doc >= 0], dense[doc >= 0], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_block_mask_path_equals_dense_mask_path(monkeypatch):
    """The CUDA path's mask rule, run here with eager FlexAttention (forward works on CPU; only its backward
    and the fused kernel need CUDA): same outputs as the boolean-mask SDPA path, GQA included."""
    if model_module.flex_attention is None:
        skip_or_fail("this torch has no FlexAttention")
    monkeypatch.setattr(model_module, "_flex_compiled", model_module.flex_attention)
    _, ids, pos, doc = packed_row(lengths=(40, 70, 11), pad=7)
    ids, pos, doc = ids.repeat(2, 1), pos.repeat(2, 1), doc.repeat(2, 1)
    doc[1] = torch.where(doc[1] >= 0, 2 - doc[1], -1)  # a second row with other conversation numbers
    assert_flex_equals_sdpa(tiny_model(V).eval(), ids, pos, doc)
    mask = model_module.flex_block_mask(doc)
    dense_rule = doc_causal_mask(doc)[:, 0]
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(128), torch.arange(128), indexing="ij")
    assert torch.equal(mask.mask_mod(b, 0, q, kv), dense_rule)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_block_mask_over_several_blocks_skips_the_empty_ones(monkeypatch):
    """A 512-token row of conversations that cross the 128-token block edges: FlexAttention's output equals the
    SDPA path's, and its block mask holds exactly the 128x128 tiles where some query may attend to some key, so the
    tiles of other conversations and of the future are skipped, not computed and discarded."""
    monkeypatch.setattr(model_module, "_flex_compiled", model_module.flex_attention)  # eager: forward on the CPU
    lengths = (100, 230, 90, 70)  # edges at 100, 330, 420, 490: three of them inside a block
    _, ids, pos, doc = packed_row(lengths=lengths, pad=512 - sum(lengths))
    assert_flex_equals_sdpa(tiny_model(V, max_seq_len=512).eval(), ids, pos, doc)
    mask = model_module.flex_block_mask(doc)
    tiles = doc_causal_mask(doc)[0, 0].reshape(4, 128, 4, 128).any(-1).any(1)  # (query block, key block)
    assert torch.equal(mask.to_dense()[0, 0].bool(), tiles)
    assert tiles.sum() == 8 and not tiles[3, :2].any()  # of the 10 causal tiles, (3, 0) and (3, 1) hold no pair
    assert mask.sparsity() == pytest.approx(100 * (16 - 8) / 16)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_flex_is_configured_on_cuda_and_the_cpu_keeps_sdpa(monkeypatch):
    """configure() turns FlexAttention on for a CUDA device (where it has a backward) and never on the CPU; with it
    on, attention calls the compiled FlexAttention with the block mask."""
    no_compile = config("train", compile=False)
    model = tiny_model(V)
    configure(model, no_compile, setup_compute("cpu", "float32"))
    assert not model.use_flex
    configure(model, no_compile, Compute(torch.device("cuda"), torch.bfloat16))  # no GPU is touched
    assert model.use_flex == (model_module.flex_attention is not None)
    calls = []
    monkeypatch.setattr(model_module, "flex", lambda q, k, v, m: calls.append(type(m).__name__) or
                        model_module.flex_attention(q, k, v, block_mask=m, enable_gqa=True))
    _, ids, pos, doc = packed_row()
    with torch.no_grad():
        model(ids, pos=pos, doc=doc)
    assert calls == ["BlockMask"] * model.arch.n_layer


@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_chunked_loss_equals_plain_loss_with_gradients(chunk):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=g, requires_grad=True)
    w = torch.randn(V, 16, generator=g, requires_grad=True)
    t = torch.randint(0, V, (50,), generator=g)
    plain = torch.nn.functional.cross_entropy(h @ w.T, t, reduction="sum")
    plain_grads = torch.autograd.grad(plain, (h, w))
    chunked = output_loss(h, w, t, chunk)
    chunked_grads = torch.autograd.grad(chunked, (h, w))
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-4)
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_model_loss_with_chunks_and_activation_checkpointing_matches_plain():
    _, ids, pos, doc = packed_row(lengths=(30, 20, 9), pad=5)
    labels = torch.where(doc >= 0, ids, IGNORE_INDEX)
    results = []
    for chunk, ckpt in ((0, False), (8, False), (8, True)):
        model = tiny_model(V)
        model.loss_chunk, model.checkpointing = chunk, ckpt
        loss, _ = model(ids, labels, pos, doc)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-4)
        for a, b in zip(grads, results[0][1]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_under_bf16_autocast_q_k_v_reach_flex_attention_in_one_dtype(monkeypatch):
    """bf16 autocast as on CUDA, with the FlexAttention path forced on (forward only on the CPU): RoPE must not
    turn the bf16 q and k back into fp32 next to a bf16 v (FlexAttention refuses mixed dtypes on torch < 2.11 and
    runs attention in fp32 on newer ones); the output matches the SDPA path within bf16 tolerance."""
    seen = []

    def spy(q, k, v, block_mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return model_module.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])

    monkeypatch.setattr(model_module, "flex", spy)
    bf16 = setup_compute("cpu", "bfloat16")
    _, ids, pos, doc = packed_row(lengths=(100, 90, 60), pad=6)  # 256 tokens: two blocks
    model = tiny_model(V, max_seq_len=256).eval()
    with torch.no_grad(), bf16.autocast():
        sdpa = model(ids, pos=pos, doc=doc)
        model.use_flex = True
        flex = model(ids, pos=pos, doc=doc)
    assert seen == [(torch.bfloat16,) * 3] * model.arch.n_layer
    torch.testing.assert_close(flex[doc >= 0], sdpa[doc >= 0], rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        fp32 = model(ids, pos=pos, doc=doc)  # outside autocast everything stays fp32
    assert seen[-1] == (torch.float32,) * 3 and torch.allclose(fp32[doc >= 0], sdpa[doc >= 0].float(), atol=0.1)


def test_flex_compiled_once_outside_any_traced_region(monkeypatch):
    """The compiled FlexAttention is made by enable_flex (configure calls it), never lazily from inside a compiled
    block; flex() without it is a bug, said as such."""
    monkeypatch.setattr(model_module, "_flex_compiled", None)
    q = torch.zeros(1, 1, 128, 8)
    with pytest.raises(AssertionError, match="enable_flex"):
        model_module.flex(q, q, q, None)
    model_module.enable_flex()
    made = model_module._flex_compiled
    assert made is not None and made is not model_module.flex_attention
    model_module.enable_flex()
    assert model_module._flex_compiled is made  # once
