"""Batched decoding with a key/value cache: prompts of different lengths in one batch (left-padded), greedy or
sampled (temperature, top-k, top-p), each row stopping on its own at the stop id. One code path for
evaluation, the samples logged during training, chat and the benchmark."""
import dataclasses

import torch
import torch.nn.functional as F

from pipeline.model import ModelConfig, Transformer


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
    """Preallocated keys/values per layer, (B, n_kv_head, max_len, head_dim); `length` slots are filled.
    The model's Attention hands its q, k, v to `attend`, which stores k, v at `length`; `keep` drops finished rows."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.length = 0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor):
        """Store k, v (B, Hkv, T, D) at slots [length, length + T) and attend from q (B, H, T, D) over every
        filled slot; mask (B, 1, T, S) is additive (0 or -inf). Query head h reads key/value head h // rep (as
        HF's repeat_kv) by viewing the rep query heads of a group as extra rows: the cache is never copied."""
        B, H, T, D = q.shape
        start, n_kv = self.length, self.k[layer].shape[1]
        self.k[layer][:, :, start : start + T] = k
        self.v[layer][:, :, start : start + T] = v
        keys, values = self.k[layer][:, :, : start + T], self.v[layer][:, :, : start + T]  # (B, Hkv, S, D)
        rep = H // n_kv
        if T > 1:  # a prompt: fused attention over the (few) repeated key/value heads
            keys, values = keys.repeat_interleave(rep, 1), values.repeat_interleave(rep, 1)
            # a bool mask (True: attend) is accepted whatever dtype autocast gives q, k, v
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask == 0)
        q = q.reshape(B, n_kv, rep, D)  # heads g*rep .. g*rep+rep-1 share key/value head g
        scores = torch.matmul(q, keys.transpose(-1, -2)) * D**-0.5 + mask  # (B, Hkv, rep, S)
        y = torch.matmul(scores.softmax(-1), values)  # (B, Hkv, rep, D)
        return y.view(B, H, T, D)

    def window(self, first: int, last: int, start: int) -> "KVCache":
        """A view of rows [first, last) from slot `start` on, empty: writes through it fill this cache."""
        view = KVCache.__new__(KVCache)
        view.k = [k[first:last, :, start:] for k in self.k]
        view.v = [v[first:last, :, start:] for v in self.v]
        view.length = 0
        return view

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only `rows` (indices) of the batch, up to the filled length."""
        self.k = [k.index_select(0, rows) for k in self.k]
        self.v = [v.index_select(0, rows) for v in self.v]


def additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool mask -> 0 where attention is allowed, -inf elsewhere (built once per step, shared by all layers)."""
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
    device = cache.k[0].device
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
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # a pad query attends to itself only, so no softmax row is empty; its output is never read
        allowed = (causal & real[:, None]) | torch.eye(width, dtype=torch.bool, device=device)  # (n, W, W)
        window = cache.window(start, end, P - width)
        h = model.hidden(ids, pos, additive(allowed, cache.k[0].dtype)[:, None], window)[:, -1]
        logits.append(model.lm_head(h).float())
        start = end
    cache.length = P
    return torch.cat(logits)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, stop_id: int,
             sampling: Sampling = GREEDY) -> list[list[int]]:
    """New tokens per prompt, ending with `stop_id` when the row stopped within max_new_tokens.
    Prompts are left-padded: row i of the batch has its tokens in the last len(prompt_i) slots, positions
    counting from 0 at its first real token, and attention never reads a pad slot. Rows that stopped are
    dropped from the batch as more of them finish, so a few long answers do not carry the whole batch."""
    assert prompts and min(map(len, prompts)) > 0, "generate: every prompt needs at least one token"
    model.eval()
    param = next(model.parameters())
    device = param.device
    B, P = len(prompts), max(len(p) for p in prompts)
    total = P + max_new_tokens
    order = sorted(range(B), key=lambda i: len(prompts[i]))  # similar lengths side by side for the prefill
    valid = torch.zeros(B, total, dtype=torch.bool, device=device)  # which cache slots hold real tokens
    for row, i in enumerate(order):
        valid[row, P - len(prompts[i]):P] = True
    cache = KVCache(model.cfg, B, total, device, param.dtype)
    logits = prefill(model, [prompts[i] for i in order], cache, P)
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    new = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)  # generated tokens, by original row
    n_new = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)  # tokens each row produced
    rows = torch.tensor(order, device=device)  # original index of each row in the batch
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = torch.tensor([len(prompts[i]) for i in order], device=device)
    for step in range(max_new_tokens):
        tok = pick(logits, sampling, gen)
        new[rows[~done], step] = tok[~done]  # a finished row still decodes until it is dropped; not recorded
        stopped = (tok == stop_id) & ~done
        n_new[rows[stopped]] = step + 1
        done |= stopped
        n_live = len(rows) - int(done.sum())
        if n_live == 0 or step == max_new_tokens - 1:
            break
        if n_live <= 0.75 * len(rows):  # drop finished rows once a quarter of the batch has stopped
            keep = (~done).nonzero()[:, 0]
            cache.keep(keep)
            rows, tok, next_pos, valid, done = rows[keep], tok[keep], next_pos[keep], valid[keep], done[keep]
        valid[:, cache.length] = True
        mask = additive(valid[:, None, None, : cache.length + 1], param.dtype)  # (b, 1, 1, S): every real slot
        h = model.hidden(tok[:, None], next_pos[:, None], mask, cache)[:, -1]
        logits = model.lm_head(h).float()  # (b, V)
        cache.length += 1
        next_pos = next_pos + 1
    return [row[:n] for row, n in zip(new.tolist(), n_new.tolist())]
