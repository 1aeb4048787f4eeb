"""Low-bit storage through bitsandbytes (whose CPU backend runs in CI): frozen linear weights in 4-bit NormalFloat for
QLoRA (NF4 in blocks of 64 with double quantization: each block's absmax in 8 bits, in blocks of 256), dequantized
one projection at a time in forward and again in backward, so that autograd keeps only the 4-bit codes; 8-bit AdamW;
and the exact bytes of both, for the memory plan. Only a run that asks for one of them imports bitsandbytes."""
import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

NF4_BLOCK = 64  # weights per absmax
NESTED_BLOCK = 256  # absmax values per fp32 absmax of the second level (double quantization)
CODE_BYTES = 256 * 4  # the fp32 table of the absmax values' 8-bit code, one per quantized weight
NF4_STATE = ("absmax", "absmax2", "code2", "offset")  # the buffers weight_<name> next to the packed codes
MIN_8BIT = 4096  # AdamW8bit's min_8bit_size: a tensor with fewer elements keeps fp32 moments
MOMENT_BLOCK = 256  # moments per fp32 absmax in 8-bit AdamW
QMAP_BYTES = 2 * 256 * 4  # AdamW8bit's two fp32 code tables (signed for exp_avg, unsigned for exp_avg_sq), shared


def bitsandbytes():
    """The library, imported on first use. Its CPU backend warns at import that an optional kernel package for
    4-bit inference (a path training never takes) is missing: that line is silenced."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


# ---- bytes -----------------------------------------------------------------------------------------------------
def nf4_bytes(n: int) -> int:
    """Bytes of a weight of n elements stored by store_nf4: two codes a byte, an 8-bit absmax per block of 64, an fp32
    absmax per 256 of those, the 256-entry fp32 code of the absmax values and their fp32 offset."""
    blocks = math.ceil(n / NF4_BLOCK)
    return math.ceil(n / 2) + blocks + 4 * math.ceil(blocks / NESTED_BLOCK) + CODE_BYTES + 4


def adamw8bit_bytes(sizes: list[int]) -> int:
    """Bytes of AdamW8bit's state for trained tensors of these element counts: two uint8 moments and an fp32 absmax
    per 256 of each, fp32 moments below MIN_8BIT elements, and the two code tables once. Its `step` is a Python int."""
    eight = [n for n in sizes if n >= MIN_8BIT]
    return (sum(2 * n + 2 * 4 * math.ceil(n / MOMENT_BLOCK) for n in eight)
            + sum(8 * n for n in sizes if n < MIN_8BIT) + (QMAP_BYTES if eight else 0))


# ---- NF4 weights -----------------------------------------------------------------------------------------------
def store_nf4(linear: nn.Module, device=None) -> None:
    """Replace the frozen `weight` (out, in) of `linear` in place by its NF4 form, quantized on `device` (default:
    where the weight is): buffers `weight` (the packed codes, uint8), weight_absmax (uint8), weight_absmax2,
    weight_code2 and weight_offset (fp32). Buffers, not parameters: nothing trains them, and the state dict (so the
    resume fingerprint) holds them."""
    quantize_4bit = bitsandbytes().functional.quantize_4bit
    w = linear.weight.detach().to(device or linear.weight.device)
    packed, state = quantize_4bit(w, blocksize=NF4_BLOCK, compress_statistics=True, quant_type="nf4")
    del linear.weight
    linear.register_buffer("weight", packed)
    nested = (state.absmax, state.state2.absmax, state.state2.code, state.offset.reshape(1))
    for name, t in zip(NF4_STATE, nested):
        linear.register_buffer(f"weight_{name}", t.clone())  # a storage of its own (bitsandbytes shares the code)


def is_nf4(linear: nn.Module) -> bool:
    return hasattr(linear, "weight_absmax")


def nf4_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight (out, in) in `dtype`: a temporary, made where it is used."""
    from bitsandbytes.functional import QuantState, dequantize_4bit

    nested = QuantState(absmax=linear.weight_absmax2, code=linear.weight_code2, blocksize=NESTED_BLOCK,
                        dtype=torch.float32)
    state = QuantState(absmax=linear.weight_absmax, shape=torch.Size((linear.out_features, linear.in_features)),
                       dtype=dtype, blocksize=NF4_BLOCK, quant_type="nf4", offset=linear.weight_offset[0],
                       state2=nested)
    return dequantize_4bit(linear.weight, state)


class Nf4Matmul(torch.autograd.Function):
    """x W^T for a frozen NF4 weight W. Only x needs a gradient, x' = g W: W is dequantized again in backward rather
    than kept, so a layer's dense weight lives only while that layer computes."""

    @staticmethod
    def forward(ctx, x, linear):
        ctx.linear = linear
        return F.linear(x, nf4_weight(linear, x.dtype))

    @staticmethod
    def backward(ctx, grad):
        return grad @ nf4_weight(ctx.linear, grad.dtype), None


@torch.compiler.disable  # bitsandbytes' ops run eager; torch.compile breaks the block's graph around them
def nf4_linear(x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """linear(x) with its NF4 weight, in the compute dtype: bf16 under autocast, else x's."""
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    out = Nf4Matmul.apply(x.to(dtype), linear)
    return out if linear.bias is None else out + linear.bias


# ---- 8-bit AdamW -----------------------------------------------------------------------------------------------
def adamw8bit(groups: list[dict], lr: float, betas: tuple[float, float], eps: float) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW8bit: the moments in 8 bits, blockwise (256), dynamically quantized; each group keeps its
    weight_decay."""
    return bitsandbytes().optim.AdamW8bit(groups, lr=lr, betas=betas, eps=eps)
