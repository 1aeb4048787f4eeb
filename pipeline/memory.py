"""A memory plan before anything heavy: architecture + train params -> bytes per rank (weights, gradients, AdamW
state: exact, for full or LoRA training, DDP or FSDP; one micro-batch's activations with and without checkpointing:
estimated, within ACTIVATION_FACTOR = 1.5x either way of what a CPU forward keeps, measured_activation_bytes), checked
against the device's free memory: a run that cannot fit stops in one line naming what would."""
import dataclasses
import math
import os
import re

import torch

from pipeline.common import UserError
from pipeline.config import LoraConfig
from pipeline.lora import TARGETS
from pipeline.model import Architecture

GIB = 2**30
ACTIVATION_FACTOR = 1.5  # planned / measured activations, either way, on the configurations tests/test_memory.py runs
FIT_RANK = 16  # the LoRA rank check_fit proposes
FIT_WORLDS = (2, 4, 8)  # the FSDP process counts check_fit tries
UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def gib(n: int) -> str:
    x = n / GIB
    return f"{x:,.2f}" if x >= 0.1 else f"{x:.2g}"


@dataclasses.dataclass
class MemoryPlan:
    weights: int  # bytes per rank: every parameter as it is held in training
    gradients: int  # bytes per rank: gradients of the trainable parameters (fp32)
    optimizer: int  # bytes per rank: AdamW's exp_avg and exp_avg_sq (fp32) and its 4-byte `step` per tensor
    activations: int  # estimated bytes one micro-batch keeps for backward, no activation checkpointing
    activations_checkpointed: int  # the same with activation checkpointing (block inputs + one block recomputed)
    checkpointing: bool  # which of the two the run uses
    # how it was planned, so that check_fit can plan the alternatives the same way
    block_size: int = 0
    device_type: str = "cpu"
    bf16: bool = False

    def total(self) -> int:
        used = self.activations_checkpointed if self.checkpointing else self.activations
        return self.weights + self.gradients + self.optimizer + used

    def metrics(self) -> dict[str, float]:
        """For reports/train/metrics.json: each figure in GiB (the total with the activations the run uses)."""
        return {f"plan_{k}_gib": v / GIB for k, v in (
            ("weights", self.weights), ("gradients", self.gradients), ("optimizer", self.optimizer),
            ("activations", self.activations), ("activations_checkpointed", self.activations_checkpointed),
            ("total", self.total()))}

    def line(self, free: int | None) -> str:
        where = "free: unknown (CPU)" if free is None else f"of {gib(free)} GiB free"
        used = ", used" if self.checkpointing else ""
        return (f"memory plan per rank: weights {gib(self.weights)} GiB + gradients {gib(self.gradients)} + AdamW "
                f"{gib(self.optimizer)} + activations {gib(self.activations)} (checkpointed: "
                f"{gib(self.activations_checkpointed)}{used}) = {gib(self.total())} GiB {where}")


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


def held_tensors(arch: Architecture, lora: LoraConfig | None, half_base: bool) -> list[tuple[tuple, int, bool]]:
    """(shape, bytes per element, trainable) of every parameter training holds. LoRA freezes the base (bf16 when
    half_base) and trains fp32 adapters; full training keeps everything in fp32 (autocast casts per matmul)."""
    if lora is None:
        return [(shape, 4, True) for shape in parameter_shapes(arch).values()]
    base = [(shape, 2 if half_base else 4, False) for shape in parameter_shapes(arch).values()]
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
        if self.base == 4:
            n = sum(math.prod(s) for k, s in parameter_shapes(arch).items()
                    if not k.endswith("norm.weight") and k != "embed.weight")
            n += arch.vocab_size * arch.n_embd if arch.tie_embeddings else 0  # lm_head multiplies by embed.weight
        if self.lora is not None:
            n += sum(math.prod(s) for s in adapter_shapes(arch, self.lora).values())
        return 2 * n


def gathered_bytes(arch: Architecture, lora: LoraConfig | None, compute: int) -> int:
    """FSDP's transient full weights: the root's (embedding, final norm, lm_head) in fp32 (pipeline.distributed.shard
    keeps the residual stream's ends in fp32), kept gathered through the step, and two blocks' in the compute dtype
    (the one running and the one prefetched). Not in `weights`, which stays the exact sharded parameters."""
    shapes = parameter_shapes(arch) | (adapter_shapes(arch, lora) if lora is not None else {})
    root = sum(math.prod(s) for k, s in shapes.items() if not k.startswith("blocks."))
    block = sum(math.prod(s) for k, s in shapes.items() if k.startswith("blocks.0."))
    return root * 4 + 2 * block * compute


def activation_bytes(fwd: Forward, loss_chunk: int, fsdp: bool) -> tuple[int, int]:
    """(without, with activation checkpointing). With it, each block keeps only its inputs (held by the checkpoint
    for the recompute: x, and the RoPE tables and the mask all blocks share), and backward holds one recomputed
    block's activations at a time."""
    block, x = fwd.block(), fwd.rows * fwd.arch.n_embd * fwd.base
    extra = fwd.outside(loss_chunk) + fwd.cast_copies(fsdp) + (gathered_bytes(fwd.arch, fwd.lora, fwd.compute)
                                                               if fsdp else 0)
    recomputed = block - (x if fwd.base == 4 else 0)  # an fp32 block input is the first norm's kept input
    mask = 0 if fwd.cuda else fwd.batch * fwd.tokens**2  # the dense bool mask, otherwise freed after the forward
    return extra + fwd.arch.n_layer * block, extra + fwd.arch.n_layer * x + recomputed + mask


def plan_memory(arch: Architecture, cfg, block_size: int, world: int, device_type: str, bf16: bool) -> MemoryPlan:
    """cfg: the train section (SftConfig) or pretraining's TrainConfig (no lora, no parallel: full training, DDP).
    Weights, gradients and optimizer are the exact bytes of the tensors; activations an estimate."""
    lora = getattr(cfg, "lora", None)
    lora = lora if lora is not None and lora.rank > 0 else None
    fsdp = getattr(cfg, "parallel", "ddp") == "fsdp" and world > 1
    shards = world if fsdp else 1
    half_base = lora is not None and device_type == "cuda" and bf16 and not fsdp  # FSDP: 4 / world bytes already
    held = held_tensors(arch, lora, half_base)
    trained = [local_elements(shape, shards) for shape, _, trains in held if trains]
    weights = sum(local_elements(shape, shards) * size for shape, size, _ in held)
    fwd = Forward(arch, lora, cfg.batch_size, block_size, 2 if bf16 else 4, 2 if half_base else 4,
                  device_type == "cuda")
    activations, checkpointed = activation_bytes(fwd, cfg.loss_chunk, fsdp)
    # AdamW: exp_avg and exp_avg_sq like each (sharded) parameter, plus a 4-byte `step` tensor each, never sharded
    return MemoryPlan(weights, 4 * sum(trained), 8 * sum(trained) + 4 * len(trained), activations, checkpointed,
                      cfg.activation_checkpointing, block_size, device_type, bf16)


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
def parse_bytes(text: str) -> int:
    """'24GiB', '80 GB', '1.5TiB' or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b|b)?\s*", text.lower())
    if m is None:
        raise UserError(f"SFT_DEVICE_MEMORY={text!r} is not a size; write it as 24GiB, 80GB or a byte count")
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


def alternatives(plan: MemoryPlan, free: int, cfg, world: int, arch: Architecture, planner=None) -> list[str]:
    """The overrides that make the run fit, each alone, in the order check_fit proposes them (at most 4). planner:
    plan_memory, or another backend's with the same arguments (pipeline/backend.py), `arch` what it plans from."""
    def fits(new_cfg, new_world: int = world) -> bool:
        return (planner or plan_memory)(arch, new_cfg, plan.block_size, new_world, plan.device_type,
                                         plan.bf16).total() <= free

    section = "train" if hasattr(cfg, "lora") else "base.pretrain"  # SFT's section, or pretraining's
    found = []
    if not cfg.activation_checkpointing and fits(dataclasses.replace(cfg, activation_checkpointing=True)):
        found.append(f"{section}.activation_checkpointing=true")
    lora = getattr(cfg, "lora", None)
    if lora is not None and lora.rank == 0 and fits(dataclasses.replace(cfg, lora=dataclasses.replace(
            lora, rank=FIT_RANK))):
        found.append(f"train.lora.rank={FIT_RANK}")
    rows = cfg.batch_size * cfg.grad_accum
    smaller = [b for b in (2**k for k in range(cfg.batch_size.bit_length())) if b < cfg.batch_size and rows % b == 0]
    batch = next((b for b in reversed(smaller) if fits(dataclasses.replace(cfg, batch_size=b,
                                                                            grad_accum=rows // b))), None)
    if batch is not None:  # rows per optimizer step unchanged, so the same training
        found.append(f"{section}.batch_size={batch} with {section}.grad_accum={rows // batch}")
    if hasattr(cfg, "parallel"):
        fsdp = cfg.parallel == "fsdp" and world > 1
        n = next((n for n in FIT_WORLDS if n > (world if fsdp else 1)
                  and fits(dataclasses.replace(cfg, parallel="fsdp"), n)), None)
        if n is not None:
            found.append(f"train.nproc={n}" if fsdp else f"train.parallel=fsdp with train.nproc={n}")
    return found[:4]


def check_fit(plan: MemoryPlan, free: int | None, cfg, world: int, arch: Architecture, planner=None) -> None:
    """Nothing when the plan fits `free` (or free is unknown); else a one-line UserError: the shortfall and each
    override that would fit alone."""
    if free is None or plan.total() <= free:
        return
    need = plan.total()
    found = alternatives(plan, free, cfg, world, arch, planner)
    head = f"training needs ~{gib(need)} GiB per rank but {gib(free)} GiB is free (short by {gib(need - free)} GiB)"
    if found:
        raise UserError(f"{head}; would fit, each alone (dvc exp run -S): {'; '.join(found)}")
    tried = ["activation checkpointing", f"LoRA rank {FIT_RANK}", "a smaller batch",
             f"FSDP over up to {FIT_WORLDS[-1]} processes"] if hasattr(cfg, "lora") else [
             "activation checkpointing", "a smaller batch"]
    raise UserError(f"{head}; none of {', '.join(tried)} fits alone: use a device with more memory")
