"""The memory plan of a transformers-backend model before it is loaded: the model built from config.json on the meta
device (no memory) gives every parameter, every expert included, so weights, gradients and AdamW state are exact;
one micro-batch's activations are estimated from what each decoder layer holds (its projections' inputs and outputs,
norms, attention, experts, linear-attention state), within pipeline.memory.ACTIVATION_FACTOR of what a CPU forward
keeps on the families tests/test_hf_memory.py measures."""
import torch
import torch.nn as nn

from pipeline.common import UserError
from pipeline.families import packing
from pipeline.hf_backend import HFModel, targeted
from pipeline.memory import MemoryPlan, local_elements, loss_chunk_of
from pipeline.quant import adamw8bit_bytes, nf4_bytes

OUT_PROJECTIONS = ("o_proj", "down_proj", "out_proj", "dense", "c_proj", "wo")  # outputs go into the residual sum


def meta_model(config: dict, folder: str = "", trust_remote_code: bool = False) -> HFModel:
    """The model of a config.json built on the meta device: shapes, no memory. A model with its own modeling code
    (trusted: base.trust_remote_code) is built from its folder's code."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.get("auto_map") and not (folder and trust_remote_code):
        raise UserError("a model that ships its own modeling code gets a memory plan only with "
                        "base.trust_remote_code: true")
    hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=True) if config.get("auto_map") else \
        AutoConfig.for_model(**config)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    return HFModel(hf, *packing(config))


def held(model: HFModel, lora, half_base: bool) -> tuple[list[tuple[tuple, int, bool]], int]:
    """((shape, bytes per element, trainable) of every parameter training holds, the bytes stored in NF4): all fp32
    and trained, or with LoRA a frozen base (bf16 when half_base) and fp32 adapters (r, in) and (out, r) on each
    targeted projection; with lora.quantize nf4 the targeted projections' frozen weights are NF4 codes and their
    quantization state instead (pipeline.quant), listed apart."""
    if lora is None:
        return [(tuple(p.shape), 4, True) for p in model.parameters()], 0  # a tied output layer once
    adapters, quantized, nf4 = [], set(), 0
    for linear in targeted(model, lora.targets).values():
        adapters += [((lora.rank, linear.in_features), 4, True), ((linear.out_features, lora.rank), 4, True)]
        if lora.quantize == "nf4":
            quantized.add(id(linear.weight))
            nf4 += nf4_bytes(linear.weight.numel())
    base = [(tuple(p.shape), 2 if half_base else 4, False) for p in model.parameters() if id(p) not in quantized]
    return base + adapters, nf4


def layer_bytes(model: HFModel, i: int, B: int, T: int, c: int, a: int, lora) -> int:
    """Bytes decoder layer i keeps for backward, from its modules: each projection's input (once per group sharing
    it) and output, norms (fp32 input, rsqrt, the normalised rows when the gain trains), the attention (rotated q, k,
    v, output, log-sum-exp; SDPA's CPU kernel turns the boolean mask into an additive one per layer, eager keeps its
    score matrices), experts (each token's share through k of them) and a linear-attention layer's chunked state."""
    R, cfg = B * T, model.cfg
    layer, kind = model.blocks[i], model.types[i]
    hq = cfg.num_attention_heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    trained = {id(m) for m in targeted(model, lora.targets).values()} if lora is not None else None
    kept, inputs = 0, set()
    for name, m in layer.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(m, nn.Linear):
            trains = trained is None or id(m) in trained
            parent = name.rpartition(".")[0]
            if trains and (parent, m.in_features) not in inputs:
                inputs.add((parent, m.in_features))  # q, k and v (gate and up) read one input
                kept += R * m.in_features * c
            if leaf not in OUT_PROJECTIONS:
                kept += R * m.out_features * c * (3 if leaf in ("gate_proj", "up_proj", "gate_up_proj") else 2) // 2
            if lora is not None and id(m) in trained:
                kept += R * lora.rank * c
        elif type(m).__name__.endswith("Norm") and getattr(m, "weight", None) is not None:
            width = m.weight.shape[-1]
            rows = R if width != hd else R * hq
            kept += rows * width * 4 + rows * 4 + (rows * width * a if lora is None else 0)
        elif any(p.dim() == 3 for p in m.parameters(recurse=False)):  # stacked experts (E, in, out)
            inner = min(min(p.shape[1:]) for p in m.parameters(recurse=False) if p.dim() == 3)
            kept += R * model.top_k * (3 * cfg.hidden_size + 4 * inner) * c + 2 * R * model.experts * 4
    if kind in ("full_attention", "sliding_attention"):
        kept += R * hq * hd * 2 * c + R * hq * 4  # SDPA's output (and o's input), log-sum-exp
        if cfg._attn_implementation == "eager":
            kept += 3 * B * hq * T * T * 4  # scores, probabilities, their dropout
        else:
            kept += B * T * T * c  # the additive mask SDPA's CPU kernel makes per layer
    else:  # linear attention: its convolution, normalised q, k, v, gates, chunked state (fp32)
        width = sum(m.out_features for n, m in layer.named_modules() if isinstance(m, nn.Linear)
                    and n.rpartition(".")[2] not in OUT_PROJECTIONS)
        kept += 6 * R * width * 4
    return kept


def activation_bytes(model: HFModel, B: int, T: int, c: int, a: int, lora, loss_chunk: int) -> tuple[int, int]:
    """(without, with activation checkpointing): the layers, plus the embedding's ids, the masks (one per layer
    type, boolean or additive), RoPE tables, the final norm and the chunked loss at the most trained positions a row
    can have (B T); with checkpointing each layer keeps only its input and one layer is recomputed at a time."""
    cfg, R = model.cfg, B * T
    d, V = cfg.hidden_size, cfg.vocab_size
    hd = getattr(cfg, "head_dim", None) or d // cfg.num_attention_heads
    layers = [layer_bytes(model, i, B, T, c, a, lora) for i in range(len(model.blocks))]
    mask = B * T * T * (4 if cfg._attn_implementation == "eager" else 1) * len(set(model.types))
    N = R
    chunked = 0 < loss_chunk < N
    outside = R * 8 + 2 * N * 8 + 2 * R * hd * 4 + mask + R * d * (4 + a) + R * 4
    outside += (N * d * a if chunked else N * d * c) + 2 * (loss_chunk if chunked else N) * V * 4
    x = R * d * a
    return outside + sum(layers), outside + len(layers) * x + max(layers)


def plan_memory(config: dict, cfg, block_size: int, world: int, device_type: str, bf16: bool, folder: str = "",
                trust_remote_code: bool = False) -> MemoryPlan:
    """pipeline.memory.plan_memory for a transformers-backend model, from its config.json alone (and from its
    folder's modeling code, when it ships some and it is trusted)."""
    model = meta_model(config, folder, trust_remote_code)
    lora = getattr(cfg, "lora", None)
    lora = lora if lora is not None and lora.rank > 0 else None
    offload = getattr(cfg, "offload", "none") == "optimizer"
    fsdp = (getattr(cfg, "parallel", "ddp") == "fsdp" and world > 1) or offload  # offload: FSDP2, one process too
    shards = world if fsdp else 1
    half_base = lora is not None and device_type == "cuda" and bf16 and not fsdp
    tensors, nf4 = held(model, lora, half_base)
    trained = [local_elements(shape, shards) for shape, _, trains in tensors if trains]
    weights = sum(local_elements(shape, shards) * size for shape, size, _ in tensors) + nf4  # NF4: never sharded
    eight = getattr(cfg, "optimizer", "adamw") == "adamw8bit"
    optimizer = adamw8bit_bytes(trained) if eight else 8 * sum(trained) + 4 * len(trained)
    chunk = loss_chunk_of(cfg)
    activations, checkpointed = activation_bytes(model, cfg.batch_size, block_size, 2 if bf16 else 4,
                                                 2 if half_base else 4, lora, chunk)
    rows = cfg.batch_size * block_size  # the most trained positions a micro-batch can have
    transient = (chunk if 0 < chunk < rows else rows) * model.cfg.vocab_size * 4
    return MemoryPlan(weights, 4 * sum(trained), optimizer, activations, checkpointed, cfg.activation_checkpointing,
                      block_size, device_type, bf16, transient, offload and device_type == "cuda", nf4, eight)

