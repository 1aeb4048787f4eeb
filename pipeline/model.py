"""A Llama-family decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention) with the few switches today's open chat
models need (`Architecture`: biases, q/k norms, explicit head size, RoPE scaling, a sliding window), and its loss on
packed rows (the target shift, the document mask, fp32 cross-entropy at trained positions only). Knows no tokenizer
and no file format: pipeline/hf.py reads and writes Hugging Face folders."""
import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The network's shape and switches: from the bundled model's params (`from_params`) or a model's config.json
    (pipeline/hf.py). Each switch is off for a plain Llama."""
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    head_dim: int  # per attention head; Qwen3 and some Mistrals set it apart from n_embd / n_head
    intermediate_size: int
    max_seq_len: int
    vocab_size: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float
    rope_scaling: tuple = ()  # (("rope_type", "llama3"), ("factor", 8.0), ...): llama3 or linear; () none
    qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # a bias on the output projection (Llama's and Qwen3's attention_bias)
    mlp_bias: bool = False  # biases on gate, up and down (Llama's mlp_bias)
    qk_norm: bool = False  # RMSNorm of each query and key head before RoPE (Qwen3)
    sliding_window: int = 0  # attend to the last N positions only (Mistral v0.1); 0: no window

    def __post_init__(self):
        assert self.vocab_size > 0, "the vocabulary size must be set (from the tokenizer) before building"
        assert self.n_head % self.n_kv_head == 0 and self.head_dim % 2 == 0, "heads and head size do not fit"

    @classmethod
    def from_params(cls, cfg: ModelConfig, vocab_size: int) -> "Architecture":
        """The bundled model: a plain Llama of params.yaml's `model` section."""
        return cls(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.intermediate_size,
                   cfg.max_seq_len, vocab_size or cfg.vocab_size, cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings,
                   cfg.init_std)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like the HF implementation; the result keeps the input's dtype: under bf16 autocast an
        # fp32 gain times a bf16 input would be fp32, which turned Qwen3's normed q and k (bf16 projections) back
        # into fp32 next to a bf16 v. The fp32 residual stream (block norms) is unchanged: fp32 in, fp32 out.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * h.to(x.dtype)).to(x.dtype)


def inv_freq(arch: Architecture, device=None) -> torch.Tensor:
    """RoPE's rotation rates (head_dim / 2,), rescaled as the model's rope_scaling says: `linear` divides them all
    by the factor; `llama3` (Llama 3.1/3.2) divides the slow ones (wavelength above original_max / low_freq_factor)
    by the factor, keeps the fast ones (below original_max / high_freq_factor), and blends in between."""
    D = arch.head_dim
    freq = 1.0 / arch.rope_theta ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    scaling = dict(arch.rope_scaling)
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        return freq / scaling["factor"]
    if kind == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old / low, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        return torch.where(medium, blended, scaled)
    assert kind == "default", f"rope scaling {kind} (pipeline/hf.py refuses it at import)"
    return freq


def rope_cos_sin(pos: torch.Tensor, freq: torch.Tensor, dtype: torch.dtype):
    """pos (B, T) int, freq (D/2,) -> cos, sin (B, 1, T, D), the 'rotate half' layout of HF Llama."""
    freqs = pos.float()[..., None] * freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate x by the RoPE tables; the result keeps x's dtype. Under bf16 autocast q and k are bf16 while the
    tables are fp32 (they come from the fp32 embedding output): without the cast q and k would reach attention in
    fp32 next to a bf16 v, which FlexAttention refuses (torch < 2.11) or runs in fp32."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        d, hd = arch.n_embd, arch.head_dim
        self.q = nn.Linear(d, arch.n_head * hd, bias=arch.qkv_bias)
        self.k = nn.Linear(d, arch.n_kv_head * hd, bias=arch.qkv_bias)
        self.v = nn.Linear(d, arch.n_kv_head * hd, bias=arch.qkv_bias)
        self.o = nn.Linear(arch.n_head * hd, d, bias=arch.o_bias)
        self.q_norm = RMSNorm(hd, arch.norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(hd, arch.norm_eps) if arch.qk_norm else None

    def forward(self, x, cos, sin, mask, cache=None, layer: int = 0):  # cache: pipeline.generate.KVCache
        B, T, _ = x.shape
        arch = self.arch
        Hq, Hkv, D = arch.n_head, arch.n_kv_head, arch.head_dim
        if cache is not None:  # generation (pipeline/generate.py): fewer, larger operations per step
            H = Hq + Hkv
            # q, k, v in one product with the weights the cache fused; q and k rotated in one go (elementwise)
            qkv = F.linear(x, cache.qkv[layer], cache.qkv_bias[layer]).view(B, T, -1, D).transpose(1, 2)
            qk = qkv[:, :H]  # (B, Hq + Hkv, T, D)
            if self.q_norm is not None:
                qk = torch.cat([self.q_norm(qk[:, :Hq]), self.k_norm(qk[:, Hq:])], 1)
            qk = apply_rope(qk, cos, sin)
            y = cache.attend(layer, qk[:, :Hq], qk[:, Hq:], qkv[:, H:], mask)  # stores k, v
            return self.o(y.transpose(1, 2).reshape(B, T, -1))
        q = self.q(x).view(B, T, Hq, D)
        k = self.k(x).view(B, T, Hkv, D)
        v = self.v(x).view(B, T, Hkv, D).transpose(1, 2)  # (B, Hkv, T, D)
        if self.q_norm is not None:  # per head, over D, before RoPE (Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q.transpose(1, 2), cos, sin), apply_rope(k.transpose(1, 2), cos, sin)
        if BlockMask is not None and isinstance(mask, BlockMask):  # CUDA training: GQA handled inside the kernel
            return self.o(flex(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        rep = Hq // Hkv
        if rep > 1:  # query head h reads key/value head h // rep, as HF's repeat_kv
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, T, -1))


def weight_of(linear: nn.Linear) -> torch.Tensor:
    """A projection's weight as its forward applies it: with a LoRA adapter (pipeline/lora.py), W (dequantized when
    stored in NF4) plus the update."""
    delta = getattr(linear, "delta", None)
    if delta is None:
        return linear.weight
    frozen = linear.frozen_weight()
    return (frozen.float() + delta()).to(frozen.dtype)


def neftune(x: torch.Tensor, doc: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """NEFTune: embeddings (B, T, d) plus uniform noise in [-1, 1] scaled by alpha / sqrt(L d), L each row's length
    in tokens (padding, doc -1, not counted; a row with no doc index counts all T)."""
    B, T, d = x.shape
    L = (doc >= 0).sum(1) if doc is not None else torch.full((B,), T, device=x.device)
    scale = alpha / torch.sqrt(L.clamp(min=1).to(torch.float32) * d)
    return x + torch.empty_like(x).uniform_(-1, 1) * scale.to(x.dtype)[:, None, None]


class MLP(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.gate = nn.Linear(arch.n_embd, arch.intermediate_size, bias=arch.mlp_bias)
        self.up = nn.Linear(arch.n_embd, arch.intermediate_size, bias=arch.mlp_bias)
        self.down = nn.Linear(arch.intermediate_size, arch.n_embd, bias=arch.mlp_bias)

    def forward(self, x, gate_up=None, gate_up_bias=None):
        if gate_up is not None:  # generation: gate and up weights fused into one product (pipeline/generate.py)
            gate, up = F.linear(x, gate_up, gate_up_bias).chunk(2, -1)
            return self.down(F.silu(gate) * up)
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.attn_norm = RMSNorm(arch.n_embd, arch.norm_eps)
        self.attn = Attention(arch)
        self.mlp_norm = RMSNorm(arch.n_embd, arch.norm_eps)
        self.mlp = MLP(arch)

    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, layer)
        if cache is None:
            return x + self.mlp(self.mlp_norm(x))
        return x + self.mlp(self.mlp_norm(x), cache.gate_up[layer], cache.gate_up_bias[layer])


def causal(T: int, window: int = 0, device=None) -> torch.Tensor:
    """bool (T, T): query i attends key j <= i, and with a sliding window only when i - j < window (as HF's)."""
    allowed = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    return allowed.triu(1 - window) if window else allowed


def doc_causal_mask(doc: torch.Tensor, window: int = 0) -> torch.Tensor:
    """doc (B, T) conversation index per token -> bool (B, 1, T, T): attend to earlier tokens of the same
    conversation only (within the sliding window, if any), so packed neighbours never see each other."""
    return ((doc[:, :, None] == doc[:, None, :]) & causal(doc.shape[1], window, doc.device))[:, None]


def flex_block_mask(doc: torch.Tensor, window: int = 0):
    """The same rule as doc_causal_mask as a FlexAttention BlockMask: tiles of 128x128 that are fully masked
    (another conversation, or the future) are skipped by the kernel, not computed and discarded; tiles inside one
    conversation, below the diagonal, are full (no mask evaluated). Built from the conversations' spans in a few
    small tensor operations on the device, with no host sync (create_block_mask would evaluate the rule on every
    (query, key) pair of the row); rows whose length is not a multiple of 128, or a sliding window, take
    create_block_mask."""
    B, T = doc.shape

    def same_conversation_causal(b, h, q, kv):
        allowed = (doc[b, q] == doc[b, kv]) & (q >= kv)
        return allowed & (q - kv < window) if window else allowed

    if T % FLEX_BLOCK or window:
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


def attention_mask(doc: torch.Tensor, use_flex: bool, window: int = 0):
    return flex_block_mask(doc, window) if use_flex else doc_causal_mask(doc, window)


def ce_sum(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float = 0.0) -> torch.Tensor:
    """Summed cross-entropy of the output layer on rows h (N, D); logits in fp32 even under autocast, capped to
    (-softcap, softcap) by softcap * tanh(logits / softcap) when a family caps them (Gemma 2/3)."""
    logits = F.linear(h, weight).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, reduction="sum")


def output_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                softcap: float = 0.0) -> torch.Tensor:
    """ce_sum over chunks of `chunk` rows, each recomputed in backward: at most a (chunk, V) fp32 logits tensor
    is alive at once, never (N, V). chunk 0, or N <= chunk: one piece, no recompute."""
    N = h.shape[0]
    if chunk <= 0 or N <= chunk:
        return ce_sum(h, weight, targets, softcap)
    grad = torch.is_grad_enabled()
    parts = [checkpoint(ce_sum, h[s : s + chunk], weight, targets[s : s + chunk], softcap, use_reentrant=False)
             if grad else ce_sum(h[s : s + chunk], weight, targets[s : s + chunk], softcap)
             for s in range(0, N, chunk)]
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
    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.embed = nn.Embedding(arch.vocab_size, arch.n_embd)
        self.blocks = nn.ModuleList(Block(arch) for _ in range(arch.n_layer))
        self.norm = RMSNorm(arch.n_embd, arch.norm_eps)
        self.lm_head = nn.Linear(arch.n_embd, arch.vocab_size, bias=False)
        if arch.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.register_buffer("rope_freq", inv_freq(arch), persistent=False)  # not in the state dict: from arch
        # runtime knobs set by training (pipeline/train.py:configure), not part of the saved model
        self.use_flex = False  # FlexAttention block mask instead of a dense boolean mask (CUDA)
        self.loss_chunk = 0  # output-layer rows per loss chunk; 0: one piece
        self.checkpointing = False  # recompute each block in backward (activation checkpointing)
        self.neftune_alpha = 0.0  # NEFTune noise on the embeddings in training forward passes; 0: off
        self.compiled_blocks: list = []  # compile_blocks(): the blocks under torch.compile (a list: no submodules)

    def init_weights(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        out_std = self.arch.init_std / math.sqrt(2 * self.arch.n_layer)  # residual projections scaled down
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            else:
                std = out_std if name.endswith(("attn.o.weight", "mlp.down.weight")) else self.arch.init_std
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=gen) * std)

    def compile_blocks(self) -> None:
        """Forward passes without a KV cache (training, dev loss) run through each block compiled with fixed shapes
        (packed rows all have block_size tokens); generation keeps the plain blocks, so decoding, whose lengths
        change at every step, never recompiles them nor spends the recompile limit the training graphs need."""
        self.compiled_blocks = [torch.compile(block, dynamic=False) for block in self.blocks]

    def hidden(self, ids, pos, mask, cache=None, doc=None):
        x = self.embed(ids)
        if self.neftune_alpha and self.training and cache is None and torch.is_grad_enabled():
            x = neftune(x, doc, self.neftune_alpha)  # training steps only: never evaluation nor generation
        if cache is None:
            cos, sin = rope_cos_sin(pos, self.rope_freq, x.dtype)
        else:  # generation: rows of the table the cache computed once (the same elementwise formula)
            cos, sin = cache.cos[pos][:, None], cache.sin[pos][:, None]
        blocks = self.compiled_blocks if cache is None and self.compiled_blocks else self.blocks
        for i, block in enumerate(blocks):
            if self.checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(block, x, cos, sin, mask, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i)
        return self.norm(x)

    def states(self, ids, pos, doc):
        """The final hidden states (B, T, D) of rows whose tokens carry document ids (doc: -1 for padding), attention
        kept inside each document: what both backends offer the scoring code (pipeline/backend.py)."""
        window = self.arch.sliding_window if self.arch.sliding_window < ids.shape[1] else 0
        return self.hidden(ids, pos, attention_mask(doc, self.use_flex, window), doc=doc)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """fp32 logits of hidden states."""
        return self.lm_head(h).float()

    def forward(self, ids, labels=None, pos=None, doc=None, at=None, targets=None):
        """ids (B, T). Without labels: logits (B, T, V). With labels (B, T), -100 where not trained (or with `at`
        and `targets` from trained_targets(labels, doc), made ahead): (sum of fp32 cross-entropies over the
        trained targets, their number)."""
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        window = self.arch.sliding_window if self.arch.sliding_window < T else 0  # a window wider than the rows: none
        if doc is None and window:
            doc = torch.zeros_like(ids)  # one conversation per row, but the window needs an explicit mask
        mask = None if doc is None else attention_mask(doc, self.use_flex, window)
        h = self.hidden(ids, pos, mask, doc=doc)
        if labels is None and at is None:
            return self.lm_head(h).float()
        if at is None:
            at, targets = trained_targets(labels, doc)
        # the output layer runs only where a target is trained, in chunks; cross-entropy in fp32
        loss_sum = output_loss(h.flatten(0, 1).index_select(0, at), self.lm_head.weight, targets, self.loss_chunk)
        return loss_sum, at.numel()

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

