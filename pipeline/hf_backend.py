"""The transformers backend: any decoder transformers builds, behind the interface of pipeline/backend.py. The loss
stays ours (last hidden state at trained positions, chunked, fp32; the family's logit softcapping); packed rows get
the document mask on every attention layer type (windows ANDed in), in the format its attention takes; MoE models
add their router's load-balancing loss; decoding runs over transformers' cache; export through save_pretrained."""
import dataclasses
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tokenizers import Tokenizer

from pipeline.common import UserError, print0
from pipeline.config import LoraConfig
from pipeline.families import ATTENTION_LAYERS, layer_types, packing, read_config
from pipeline.generate import GREEDY, Sampling, pick
from pipeline.hf import weight_files, weights_dtype, write_configs
from pipeline.lora import LoraLinear, write_adapter
from pipeline.model import doc_causal_mask, neftune, output_loss, trained_targets
from pipeline.quant import store_nf4

DEQUANTIZED = ("mxfp4",)  # quantized checkpoints loaded dequantized to bf16 (gpt-oss ships MXFP4 experts)
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # Phi-3's fused
PROBE = (13, 11)  # the probe's two conversations, in tokens: packed in one row, and each alone


@dataclasses.dataclass(frozen=True)
class Shape:
    """What the pipeline reads of a model's shape (the native model's `arch` offers the same fields)."""
    model_type: str
    n_layer: int
    n_embd: int
    vocab_size: int
    max_seq_len: int


# ---- what is refused, in one line --------------------------------------------------------------------------------
def check_config(config: dict, where: str, trust_remote_code: bool) -> None:
    """A config transformers can build without running code the folder ships, unless asked to; quantized weights
    only in the formats dequantized at import."""
    kind = config.get("model_type")
    if config.get("auto_map") and not trust_remote_code:
        raise UserError(f"{where}: this model ships its own modeling code (auto_map: "
                        f"{', '.join(sorted(config['auto_map']))}), which is never run unless you ask for it: set "
                        "base.trust_remote_code: true if you trust its source, or use a model transformers knows")
    from transformers import CONFIG_MAPPING, __version__

    if kind not in CONFIG_MAPPING and not config.get("auto_map"):
        raise UserError(f"{where}: model_type {kind!r} is known neither to the native backend nor to transformers "
                        f"{__version__}; use a model of a known family, or a transformers release that defines it")
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant and quant not in DEQUANTIZED:
        raise UserError(f"{where}: the weights are quantized ({quant}); fine-tune from the unquantized checkpoint "
                        "of this model (its bf16/fp32 release)")


def load_hf(folder: str, trust_remote_code: bool = False):
    """The transformers model of a folder in fp32 (the master weights of training), SDPA attention where the family
    has it (else eager); MXFP4 experts dequantized."""
    from transformers import AutoModelForCausalLM, Mxfp4Config
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = read_config(folder)
    check_config(config, f"{folder}/config.json", trust_remote_code)
    weight_files(folder)  # safetensors only: a folder of pickles is refused, never unpickled
    kw = {"dtype": torch.float32, "trust_remote_code": trust_remote_code, "use_safetensors": True,
          "output_loading_info": True}
    if (config.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        kw["quantization_config"] = Mxfp4Config(dequantize=True)
    level = logging.get_verbosity()
    logging.set_verbosity_error()  # a refused folder is one line of ours, not transformers' warnings before it
    try:
        try:
            model, info = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa", **kw)
        except ValueError as e:  # a family without SDPA (gpt-oss: attention sinks) runs eager attention
            if "scaled_dot_product_attention" not in str(e):
                raise
            model, info = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", **kw)
    except (OSError, ValueError, KeyError, AttributeError, RuntimeError, TypeError) as e:  # the folder's fault
        raise UserError(f"{folder}: transformers cannot load this model ({type(e).__name__}: "
                        f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}); is it the model its "
                        "config.json describes?") from None
    finally:
        logging.set_verbosity(level)
    wrong = {k: v for k in ("missing_keys", "unexpected_keys", "mismatched_keys") if (v := list(info.get(k) or []))}
    if wrong:  # transformers would start missing weights from random values: never train on that
        raise UserError(f"{folder}: its weights do not match its config.json ("
                        + "; ".join(f"{k.replace('_', ' ')}: {', '.join(map(str, v[:3]))}"
                                    f"{' ...' if len(v) > 3 else ''}" for k, v in wrong.items())
                        + "); a shard may be missing, or config.json belongs to another model")
    if "quantization_config" in kw:  # dequantized: from here on a plain model (never re-quantized on saving)
        model.hf_quantizer = None
        model._weight_conversions = None  # saved under the plain names, not re-packed into MXFP4 blocks
        model.config.__dict__.pop("quantization_config", None)
    return model.float()


# ---- the model ---------------------------------------------------------------------------------------------------
def decoder_layers(hf: nn.Module, n_layer: int) -> nn.ModuleList:
    """The decoder's layers: the ModuleList of the base model that holds num_hidden_layers modules."""
    lists = [m for name, m in hf.base_model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n_layer
             and not any(k in name for k in ("vision", "audio", "visual"))]
    if not lists:
        raise UserError(f"{type(hf).__name__}: no list of {n_layer} decoder layers found; this architecture is not "
                        "supported by the transformers backend")
    return lists[0]


class HFModel(nn.Module):
    """A transformers model with the native model's surface (see pipeline/backend.py). `hf` is the model as
    transformers built it; its state dict is the checkpoint's under the prefix `hf.`."""

    def __init__(self, hf: nn.Module, packable: bool, why: str = ""):
        super().__init__()
        self.hf = hf
        cfg = hf.config.get_text_config()
        self.cfg = cfg
        self.arch = Shape(hf.config.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size,
                          getattr(cfg, "max_position_embeddings", None) or 2048)
        object.__setattr__(self, "_blocks", decoder_layers(hf, cfg.num_hidden_layers))  # not a second submodule
        self.types = layer_types(cfg.to_dict())
        self.packable, self.why = packable, why
        self.softcap = float(getattr(cfg, "final_logit_softcapping", None) or 0.0)
        experts = getattr(cfg, "num_experts", None) or getattr(cfg, "num_local_experts", None)
        self.experts, self.top_k = int(experts or 0), int(getattr(cfg, "num_experts_per_tok", None) or 0)
        self.aux_coef = float(getattr(cfg, "router_aux_loss_coef", None) or 0.0) if self.experts else 0.0
        self.router_loss = None  # the last training forward's load-balancing loss, coefficient applied (MoE)
        # DDP: a step may leave some parameters without a gradient (experts no token was routed to, a vision
        # tower); finding them costs a graph traversal per step, paid on this backend for every family
        self.sparse = True
        # runtime knobs set by training (pipeline/train.py:configure), as on the native model
        self.loss_chunk, self.neftune_alpha, self.use_flex, self._checkpointing = 0, 0.0, False, False

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks

    @property
    def checkpointing(self) -> bool:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        """Activation checkpointing per decoder layer (transformers' own, non-reentrant); in training only."""
        if on != self._checkpointing:
            if on:
                self.hf.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.hf.activation_checkpointing_disable()
        self._checkpointing = on

    def compile_blocks(self) -> None:
        print0("compile: not applied on the transformers backend (its layers run eager)")

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def head(self) -> torch.Tensor:
        return self.hf.get_output_embeddings().weight

    def masks(self, doc: torch.Tensor, dtype: torch.dtype):
        """The attention masks of a packed row for each layer type, as the model's attention implementation takes
        them: boolean (B, 1, T, T) for SDPA, additive for eager; the window ANDed in on sliding layers; None for a
        linear-attention layer (it gets no mask). One mask when all layers share a type, else {type: mask}."""
        T = doc.shape[1]
        window = int(getattr(self.cfg, "sliding_window", None) or 0)
        eager = self.cfg._attn_implementation == "eager"
        out = {}
        for kind in dict.fromkeys(self.types):
            if kind not in ATTENTION_LAYERS:
                out[kind] = None
                continue
            allowed = doc_causal_mask(doc, window if kind == "sliding_attention" and window < T else 0)
            out[kind] = torch.zeros(allowed.shape, dtype=dtype, device=doc.device).masked_fill_(
                ~allowed, torch.finfo(dtype).min) if eager else allowed
        return next(iter(out.values())) if len(out) == 1 else out

    def hidden(self, ids, pos, doc, aux: bool):
        """The base model's last hidden state (B, T, D) and, when aux, its router logits per MoE layer."""
        embeds = None
        if self.neftune_alpha and self.training and torch.is_grad_enabled():
            embeds = neftune(self.hf.get_input_embeddings()(ids), doc, self.neftune_alpha)  # training steps only
        masks = None if doc is None else self.masks(doc, torch.float32)
        out = self.hf.base_model(input_ids=None if embeds is not None else ids, inputs_embeds=embeds,
                                 attention_mask=masks, position_ids=pos, use_cache=False,
                                 **({"output_router_logits": True} if aux else {}))
        return out.last_hidden_state, (out.router_logits if aux else None)

    def states(self, ids, pos, doc):
        """The final hidden states (B, T, D) of rows with document ids (-1: padding), as the native model's."""
        return self.hidden(ids, pos, doc, False)[0]

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.head()).float()
        return self.softcap * torch.tanh(logits / self.softcap) if self.softcap else logits

    def forward(self, ids, labels=None, pos=None, doc=None, at=None, targets=None):
        """As the native model: without labels, logits (B, T, V) in fp32; with them (or `at` and `targets`), the
        sum of fp32 cross-entropies over the trained targets and their number. In training a MoE model leaves
        its load-balancing loss (coefficient applied) in `router_loss`; never in evaluation or generation."""
        B, T = ids.shape
        if pos is None:
            pos = torch.arange(T, device=ids.device).expand(B, T)
        aux = bool(self.aux_coef) and self.training and torch.is_grad_enabled()
        h, router = self.hidden(ids, pos, doc, aux)
        self.router_loss = self.aux_coef * load_balancing(router, self.experts, self.top_k, doc) if aux else None
        if labels is None and at is None:
            return self.logits(h)
        if at is None:
            at, targets = trained_targets(labels, doc)
        loss_sum = output_loss(h.flatten(0, 1).index_select(0, at), self.head(), targets, self.loss_chunk,
                               self.softcap)
        return loss_sum, at.numel()

    def decode(self, prompts: list[list[int]], max_new_tokens: int, stop_id: int | list[int],
               sampling: Sampling = GREEDY) -> list[list[int]]:
        return decode(self, prompts, max_new_tokens, stop_id, sampling)


def load_balancing(router_logits, n_experts: int, top_k: int, doc: torch.Tensor | None) -> torch.Tensor:
    """The router's load-balancing loss as the model's own transformers code defines it (Switch Transformer's
    E * sum_i f_i P_i): one softmax per layer's router logits (N, E); f_i the share of top-k assignments to expert i
    and P_i its mean probability, both over every MoE layer's real tokens (padding, doc -1, left out)."""
    keep = None if doc is None else (doc >= 0).flatten().float()
    counts = probs = 0
    rows = 0.0
    for layer in router_logits:
        p = layer.float().softmax(-1)  # (N, E): the one softmax
        chosen = p.topk(top_k, dim=-1).indices  # (N, k)
        w = torch.ones(p.shape[0], device=p.device) if keep is None else keep.to(p.device)
        counts = counts + torch.zeros(n_experts, device=p.device).scatter_add_(0, chosen.flatten(),
                                                                               w.repeat_interleave(top_k))
        probs = probs + (p * w[:, None]).sum(0)
        rows = rows + w.sum()
    return n_experts * (counts / rows * probs / rows).sum()


def probe(model: HFModel, where: str) -> None:
    """Refuse, in one line, a model whose logits our output layer does not reproduce (a logit scale or bias this
    backend does not know), or, when the family is said to pack, whose packed row differs from its conversations
    alone (a layer that lets them see each other). A few dozen tokens through the model: cheap next to loading it."""
    was = model.training
    model.eval()
    n = sum(PROBE)
    ids = torch.randint(0, model.arch.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
    ids = ids.to(next(model.parameters()).device)
    with torch.no_grad():
        theirs = model.hf(input_ids=ids, use_cache=False).logits.float()
        ours = model(ids)
        close = lambda a, b: torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (1 + b.abs().max().item()))  # noqa: E731
        if not close(ours, theirs):
            raise UserError(f"{where}: model_type {model.arch.model_type}: our output layer does not reproduce the "
                            f"model's logits (max difference {(ours - theirs).abs().max().item():.3g}); this family "
                            "is not supported by the transformers backend")
        if model.packable:
            pos = torch.cat([torch.arange(k) for k in PROBE])[None].to(ids.device)
            doc = torch.cat([torch.full((k,), i) for i, k in enumerate(PROBE)])[None].to(ids.device)
            packed = model(ids, pos=pos, doc=doc)[0]
            alone = torch.cat([model(x[None])[0] for x in ids[0].split(PROBE)])
            if not close(packed, alone):
                raise UserError(f"{where}: model_type {model.arch.model_type}: a packed row's logits differ from "
                                f"each conversation's alone (by {(packed - alone).abs().max().item():.3g}): its layers "
                                "do not keep packed conversations apart; this family cannot be trained here yet")
    model.train(was)


def load_model(folder: str, device="cpu", trust_remote_code: bool = False) -> HFModel:
    """A model folder as an HFModel in fp32, probed (see `probe`)."""
    hf = load_hf(folder, trust_remote_code)
    ok, why = packing(hf.config.to_dict())
    model = HFModel(hf, ok, why)
    probe(model, f"{folder}/config.json")
    return model.to(device)


# ---- generation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def decode(model: HFModel, prompts: list[list[int]], max_new_tokens: int, stop_id: int | list[int],
           sampling: Sampling = GREEDY) -> list[list[int]]:
    """pipeline.generate.generate over transformers' own cache: prompts left-padded (positions from 0 at each
    prompt's first token, pad slots masked), greedy or sampled by `pick`, each row stopping at any stop id."""
    from transformers import DynamicCache

    assert prompts and min(map(len, prompts)) > 0, "generate: every prompt needs at least one token"
    model.eval()
    hf = model.hf
    device = next(model.parameters()).device
    P = max(map(len, prompts))
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device)
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache(config=hf.config)
    out = hf(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache, use_cache=True,
             logits_to_keep=1)
    gen = torch.Generator(device=device).manual_seed(sampling.seed) if sampling.temperature > 0 else None
    stops = torch.tensor(stop_id if isinstance(stop_id, list) else [stop_id], device=device)
    nxt, done, new = pos[:, -1:] + 1, torch.zeros(len(prompts), dtype=torch.bool, device=device), []
    for step in range(max_new_tokens):
        tok = pick(out.logits[:, -1].float(), sampling, gen)
        new.append(tok)
        done |= torch.isin(tok, stops)
        if step == max_new_tokens - 1 or bool(done.all()):  # the step's one read of the device
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = hf(input_ids=tok[:, None], attention_mask=mask, position_ids=nxt, past_key_values=cache,
                 use_cache=True)
        nxt = nxt + 1
    rows = torch.stack(new, 1).tolist()
    stop = set(stops.tolist())
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in rows]


# ---- export ------------------------------------------------------------------------------------------------------
def save_model(model: HFModel, tok: Tokenizer, folder: str, like: str, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 5 * 10**9) -> None:
    """The model folder through transformers' save_pretrained (its own weight names and layout), in `dtype` (by
    default the dtype `like` stores), sharded above max_shard_bytes; config.json is `like`'s field for field (a
    checkpoint dequantized at import loses its quantization_config), the generation config gets our end token,
    and the tokenizer files their chat template. Casts `model` in place: call it last."""
    dtype = dtype or weights_dtype(like)
    Path(folder).mkdir(parents=True, exist_ok=True)
    model.hf.to("cpu", dtype).save_pretrained(folder, max_shard_size=max_shard_bytes)
    write_configs(folder, like, dtype, tok, drop=("quantization_config",))


# ---- LoRA --------------------------------------------------------------------------------------------------------
def targeted(model: HFModel, targets: list[str]) -> dict[str, nn.Linear]:
    """Module path -> nn.Linear of each targeted projection inside the decoder layers, by transformers' leaf names;
    a fused projection (Phi-3's qkv_proj, gate_up_proj) is targeted when any of its parts is."""
    wanted = set(targets) | {fused for fused, parts in FUSED.items() if set(parts) & set(targets)}
    inside = {id(m) for m in model.blocks.modules()}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and id(m) in inside and name.rpartition(".")[2] in wanted}


def add_adapters(model: HFModel, cfg: LoraConfig, seed: int, device=None) -> int:
    """pipeline.lora.add_adapters on an HFModel: every weight frozen, LoraLinear on the targeted projections (QLoRA:
    their frozen weights stored in NF4 on `device`, as natively)."""
    for p in model.parameters():
        p.requires_grad_(False)
    found = targeted(model, cfg.targets)
    if not found:
        raise UserError(f"train.lora.targets={cfg.targets}: none of these projections is in a decoder layer of "
                        f"{model.arch.model_type}; name some it has")
    generator = torch.Generator().manual_seed(seed)
    for name, linear in found.items():
        parent, _, leaf = name.rpartition(".")
        lora = LoraLinear(linear, cfg.rank, cfg.alpha, cfg.dropout, generator)
        if cfg.quantize == "nf4":
            store_nf4(lora, device)
        setattr(model.get_submodule(parent), leaf, lora)
    leaves = sorted({n.rpartition(".")[2] for n in found})
    print0(f"lora: rank {cfg.rank} adapters on {len(found)} projections ({', '.join(leaves)})")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_adapter(tensors: dict[str, torch.Tensor], cfg: LoraConfig, folder: str, base: str) -> None:
    """The adapters (HFModel names: hf.<module>.lora_A) in PEFT's layout, as PeftModel.from_pretrained reads it."""
    leaves = sorted({n.removesuffix(".lora_A").removesuffix(".lora_B").rpartition(".")[2] for n in tensors})
    write_adapter(folder, {f"base_model.model.{n.removeprefix('hf.')}.weight": t for n, t in tensors.items()}, cfg,
                  base, leaves)
