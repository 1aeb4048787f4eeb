"""A memory plan before anything heavy: architecture + train params -> bytes per rank (weights, gradients, optimizer
state: exact, for full, LoRA or QLoRA (NF4) training, AdamW or 8-bit AdamW, DDP or FSDP, on the device or offloaded
to host memory; one micro-batch's activations with and without checkpointing and the loss's backward peak:
estimated, within ACTIVATION_FACTOR = 1.5x either way of what a CPU forward keeps, measured_activation_bytes), checked
against the device's free memory and the host's: a run that cannot fit stops in one line naming the cheapest
combination of settings that would."""
import dataclasses
import itertools
import math
import os
import re

import torch

from pipeline.common import Compute, UserError, print0
from pipeline.config import LoraConfig, ParamError
from pipeline.lora import TARGETS
from pipeline.model import Architecture
from pipeline.quant import adamw8bit_bytes, nf4_bytes

GIB = 2**30
ACTIVATION_FACTOR = 1.5  # planned / measured activations, either way, on the configurations tests/test_memory.py runs
FIT_RANK = 16  # the LoRA rank check_fit proposes
FIT_WORLDS = (2, 4, 8)  # the FSDP process counts check_fit tries
# what each change check_fit may propose costs, to rank the combinations that fit: the run's speed and how far the
# result moves from the one asked for
FIT_COSTS = {"activation_checkpointing": 1,  # ~30% more compute, the same result
             "batch": 1,  # more, smaller micro-batches: the same rows per step and result, less throughput
             "optimizer": 2,  # 8-bit moments: nearly the same loss curve
             "offload": 4,  # the optimizer step on the host, the weights over PCIe at every step: much slower
             "lora": 5,  # adapters instead of every weight: another model (dearer than a slower run of the same)
             "quantize": 2,  # on top of LoRA: the frozen base in 4 bits
             "fsdp": 6}  # more GPUs
AUTO_CHUNK = 8192  # loss_chunk: auto where free memory is unknown (the CPU)
MIN_CHUNK = 512  # the smallest chunk auto tries
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def gib(n: int) -> str:
    x = n / GIB
    return f"{x:,.2f}" if x >= 0.1 else f"{x:.2g}"


@dataclasses.dataclass
class MemoryPlan:
    weights: int  # bytes per rank: every parameter as it is held in training (NF4 ones with their quantization state)
    gradients: int  # bytes per rank: gradients of the trainable parameters (fp32)
    optimizer: int  # bytes per rank: AdamW's exp_avg and exp_avg_sq (fp32) and its 4-byte `step` per tensor, or
    # AdamW8bit's uint8 moments with their absmax and code tables
    activations: int  # estimated bytes one micro-batch keeps for backward, no activation checkpointing
    activations_checkpointed: int  # the same with activation checkpointing (block inputs + one block recomputed)
    checkpointing: bool  # which of the two the run uses
    # how it was planned, so that check_fit can plan the alternatives the same way
    block_size: int = 0
    device_type: str = "cpu"
    bf16: bool = False
    loss_transient: int = 0  # the output layer's backward peak beyond what is kept: one more fp32 (chunk, vocab)
    offloaded: bool = False  # weights, gradients and optimizer state in host memory, not on the device
    nf4: int = 0  # of `weights`, the bytes stored in NF4 (codes and quantization state)
    adamw8bit: bool = False  # `optimizer` is AdamW8bit's state

    def total(self) -> int:
        """Bytes on the device."""
        used = self.activations_checkpointed if self.checkpointing else self.activations
        return (0 if self.offloaded else self.host_state()) + used + self.loss_transient

    def host_state(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def host(self) -> int:
        """Bytes this rank keeps in host memory: the offloaded state (0 when not offloaded)."""
        return self.host_state() if self.offloaded else 0

    def metrics(self) -> dict[str, float]:
        """For reports/train/metrics.json: each figure in GiB (the total with the activations the run uses; the host's
        share when offloaded)."""
        host = (("host", self.host()),) if self.offloaded else ()
        return {f"plan_{k}_gib": v / GIB for k, v in (
            ("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
            ("activations", self.activations), ("activations_checkpointed", self.activations_checkpointed),
            ("loss_transient", self.loss_transient), ("total", self.total()), *host)}

    def line(self, free: int | None, host_free: int | None = None) -> str:
        where = "free: unknown (CPU)" if free is None else f"of {gib(free)} GiB free"
        used = ", used" if self.checkpointing else ""
        nf4 = f" ({gib(self.nf4)} of it NF4)" if self.nf4 else ""
        state = (f"weights {gib(self.weights)} GiB{nf4} + gradients {gib(self.gradients)} + AdamW"
                 f"{' 8-bit' if self.adamw8bit else ''} {gib(self.optimizer)}")
        device = (f"activations {gib(self.activations)} (checkpointed: {gib(self.activations_checkpointed)}{used}) + "
                  f"loss peak {gib(self.loss_transient)} = {gib(self.total())} GiB {where}")
        if not self.offloaded:
            return f"memory plan per rank: {state} + {device}"
        host = "" if host_free is None else f" of {gib(host_free)} GiB available"
        return f"memory plan per rank: {device}; offloaded to host memory: {state} = {gib(self.host())} GiB{host}"


# ---- parameters: exact -----------------------------------------------------------------------------------------
def parameter_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Our parameter names -> shapes, as Transformer(arch).named_parameters() lists them (a tied lm_head once, as
    embed.weight), without building the model."""
    d, hd, inner = arch.n_embd, arch.head_dim, arch.intermediate_size
    q, kv = arch.n_head * hd, arch.n_kv_head * hd
    block = {"attn_norm.weight": (d,)}
    for name, (out, inp), bias in (("attn.q", (q, d), arch.qkv_bias), ("attn.k", (kv, d), arch.qkv_bias),
                                   ("attn.v", (kv, d), arch.qkv_bias), ("attn.o", (d, q), arch.o_bias),
                                   ("mlp.gate", (inner, d), arch.mlp_bias), ("mlp.up", (inner, d), arch.mlp_bias),
                                   ("mlp.down", (d, inner), arch.mlp_bias)):
        block[f"{name}.weight"] = (out, inp)
        if bias:
            block[f"{name}.bias"] = (out,)
    if arch.qk_norm:
        block |= {"attn.q_norm.weight": (hd,), "attn.k_norm.weight": (hd,)}
    block["mlp_norm.weight"] = (d,)
    shapes = {"embed.weight": (arch.vocab_size, d)}
    shapes |= {f"blocks.{i}.{k}": v for i in range(arch.n_layer) for k, v in block.items()}
    shapes["norm.weight"] = (d,)
    if not arch.tie_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, d)
    return shapes


def adapter_shapes(arch: Architecture, lora: LoraConfig) -> dict[str, tuple[int, ...]]:
    """The LoRA parameters add_adapters makes: lora_A (r, in) and lora_B (out, r) per targeted projection."""
    shapes = parameter_shapes(arch)
    adapters = {}
    for i in range(arch.n_layer):
        for target in lora.targets:
            out, inp = shapes[f"blocks.{i}.{TARGETS[target]}.weight"]
            adapters[f"blocks.{i}.{TARGETS[target]}.lora_A"] = (lora.rank, inp)
            adapters[f"blocks.{i}.{TARGETS[target]}.lora_B"] = (out, lora.rank)
    return adapters


def nf4_shapes(arch: Architecture, lora: LoraConfig | None) -> dict[str, tuple[int, ...]]:
    """The weights QLoRA stores in NF4: those of the adapted projections (pipeline.lora.add_adapters)."""
    if lora is None or lora.quantize != "nf4":
        return {}
    shapes = parameter_shapes(arch)
    return {f"blocks.{i}.{TARGETS[t]}.weight": shapes[f"blocks.{i}.{TARGETS[t]}.weight"]
            for i in range(arch.n_layer) for t in lora.targets}


def held_tensors(arch: Architecture, lora: LoraConfig | None, half_base: bool) -> list[tuple[tuple, int, bool]]:
    """(shape, bytes per element, trainable) of every parameter training holds. LoRA freezes the base (bf16 when
    half_base) and trains fp32 adapters; full training keeps everything in fp32 (autocast casts per matmul). The
    weights stored in NF4 are not listed (nf4_shapes)."""
    if lora is None:
        return [(shape, 4, True) for shape in parameter_shapes(arch).values()]
    quantized = nf4_shapes(arch, lora)
    base = [(shape, 2 if half_base else 4, False) for name, shape in parameter_shapes(arch).items()
            if name not in quantized]
    return base + [(shape, 4, True) for shape in adapter_shapes(arch, lora).values()]


def local_elements(shape: tuple, shards: int) -> int:
    """Elements of the largest shard: FSDP2 splits dim 0 into `shards` chunks, padded to ceil(dim0 / shards) rows."""
    return math.ceil(shape[0] / shards) * math.prod(shape[1:])


# ---- activations: estimated ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Forward:
    """One micro-batch's forward on one rank, as far as what autograd keeps depends on it."""
    arch: Architecture
    lora: LoraConfig | None  # None: full training
    batch: int  # rows B
    tokens: int  # T
    compute: int  # bytes of the compute dtype: 2 under bf16 autocast, else 4
    base: int  # bytes of the base weights, so of the embedding output and the residual stream
    cuda: bool  # FlexAttention (no dense mask, GQA inside the kernel); elsewhere SDPA's CPU kernel

    @property
    def rows(self) -> int:
        return self.batch * self.tokens

    def trains(self, projection: str) -> bool:
        return self.lora is None or projection in {TARGETS[t] for t in self.lora.targets}

    def inputs(self, projections: tuple, width: int, src: int, already_kept: bool = False) -> int:
        """Bytes kept of the input (rows, width) in `src` bytes that `projections` share, for their weights' (or
        adapters') gradients: the input once, or a copy per projection where autocast casts it or LoRA's dropout
        drops it. A frozen projection keeps nothing: its input's gradient needs only the weight. already_kept: the
        input is kept anyway (o's, SDPA's output)."""
        R, c = self.rows, self.compute
        kept, shared = 0, False
        for p in filter(self.trains, projections):
            if self.lora is not None and self.lora.dropout > 0:
                kept += R * width * (1 + c)  # dropout's bool mask and the dropped input lora_A multiplies
            elif src != c:
                kept += R * width * c  # autocast casts the fp32 input once for each matmul
            else:
                shared = True
        return kept + (R * width * src if shared and not already_kept else 0)

    def norm(self, rows: int, width: int, src: int) -> int:
        """RMSNorm keeps its input in fp32 (pow), the rsqrt, and, when its gain trains, the normalised input."""
        return rows * width * 4 + rows * 4 + (rows * width * src if self.lora is None else 0)

    def block(self) -> int:
        arch, R, B, T, c, a = self.arch, self.rows, self.batch, self.tokens, self.compute, self.base
        d, hd, hq, hkv, inner = arch.n_embd, arch.head_dim, arch.n_head, arch.n_kv_head, arch.intermediate_size
        kept = 2 * self.norm(R, d, a)
        kept += self.inputs(("attn.q", "attn.k", "attn.v"), d, a) + self.inputs(("mlp.gate", "mlp.up"), d, a)
        if arch.qk_norm:  # per head, on the projections' outputs (compute dtype)
            kept += self.norm(R * hq, hd, c) + self.norm(R * hkv, hd, c)
        # SDPA gets k and v repeated to n_head heads (repeat_interleave); FlexAttention reads the kv heads directly
        kv = hkv if self.cuda else hq
        kept += R * hd * (2 * hq + 2 * kv) * c + R * hq * 4  # rotated q, k, v, the output; fp32 logsumexp
        if not self.cuda:  # SDPA's CPU kernel turns the bool mask into an additive one, per layer
            kept += B * T * T * c
        # on CPU o's input is a view of SDPA's (B, T, H, D) output; FlexAttention's is (B, H, T, D): a copy
        kept += self.inputs(("attn.o",), hq * hd, c, already_kept=not self.cuda)
        kept += 3 * R * inner * c  # gate and up outputs, silu(gate): the product's and silu's gradients need them
        kept += self.inputs(("mlp.down",), inner, c)
        if self.lora is not None:  # each adapter keeps A x (rows, r) for B's gradient
            kept += R * self.lora.rank * c * len(self.lora.targets)
        return kept

    def outside(self, loss_chunk: int) -> int:
        """Embedding, RoPE tables, the final norm and the loss, at the most trained positions a row can have
        (N = B T): the fp32 log-probabilities of one chunk of the loss (all N rows unchunked) and their gradient."""
        arch, R, c, a = self.arch, self.rows, self.compute, self.base
        N, d = R, arch.n_embd
        kept = R * 8 + 2 * N * 8  # ids (the embedding's backward), trained positions and targets (int64)
        kept += 2 * R * arch.head_dim * a  # cos and sin, shared by all layers
        kept += self.norm(R, d, a)
        chunked = 0 < loss_chunk < N
        # a chunked loss keeps the selected rows for its recompute; unchunked, lm_head keeps its (cast) input
        kept += N * d * a if chunked else (N * d * c if self.lora is None else 0)
        kept += 2 * (loss_chunk if chunked else N) * arch.vocab_size * 4
        return kept

    def cast_copies(self, fsdp: bool) -> int:
        """Under bf16 autocast, a bf16 copy of each fp32 matrix a matmul uses: trainable ones stay in autocast's
        cache for the whole forward, frozen ones are kept for backward. FSDP gathers the blocks in the compute dtype
        already (MixedPrecisionPolicy), so only the root's output layer, gathered in fp32, is cast."""
        arch = self.arch
        if self.compute == 4:
            return 0
        if fsdp:
            return 2 * arch.vocab_size * arch.n_embd
        n = 0
        if self.base == 4:  # NF4 weights are dequantized straight into the compute dtype, and not kept
            quantized = nf4_shapes(arch, self.lora)
            n = sum(math.prod(s) for k, s in parameter_shapes(arch).items()
                    if not k.endswith("norm.weight") and k != "embed.weight" and k not in quantized)
            n += arch.vocab_size * arch.n_embd if arch.tie_embeddings else 0  # lm_head multiplies by embed.weight
        if self.lora is not None:
            n += sum(math.prod(s) for s in adapter_shapes(arch, self.lora).values())
        return 2 * n


    def dequantized(self) -> int:
        """NF4: the one projection's dense weight, in the compute dtype, that forward or backward makes at a time."""
        return max((math.prod(s) for s in nf4_shapes(self.arch, self.lora).values()), default=0) * self.compute


def gathered_bytes(arch: Architecture, lora: LoraConfig | None, compute: int) -> int:
    """FSDP's transient full weights: the root's (embedding, final norm, lm_head) in fp32 (pipeline.distributed.shard
    keeps the residual stream's ends in fp32), kept gathered through the step, and two blocks' in the compute dtype
    (the one running and the one prefetched); and the fp32 gradients of the root's and one block's trained weights
    before their reduce-scatter (and, offloaded, their copy to the host). Not in `weights` nor `gradients`, which stay
    the exact sharded tensors."""
    shapes = parameter_shapes(arch) | (adapter_shapes(arch, lora) if lora is not None else {})
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    root = sum(n for k, n in sizes.items() if not k.startswith("blocks."))
    block = sum(n for k, n in sizes.items() if k.startswith("blocks.0."))
    grads = sum(n for k, n in sizes.items() if (lora is None or ".lora_" in k)
                and (k.startswith("blocks.0.") or not k.startswith("blocks.")))
    return root * 4 + 2 * block * compute + 4 * grads


def activation_bytes(fwd: Forward, loss_chunk: int, fsdp: bool) -> tuple[int, int]:
    """(without, with activation checkpointing). With it, each block keeps only its inputs (held by the checkpoint
    for the recompute: x, and the RoPE tables and the mask all blocks share), and backward holds one recomputed
    block's activations at a time."""
    block, x = fwd.block(), fwd.rows * fwd.arch.n_embd * fwd.base
    extra = fwd.outside(loss_chunk) + fwd.cast_copies(fsdp) + fwd.dequantized() + (
        gathered_bytes(fwd.arch, fwd.lora, fwd.compute) if fsdp else 0)
    recomputed = block - (x if fwd.base == 4 else 0)  # an fp32 block input is the first norm's kept input
    mask = 0 if fwd.cuda else fwd.batch * fwd.tokens**2  # the dense bool mask, otherwise freed after the forward
    return extra + fwd.arch.n_layer * block, extra + fwd.arch.n_layer * x + recomputed + mask


def plan_memory(arch: Architecture, cfg, block_size: int, world: int, device_type: str, bf16: bool) -> MemoryPlan:
    """cfg: the train section (SftConfig) or pretraining's TrainConfig (no lora, no parallel, no optimizer or offload
    choice: full training with AdamW, DDP). Weights, gradients and optimizer are the exact bytes of the tensors;
    activations and the loss peak an estimate. Offload moves the state to the host on CUDA; on the CPU it is where it
    was already."""
    lora = getattr(cfg, "lora", None)
    lora = lora if lora is not None and lora.rank > 0 else None
    offload = getattr(cfg, "offload", "none") == "optimizer"
    fsdp = (getattr(cfg, "parallel", "ddp") == "fsdp" and world > 1) or offload  # offload: FSDP2, one process too
    shards = world if fsdp else 1
    half_base = lora is not None and device_type == "cuda" and bf16 and not fsdp  # FSDP: 4 / world bytes already
    held = held_tensors(arch, lora, half_base)
    trained = [local_elements(shape, shards) for shape, _, trains in held if trains]
    nf4 = sum(nf4_bytes(math.prod(shape)) for shape in nf4_shapes(arch, lora).values())  # never sharded
    weights = sum(local_elements(shape, shards) * size for shape, size, _ in held) + nf4
    eight = getattr(cfg, "optimizer", "adamw") == "adamw8bit"
    # AdamW: exp_avg and exp_avg_sq like each (sharded) parameter, plus a 4-byte `step` tensor each, never sharded
    optimizer = adamw8bit_bytes(trained) if eight else 8 * sum(trained) + 4 * len(trained)
    chunk = loss_chunk_of(cfg)
    fwd = Forward(arch, lora, cfg.batch_size, block_size, 2 if bf16 else 4, 2 if half_base else 4,
                  device_type == "cuda")
    activations, checkpointed = activation_bytes(fwd, chunk, fsdp)
    rows = cfg.batch_size * block_size  # the most trained positions a micro-batch can have
    transient = (chunk if 0 < chunk < rows else rows) * arch.vocab_size * 4
    return MemoryPlan(weights, 4 * sum(trained), optimizer, activations, checkpointed, cfg.activation_checkpointing,
                      block_size, device_type, bf16, transient, offload and device_type == "cuda", nf4, eight)


def loss_chunk_of(cfg) -> int:
    """cfg.loss_chunk as a number: AUTO_CHUNK for an auto that sized_loss_chunk has not sized."""
    return AUTO_CHUNK if cfg.loss_chunk == "auto" else cfg.loss_chunk


def sized_loss_chunk(arch: Architecture, cfg, block_size: int, world: int, device_type: str, bf16: bool,
                     free: int | None, planner=None):
    """cfg with loss_chunk auto made a number: all a micro-batch's trained positions in one piece (0) when that fits
    `free`, else the largest power of two of them that does (down to MIN_CHUNK, which stays when none fits: check_fit
    then says what would); AUTO_CHUNK when free memory is unknown. A number stays as it is."""
    if cfg.loss_chunk != "auto":
        return cfg
    if free is None:
        return dataclasses.replace(cfg, loss_chunk=AUTO_CHUNK)
    rows = cfg.batch_size * block_size
    tried = [0] + [2**k for k in range(rows.bit_length() - 1, MIN_CHUNK.bit_length() - 2, -1) if 2**k < rows]
    for chunk in tried:
        sized = dataclasses.replace(cfg, loss_chunk=chunk)
        if (planner or plan_memory)(arch, sized, block_size, world, device_type, bf16).total() <= free:
            return sized
    return dataclasses.replace(cfg, loss_chunk=MIN_CHUNK)


def measured_activation_bytes(model: torch.nn.Module, *inputs) -> int:
    """Bytes of the distinct storages model(*inputs) saves for backward, the model's own parameters and buffers
    left out. What checkpointed regions keep (their inputs, held by the recompute) is not seen here."""
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    kept = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            kept[storage.data_ptr()] = storage.nbytes()
        return t  # a reference: the storage stays alive (no address reuse) until the graph is freed

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(*inputs)
    del out
    return sum(kept.values())


# ---- the device ------------------------------------------------------------------------------------------------
def parse_bytes(text: str, name: str = "SFT_DEVICE_MEMORY") -> int:
    """'24GiB', '80 GB', '1.5TiB' or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", text.lower())
    if m is None:
        raise UserError(f"{name}={text!r} is not a size; write it as 24GiB, 80GB or a byte count")
    return int(float(m.group(1)) * UNITS[m.group(2) or ""])


def device_free_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: SFT_DEVICE_MEMORY when set (on any device: to plan a bigger run on a smaller
    machine), else CUDA's free memory; None on the CPU."""
    faked = os.environ.get("SFT_DEVICE_MEMORY", "")
    if faked.strip():
        return parse_bytes(faked)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return None


def host_free_bytes() -> int | None:
    """Host memory available for offloaded state: SFT_HOST_MEMORY when set, else the kernel's MemAvailable (Linux);
    None when unknown."""
    faked = os.environ.get("SFT_HOST_MEMORY", "")
    if faked.strip():
        return parse_bytes(faked, "SFT_HOST_MEMORY")
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def local_processes(world: int) -> int:
    """Ranks sharing this machine's host memory (torchrun's LOCAL_WORLD_SIZE; all of them otherwise)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", world))


# ---- what would fit --------------------------------------------------------------------------------------------
def choices(cfg, world: int) -> list[list[tuple[float, tuple[str, ...], dict]]]:
    """Per setting check_fit may change, the options: (cost, `-S` overrides, fields; lora.* for the adapters), the
    run's own first. Pretraining (base.pretrain) has only activation checkpointing and the batch split."""
    sft = hasattr(cfg, "lora")
    section = "train" if sft else "base.pretrain"
    keep = (0, (), {})
    found = []
    if not cfg.activation_checkpointing:
        found.append([keep, (FIT_COSTS["activation_checkpointing"], (f"{section}.activation_checkpointing=true",),
                             {"activation_checkpointing": True})])
    rows = cfg.batch_size * cfg.grad_accum  # rows per optimizer step unchanged, so the same training
    smaller = [b for b in (2**k for k in range(cfg.batch_size.bit_length())) if b < cfg.batch_size and rows % b == 0]
    found.append([keep] + [(FIT_COSTS["batch"] + (cfg.batch_size // b).bit_length() / 100,  # the larger the cheaper
                            (f"{section}.batch_size={b}", f"{section}.grad_accum={rows // b}"),
                            {"batch_size": b, "grad_accum": rows // b}) for b in smaller])
    if not sft:
        return found
    if cfg.optimizer == "adamw":
        found.append([keep, (FIT_COSTS["optimizer"], ("train.optimizer=adamw8bit",), {"optimizer": "adamw8bit"})])
    if cfg.offload == "none":
        found.append([keep, (FIT_COSTS["offload"], ("train.offload=optimizer",), {"offload": "optimizer"})])
    else:  # the host is short: the device may hold the state after all
        found.append([keep, (0.5, ("train.offload=none",), {"offload": "none"})])
    if cfg.lora.rank == 0:
        found.append([keep, (FIT_COSTS["lora"], (f"train.lora.rank={FIT_RANK}",), {"lora.rank": FIT_RANK})])
    if cfg.lora.quantize == "none":
        found.append([keep, (FIT_COSTS["quantize"], ("train.lora.quantize=nf4",), {"lora.quantize": "nf4"})])
    fsdp = cfg.parallel == "fsdp" and world > 1
    found.append([keep] + [(FIT_COSTS["fsdp"] + n.bit_length() / 100,
                            (f"train.nproc={n}",) if fsdp else ("train.parallel=fsdp", f"train.nproc={n}"),
                            {"parallel": "fsdp", "nproc": n}) for n in FIT_WORLDS if n > (world if fsdp else 1)])
    return found


def changed(cfg, fields: dict):
    """cfg with `fields` set (lora.* in its adapters), or None where the combination does not run (ParamError)."""
    lora = {k.removeprefix("lora."): v for k, v in fields.items() if k.startswith("lora.")}
    top = {k: v for k, v in fields.items() if not k.startswith("lora.")}
    try:
        return dataclasses.replace(cfg, **top, **({"lora": dataclasses.replace(cfg.lora, **lora)} if lora else {}))
    except ParamError:
        return None


def alternatives(plan: MemoryPlan, free: int | None, cfg, world: int, arch: Architecture,
                 host_free: int | None = None, most: int = 3, planner=None) -> list[tuple[str, ...]]:
    """The combinations of changes that make the run fit the device's `free` bytes and the host's `host_free` (None:
    unchecked), cheapest first (FIT_COSTS summed, then fewer changes), none a superset of one listed before: at most
    `most`. planner: plan_memory, or another backend's with the same arguments (pipeline/backend.py); `arch` is what
    it plans from."""
    combos = sorted(itertools.product(*choices(cfg, world)),
                    key=lambda c: (sum(o[0] for o in c), sum(len(o[1]) for o in c)))
    found = []
    for combo in combos:
        overrides = tuple(o for option in combo for o in option[1])
        if not overrides or any(set(f) <= set(overrides) for f in found):
            continue
        fields = {k: v for option in combo for k, v in option[2].items()}
        new = changed(cfg, fields)
        n = fields.get("nproc", world)
        if new is not None and fits((planner or plan_memory)(arch, new, plan.block_size, n, plan.device_type,
                                                             plan.bf16), free,
                                    host_free, n if "nproc" in fields else local_processes(world)):
            found.append(overrides)
            if len(found) == most:
                break
    return found


def fits(plan: MemoryPlan, free: int | None, host_free: int | None, local: int) -> bool:
    return (free is None or plan.total() <= free) and (host_free is None or plan.host() * local <= host_free)


def check_fit(plan: MemoryPlan, free: int | None, cfg, world: int, arch: Architecture,
              host_free: int | None = None, planner=None) -> None:
    """Nothing when the plan fits the device's `free` bytes (or free is unknown) and its offloaded state the host's
    `host_free` (None: unchecked); else a one-line UserError: the shortfall and the cheapest combinations of
    overrides that would fit, as a dvc exp run command."""
    local = local_processes(world)
    if fits(plan, free, host_free, local):
        return
    need, host = plan.total(), plan.host() * local
    if free is not None and need > free:
        head = f"training needs ~{gib(need)} GiB per rank but {gib(free)} GiB is free (short by {gib(need - free)} GiB)"
    else:
        head = (f"the offloaded training state needs ~{gib(host)} GiB of host memory ({local} process(es)) but "
                f"{gib(host_free)} GiB is available (short by {gib(host - host_free)} GiB)")
    found = alternatives(plan, free, cfg, world, arch, host_free, planner=planner)
    if found:
        first, *others = (" ".join(f"-S {o}" for o in combo) for combo in found)
        also = f" (else: {'; '.join(others)})" if others else ""
        raise UserError(f"{head}; cheapest that fits: dvc exp run {first}{also}")
    tried = ["activation checkpointing", "a smaller batch"] + ([
        "8-bit AdamW", "optimizer offload", f"LoRA rank {FIT_RANK}", "NF4 (QLoRA)",
        f"FSDP over up to {FIT_WORLDS[-1]} processes"] if hasattr(cfg, "lora") else [])
    raise UserError(f"{head}; nothing fits with any combination of {', '.join(tried)}: use a device with more memory")


def plan_and_check(arch: Architecture, cfg, block_size: int, compute: Compute, desc: str, planner=None):
    """(cfg with loss_chunk auto made a number, the plan) of this process's share of the run (torchrun's WORLD_SIZE;
    this rank's GPU), printed, and checked against the device's free memory and, for offloaded state, the host's,
    before anything heavy is loaded: a run that cannot fit stops in one line naming what would. planner and arch:
    plan_memory and an Architecture, or another backend's planner and what it plans from (pipeline/backend.py)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if compute.device.type == "cuda" \
        else compute.device
    bf16 = compute.autocast_dtype is not None
    free, host_free = device_free_bytes(device), host_free_bytes()
    cfg = sized_loss_chunk(arch, cfg, block_size, world, device.type, bf16, free, planner)  # auto -> a number
    plan = (planner or plan_memory)(arch, cfg, block_size, world, device.type, bf16)
    print0(f"{desc}: {plan.line(free, host_free if plan.offloaded else None)}")
    check_fit(plan, free, cfg, world, arch, host_free, planner)
    return cfg, plan
