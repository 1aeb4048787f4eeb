"""Packed-row attention (SDPA + boolean mask on CPU, FlexAttention block mask on CUDA), the chunked
output-layer loss and activation checkpointing, each against a plain reference."""
import pytest
import torch

import pipeline.model as model_module
from pipeline.common import IGNORE_INDEX, Compute, setup_compute
from pipeline.config import LoraConfig
from pipeline.generate import KVCache, generate
from pipeline.lora import add_adapters
from pipeline.model import Transformer, doc_causal_mask, output_loss
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


# every switch a supported family turns on (pipeline/hf.py: architecture), one variant each, and LoRA on top
FAMILY_SWITCHES = {
    "llama": {},
    "llama3-rope-scaling": dict(rope_scaling=(("rope_type", "llama3"), ("factor", 8.0), ("low_freq_factor", 1.0),
                                              ("high_freq_factor", 4.0), ("original_max_position_embeddings", 32))),
    "llama-biases": dict(qkv_bias=True, o_bias=True, mlp_bias=True),
    "qwen2": dict(qkv_bias=True),
    "qwen3-qk-norm": dict(qk_norm=True, o_bias=True, head_dim=16),
    "mistral-window": dict(sliding_window=64),
    "qwen3-lora": dict(qk_norm=True, head_dim=16),
}


def family_model(name: str) -> Transformer:
    model = tiny_model(V, max_seq_len=256, **FAMILY_SWITCHES[name])
    if name.endswith("lora"):
        add_adapters(model, LoraConfig(4, 8.0, 0.0, ["q_proj", "k_proj", "v_proj", "o_proj"], "none"), seed=0)
        with torch.no_grad():  # B away from zero, so that the adapters take part
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.1)
    with torch.no_grad():  # weights scaled so that attention matters: a mix-up of q, k or v moves the output
        for block in model.blocks:
            block.attn.q.weight.mul_(8)
            block.attn.k.weight.mul_(8)
    return model.eval()


@pytest.mark.filterwarnings("ignore:flex_attention called without")
@pytest.mark.parametrize("name", list(FAMILY_SWITCHES))
def test_under_bf16_autocast_q_k_v_reach_flex_attention_in_one_dtype(monkeypatch, name):
    """bf16 autocast as on CUDA, with the FlexAttention path forced on (forward only on the CPU), for every switch a
    family turns on: q, k and v reach attention as bf16 (neither RoPE nor Qwen3's q/k norms, whose gains are fp32
    master weights, may turn q and k back into fp32 next to a bf16 v: FlexAttention refuses mixed dtypes on
    torch < 2.11 and runs attention in fp32 on newer ones); the output matches the SDPA path within bf16 rounding."""
    seen = []

    def spy(q, k, v, block_mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return model_module.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])

    monkeypatch.setattr(model_module, "flex", spy)
    bf16 = setup_compute("cpu", "bfloat16")
    _, ids, pos, doc = packed_row(lengths=(100, 90, 60), pad=6)  # 256 tokens: two blocks
    model = family_model(name)
    with torch.no_grad():
        fp32 = model(ids, pos=pos, doc=doc)  # outside autocast everything stays fp32
        with bf16.autocast():
            sdpa = model(ids, pos=pos, doc=doc)
            model.use_flex = True
            flex = model(ids, pos=pos, doc=doc)
            model.use_flex = False
    assert seen == [(torch.bfloat16,) * 3] * model.arch.n_layer
    real = doc >= 0
    # measured: bf16 moves the logits by at most 3-6% of their spread (std ~0.12) and flex differs from SDPA by
    # 3-5%; attention without the document mask moves them by 170-440%
    spread = fp32[real].std().item()
    assert (flex[real] - sdpa[real]).abs().max().item() < 0.1 * spread
    assert (sdpa[real].float() - fp32[real]).abs().max().item() < 0.2 * spread


@pytest.mark.parametrize("name", ["llama", "qwen3-qk-norm", "qwen3-lora"])
def test_generation_under_bf16_autocast_hands_attention_one_dtype(monkeypatch, name):
    """Generation's KV-cache path under bf16 autocast: q, k and v reach the cache's attention in one dtype, in the
    prompt and in every decoding step."""
    seen, attend = [], KVCache.attend

    def spy(self, layer, q, k, v, mask):
        seen.append((q.dtype, k.dtype, v.dtype))
        return attend(self, layer, q, k, v, mask)

    monkeypatch.setattr(KVCache, "attend", spy)
    model = family_model(name)
    with setup_compute("cpu", "bfloat16").autocast():
        generate(model, [list(range(5, 25)), list(range(7, 16))], 4, stop_id=-1)  # 2 prompt chunks, 3 steps
    assert len(seen) == model.arch.n_layer * (2 + 3) and set(seen) == {(torch.bfloat16,) * 3}, set(seen)


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
