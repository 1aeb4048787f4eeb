"""Batched decoding with a key/value cache: prompts of different lengths in one batch (left-padded), greedy or
sampled (temperature, top-k, top-p), each row stopping on its own at the stop id. One code path for
evaluation, the samples logged during training, chat and the benchmark."""
import dataclasses
import warnings

import torch
import torch.nn.functional as F

from pipeline.model import Transformer, causal, rope_cos_sin, weight_of


@dataclasses.dataclass
class Sampling:
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # sample among the k most likely tokens; 0: all
    top_p: float = 1.0  # sample among the smallest set of tokens whose probability reaches top_p; 1.0: all
    seed: int = 0  # sampling seed (same seed, prompts and model: same outputs)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError("sampling: need temperature >= 0, top_k >= 0, 0 < top_p <= 1")


GREEDY = Sampling()


class KVCache:
    """Preallocated keys and values per layer, filled up to `length` slots: keys transposed, (B, n_kv_head,
    head_dim, max_len), values (B, n_kv_head, max_len, head_dim), so that both decoding products read rows
    that are contiguous in memory. `bias` (B, n_kv_head, 1, max_len) is 0 on real slots and -inf on pad slots.
    Also holds what a step would otherwise recompute: the RoPE cos/sin of every slot (max_len, head_dim) and the
    model's q/k/v and gate/up weights fused for this generation (one product instead of three and two); they
    are rebuilt with every cache, so training between two generations is always seen.
    The model's Attention hands its q, k, v to `attend`, which stores k, v at `length`; `keep` drops rows.
    With a sliding window, a decoding step reads the last `window` slots only: a row's slots and positions differ by
    its left padding, the same for the query and its keys, so the window is the same slots for every row."""

    def __init__(self, model: Transformer, batch: int, max_len: int):
        arch, param = model.arch, next(model.parameters())
        kw = {"device": param.device, "dtype": param.dtype}
        self.k = [torch.zeros(batch, arch.n_kv_head, arch.head_dim, max_len, **kw) for _ in range(arch.n_layer)]
        self.v = [torch.zeros(batch, arch.n_kv_head, max_len, arch.head_dim, **kw) for _ in range(arch.n_layer)]
        self.bias = torch.zeros(batch, arch.n_kv_head, 1, max_len, **kw)
        slots = torch.arange(max_len, device=param.device)[None]
        self.cos, self.sin = (t[0, 0] for t in rope_cos_sin(slots, model.rope_freq, param.dtype))
        self.sliding_window, self.length = arch.sliding_window, 0
        with torch.no_grad():
            self.qkv = [torch.cat([weight_of(b.attn.q), weight_of(b.attn.k), weight_of(b.attn.v)])
                        for b in model.blocks]
            self.qkv_bias = [torch.cat([b.attn.q.bias, b.attn.k.bias, b.attn.v.bias]) if arch.qkv_bias else None
                             for b in model.blocks]
            self.gate_up = [torch.cat([weight_of(b.mlp.gate), weight_of(b.mlp.up)]) for b in model.blocks]
            self.gate_up_bias = [torch.cat([b.mlp.gate.bias, b.mlp.up.bias]) if arch.mlp_bias else None
                                 for b in model.blocks]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None):
        """Store k, v (B, Hkv, T, D) at slots [length, length + T) and attend from q (B, H, T, D) over every
        filled slot. A prompt (T > 1) is masked by `mask` (B, 1, T, S), additive (0 or -inf); a decoding step
        (T = 1) by `bias`. Query head h reads key/value head h // rep (as HF's repeat_kv): in decoding, the rep
        query heads of a group are read as extra rows of one product, so the cache is never copied."""
        B, H, T, D = q.shape
        start, n_kv = self.length, self.v[layer].shape[1]
        self.k[layer][..., start : start + T] = k.transpose(-1, -2)
        self.v[layer][:, :, start : start + T] = v
        S, rep = start + T, H // n_kv
        window = self.sliding_window
        first = S - window if T == 1 and 0 < window < S else 0  # decoding: the window's slots only
        keys_t, values = self.k[layer][..., first:S], self.v[layer][:, :, first:S]  # (B, Hkv, D, S'), (B, Hkv, S', D)
        if T > 1:  # a prompt: fused attention over the (few) repeated key/value heads
            keys, values = keys_t.transpose(-1, -2).repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            # a bool mask (True: attend) is accepted whatever dtype autocast gives q, k, v
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask == 0)
        # (B * Hkv) products of (rep, D) x (D, S): heads g*rep .. g*rep+rep-1 share key/value head g; scale and
        # pad bias are applied inside the first product (baddbmm)
        scores = torch.baddbmm(self.bias[..., first:S].flatten(0, 1), q.reshape(B * n_kv, rep, D),
                               keys_t.flatten(0, 1), alpha=D**-0.5)  # (B * Hkv, rep, S)
        y = torch.bmm(scores.softmax(-1), values.flatten(0, 1))  # (B * Hkv, rep, D)
        return y.view(B, H, T, D)

    def window(self, first: int, last: int, start: int) -> "KVCache":
        """A view of rows [first, last) from slot `start` on, empty: writes through it fill this cache."""
        view = KVCache.__new__(KVCache)
        view.k = [k[first:last, ..., start:] for k in self.k]
        view.v = [v[first:last, :, start:] for v in self.v]
        view.bias = self.bias[first:last, ..., start:]
        view.qkv, view.qkv_bias = self.qkv, self.qkv_bias
        view.gate_up, view.gate_up_bias = self.gate_up, self.gate_up_bias
        view.cos, view.sin, view.sliding_window, view.length = self.cos, self.sin, self.sliding_window, 0
        return view

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices) of the batch."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]
        self.bias = self.bias.index_select(0, rows)


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> 0 where attention is allowed, -inf elsewhere (built once per prompt chunk, shared by all layers)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def pick(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator | None) -> torch.Tensor:
    """Next token per row from logits (B, V) fp32: argmax, or a draw after temperature, top-k and top-p."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if 0 < sampling.top_k < logits.shape[-1]:
        kth = logits.topk(sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p (the most likely one always stays)
        drop = probs.cumsum(-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]


def prefill(model: Transformer, prompts: list[list[int]], cache: KVCache, P: int) -> torch.Tensor:
    """Run the prompts (sorted by length) through the model into the cache, each right-aligned at slot P, and
    return the next-token logits (B, V). Rows go in chunks of similar length, so a short prompt is not padded
    to the longest one of the batch: little compute is spent on pad slots."""
    device, dtype = cache.v[0].device, cache.v[0].dtype
    logits, start = [], 0
    while start < len(prompts):
        end = start + 1
        while end < len(prompts) and len(prompts[end]) <= 1.25 * len(prompts[start]) + 8:
            end += 1
        chunk = prompts[start:end]
        width = len(chunk[-1])
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in chunk], device=device)
        pos = (real.long().cumsum(1) - 1).clamp(min=0)
        allowed = causal(width, cache.sliding_window, device)
        # a pad query attends to itself only, so no softmax row is empty; its output is never read
        allowed = (allowed & real[:, None]) | torch.eye(width, dtype=torch.bool, device=device)  # (n, W, W)
        window = cache.window(start, end, P - width)
        h = model.hidden(ids, pos, additive(allowed, dtype)[:, None], window)[:, -1]
        logits.append(model.lm_head(h).float())
        start = end
    cache.length = P
    return torch.cat(logits)


_compiled_hidden = None  # Transformer.hidden under torch.compile, built on first use; False where compiling failed


def compiled_hidden():
    """Transformer.hidden compiled once with dynamic shapes, so one graph serves every cache length and batch
    size (torch specializes a batch of 1: that is a second graph; another model is a recompile). Compiling takes
    a minute or more on a CPU; it fuses the small elementwise work of a step (norms, RoPE, SwiGLU), which is most
    of a batch-1 step, and little of a large batch, which is mostly matrix products. None where it failed."""
    global _compiled_hidden
    if _compiled_hidden is None:
        _compiled_hidden = torch.compile(Transformer.hidden, dynamic=True)
    return _compiled_hidden or None


def give_up_compiling(err: Exception) -> None:
    global _compiled_hidden
    warnings.warn(f"generate: torch.compile failed ({type(err).__name__}: {err}); decoding eagerly")
    _compiled_hidden = False


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_id: int | list[int],
             sampling: Sampling = GREEDY, compile: bool = False) -> list[list[int]]:
    """New tokens per prompt, ending with a stop id (`stop_id`: one, or every end id the model declares, as Llama 3
    declares several) when the row stopped within max_new_tokens.
    Prompts are left-padded: row i of the batch has its tokens in the last len(prompt_i) slots, positions
    counting from 0 at its first real token, and attention never reads a pad slot. Rows that stopped are
    dropped from the batch as more of them finish, so a few long answers do not carry the whole batch.
    compile: decoding steps run through torch.compile (opt-in: it pays only over many steps, see
    compiled_hidden); where compiling fails, decoding goes on eagerly with a warning."""
    assert prompts and min(map(len, prompts)) > 0, "generate: every prompt needs at least one token"
    if not isinstance(model, Transformer):  # another backend decodes over its own cache (pipeline/backend.py)
        return model.decode(prompts, max_new_tokens, stop_id, sampling)
    model.eval()
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    order = sorted(range(B), key=lambda i: len(prompts[i]))  # similar lengths side by side for the prefill
    cache = KVCache(model, B, P + max_new_tokens)
    for row, i in enumerate(order):  # decoding never reads a pad slot
        cache.bias[row, ..., : P - len(prompts[i])] = float("-inf")
    logits = prefill(model, [prompts[i] for i in order], cache, P)
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # tokens of each row of the batch
    rows = order  # original index of each row of the batch
    done = [False] * B  # per row of the batch: wrote stop_id (a finished row decodes on until it is dropped)
    out = [None] * B  # the answer of each prompt, by original index
    pos = torch.tensor([[len(prompts[i])] for i in order], device=device)  # (b, 1) position of the next token
    step_fn = compiled_hidden() if compile else None
    stops = torch.tensor(stop_id if isinstance(stop_id, list) else [stop_id], device=device)
    for step in range(max_new_tokens):
        tok = pick(logits, sampling, gen)  # (b,)
        new[:, step] = tok
        hit = torch.isin(tok, stops)
        if hit.any():  # the step's one read of a result on the host; the rest runs only when a row stops
            for r in hit.nonzero()[:, 0].tolist():
                if not done[r]:
                    done[r], out[rows[r]] = True, new[r, : step + 1].tolist()
            n_live = done.count(False)
            if n_live == 0:
                break
            if n_live <= 0.75 * len(rows):  # drop finished rows once a quarter of the batch has stopped
                keep = [r for r in range(len(rows)) if not done[r]]
                index = torch.tensor(keep, device=device)
                cache.keep(index)
                new, tok, pos = new[index], tok[index], pos[index]
                rows, done = [rows[r] for r in keep], [False] * len(keep)
        if step == max_new_tokens - 1:
            break
        h = None
        if step_fn is not None:
            try:
                h = step_fn(model, tok[:, None], pos, None, cache)[:, -1]
            except Exception as err:  # no C++ compiler, an unsupported torch: eager from now on
                give_up_compiling(err)
                step_fn = None
        if h is None:  # eager (a failed compiled step's cache writes are redone with the same values)
            h = model.hidden(tok[:, None], pos, None, cache)[:, -1]
        logits = model.lm_head(h).float()  # (b, V)
        cache.length += 1
        pos = pos + 1
    for r, i in enumerate(rows):  # rows that did not stop: the whole budget
        if not done[r]:
            out[i] = new[r].tolist()
    return out
