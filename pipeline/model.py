"""A Llama-architecture transformer (RMSNorm, RoPE, SwiGLU, grouped-query attention, no biases) and its loss on
packed rows (the target shift, the document mask, fp32 cross-entropy at trained positions only). Knows no tokenizer
and no file format: pipeline/hf.py saves and loads it as a Hugging Face folder."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from pipeline.common import IGNORE_INDEX
from pipeline.config import ModelConfig

try:  # FlexAttention (torch >= 2.5): the packed-row mask as a block mask, fused on CUDA; no CPU backward
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: the SDPA path below is used everywhere
    BlockMask = create_block_mask = flex_attention = None
_flex_compiled = None  # flex_attention under torch.compile, made by enable_flex() outside any traced region
FLEX_BLOCK = 128  # FlexAttention's block size: query and key tiles of 128 tokens


def flex_available(device: torch.device) -> bool:
    return flex_attention is not None and device.type == "cuda"


def enable_flex() -> None:
    """Make the compiled FlexAttention once, here and not lazily inside a compiled block, where torch.compile(fn)
    would be traced as a no-op and could leave the eager reference (which builds the full score matrix) behind."""
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)


def flex(q, k, v, block_mask):
    assert _flex_compiled is not None, "call pipeline.model.enable_flex() first (train.configure does)"
    return _flex_compiled(q, k, v, block_mask=block_mask, enable_gqa=q.shape[1] != k.shape[1])



class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like the HF implementation, then scale in the input dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(pos: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """pos (B, T) int -> cos, sin (B, 1, T, head_dim), the 'rotate half' layout of HF Llama."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device, dtype=torch.float32) / head_dim)
    freqs = pos.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x by the RoPE tables; the result keeps x's dtype. Under bf16 autocast q and k are bf16 while the
    tables are fp32 (they come from the fp32 embedding output): without the cast q and k would reach attention in
    fp32 next to a bf16 v, which FlexAttention refuses (torch < 2.11) or runs in fp32."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.n_embd, cfg.head_dim
        self.q = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.k = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.v = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.o = nn.Linear(cfg.n_head * hd, d, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0):  # cache: pipeline.generate.KVCache
        B, T, _ = x.shape
        cfg = self.cfg
        if cache is not None:  # generation (pipeline/generate.py): fewer, larger operations per step
            H = cfg.n_head + cfg.n_kv_head
            # q, k, v in one product with the weights the cache fused; q and k rotated in one go (elementwise)
            qkv = F.linear(x, cache.qkv[layer]).view(B, T, -1, cfg.head_dim).transpose(1, 2)  # (B, H+2Hkv, T, D)
            qk = apply_rope(qkv[:, :H], cos, sin)
            y = cache.attend(layer, qk[:, : cfg.n_head], qk[:, cfg.n_head :], qkv[:, H:], mask)  # stores k, v
            return self.o(y.transpose(1, 2).reshape(B, T, -1))
        q = self.q(x).view(B, T, cfg.n_head, cfg.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v(x).view(B, T, cfg.n_kv_head, cfg.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if BlockMask is not None and isinstance(mask, BlockMask):  # CUDA training: GQA handled inside the kernel
            return self.o(flex(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        rep = cfg.n_head // cfg.n_kv_head
        if rep > 1:  # query head h reads key/value head h // rep, as HF's repeat_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x, gate_up=None):
        if gate_up is not None:  # generation: gate and up weights fused into one product (pipeline/generate.py)
            gate, up = F.linear(x, gate_up).chunk(2, -1)
            return self.down(F.silu(gate) * up)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.mlp_norm(x), None if cache is None else cache.gate_up[layer])


def doc_causal_mask(doc: torch.Tensor) -> torch.Tensor:
    """doc (B, T) conversation index per token -> bool (B, 1, T, T): attend to earlier tokens of the same
    conversation only, so packed neighbours never see each other."""
    T = doc.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def flex_block_mask(doc: torch.Tensor):
    """The same rule as doc_causal_mask as a FlexAttention BlockMask: tiles of 128x128 that are fully masked
    (another conversation, or the future) are skipped by the kernel, not computed and discarded; tiles inside one
    conversation, below the diagonal, are full (no mask evaluated). Built from the conversations' spans in a few
    small tensor operations on the device, with no host sync (create_block_mask would evaluate the rule on every
    (query, key) pair of the row); rows whose length is not a multiple of 128 take create_block_mask."""
    B, T = doc.shape

    def same_conversation_causal(b, h, q, kv):
        return (doc[b, q] == doc[b, kv]) & (q >= kv)

    if T % FLEX_BLOCK:
        return create_block_mask(same_conversation_causal, B, None, T, T, device=doc.device)
    n = T // FLEX_BLOCK
    # a conversation is a run of equal doc values; seg numbers the runs of a row (padding, -1, is the last run)
    seg = F.pad((doc[:, 1:] != doc[:, :-1]).cumsum(1), (1, 0)).view(B, n, FLEX_BLOCK)
    lo, hi = seg[..., 0], seg[..., -1]  # (B, n): the first and last run in each tile
    tile = torch.arange(n, device=doc.device)
    before = tile[None, :] < tile[:, None]  # (query tile, key tile): the key tile is in the past
    # a past key tile shares a run with the query tile exactly when its last run reaches the query tile's first
    some = (before | torch.eye(n, dtype=torch.bool, device=doc.device)) & (hi[:, None, :] >= lo[:, :, None])
    one_run = lo == hi
    full = before & one_run[:, None, :] & one_run[:, :, None] & (lo[:, None, :] == lo[:, :, None])

    def listed(m):  # (B, n, n) bool -> (count, indices first) per query tile, with the head axis FlexAttention wants
        order = torch.argsort((~m).to(torch.int8), dim=-1, stable=True)
        return m.sum(-1, dtype=torch.int32)[:, None], order.to(torch.int32)[:, None]

    return BlockMask.from_kv_blocks(*listed(some & ~full), *listed(full), BLOCK_SIZE=FLEX_BLOCK,
                                    mask_mod=same_conversation_causal)


def attention_mask(doc: torch.Tensor, use_flex: bool):
    return flex_block_mask(doc) if use_flex else doc_causal_mask(doc)


def ce_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of the output layer on rows h (N, D); logits in fp32 even under autocast."""
    return F.cross_entropy(F.linear(h, weight).float(), targets, reduction="sum")


def output_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """ce_sum over chunks of `chunk` rows, each recomputed in backward: at most a (chunk, V) fp32 logits tensor
    is alive at once, never (N, V). chunk 0, or N <= chunk: one piece, no recompute."""
    N = h.shape[0]
    if chunk <= 0 or N <= chunk:
        return ce_sum(h, weight, targets)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(ce_sum, h[s : s + chunk], weight, targets[s : s + chunk], use_reentrant=False) if grad
             else ce_sum(h[s : s + chunk], weight, targets[s : s + chunk]) for s in range(0, N, chunk)]
    return torch.stack(parts).sum()


def shift_targets(labels: torch.Tensor, doc: torch.Tensor | None) -> torch.Tensor:
    """The one place the shift happens: position t is scored against labels[t + 1], unless t + 1 starts
    another conversation of the packed row (or the row ends)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    if doc is not None:
        targets[:, :-1].masked_fill_(doc[:, 1:] != doc[:, :-1], IGNORE_INDEX)
    return targets


def trained_targets(labels: torch.Tensor, doc: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(at, targets): the flat positions of (B, T) whose shifted target is trained, and those targets. Made on the
    CPU with the batch (pipeline/train.py: to_batch), it spares the GPU step the sync that boolean indexing costs."""
    targets = shift_targets(labels, doc).flatten()
    at = (targets != IGNORE_INDEX).nonzero()[:, 0]
    return at, targets[at]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "ModelConfig.vocab_size must be set (from the tokenizer) before building"
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        # runtime knobs set by training (pipeline/train.py:configure), not part of the saved model
        self.use_flex = False  # FlexAttention block mask instead of a dense boolean mask (CUDA)
        self.loss_chunk = 0  # output-layer rows per loss chunk; 0: one piece
        self.checkpointing = False  # recompute each block in backward (activation checkpointing)
        self.compiled_blocks: list = []  # compile_blocks(): the blocks under torch.compile (a list: no submodules)

    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        out_std = self.cfg.init_std / math.sqrt(2 * self.cfg.n_layer)  # residual projections scaled down
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                std = out_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else self.cfg.init_std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def compile_blocks(self) -> None:
        """Forward passes without a KV cache (training, dev loss) run through each block compiled with fixed shapes
        (packed rows all have block_size tokens); generation keeps the plain blocks, so decoding, whose lengths
        change at every step, never recompiles them nor spends the recompile limit the training graphs need."""
        self.compiled_blocks = [torch.compile(block, dynamic=False) for block in self.blocks]

    def hidden(self, ids, pos, mask, cache=None):
        x = self.embed(ids)
        if cache is None:
            cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        else:  # generation: rows of the table the cache computed once (the same elementwise formula)
            cos, sin = cache.cos[pos][:, None], cache.sin[pos][:, None]
        blocks = self.compiled_blocks if cache is None and self.compiled_blocks else self.blocks
        for i, block in enumerate(blocks):
            if self.checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def forward(self, ids, labels=None, pos=None, doc=None, at=None, targets=None):
        """ids (B, T). Without labels: logits (B, T, V). With labels (B, T), -100 where not trained (or with `at`
        and `targets` from trained_targets(labels, doc), made ahead): (sum of fp32 cross-entropies over the
        trained targets, their number)."""
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        mask = None if doc is None else attention_mask(doc, self.use_flex)
        h = self.hidden(ids, pos, mask)
        if labels is None and at is None:
            return self.lm_head(h).float()
        if at is None:
            at, targets = trained_targets(labels, doc)
        # the output layer runs only where a target is trained, in chunks; cross-entropy in fp32
        loss_sum = output_loss(h.flatten(0, 1).index_select(0, at), self.lm_head.weight, targets, self.loss_chunk)
        return loss_sum, at.numel()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

