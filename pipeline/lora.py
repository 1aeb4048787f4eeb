"""LoRA: low-rank adapters on the attention and MLP projections. Each targeted nn.Linear becomes a LoraLinear that
keeps its frozen `weight` (and `bias`) under the same name and adds `lora_A` (r, in) and `lora_B` (out, r), so the
layer computes W x + (alpha / r) B A dropout(x). B starts at zero: the adapted model starts as the base. QLoRA: W
stored in NF4 (pipeline/quant.py). Export: the adapters merged into plain weights, or alone in PEFT's layout
(`PeftModel.from_pretrained(base, folder)`)."""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pipeline.common import UserError
from pipeline.config import LoraConfig
from pipeline.hf import MODULES, to_hf_name
from pipeline.model import Transformer
from pipeline.quant import is_nf4, nf4_linear, nf4_weight, store_nf4

TARGETS = {hf.rpartition(".")[2]: ours for ours, hf in MODULES.items()
           if ours.startswith(("attn.", "mlp.")) and not ours.endswith("_norm")}  # q_proj -> attn.q, ...
ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_CARD = "adapter_config.json", "adapter_model.safetensors", "README.md"
# what a QLoRA adapter was trained against, in transformers' BitsAndBytesConfig terms (PEFT's model card lists these)
NF4_BASE = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "bfloat16"}


class LoraLinear(nn.Linear):
    """An nn.Linear with a trainable low-rank update next to its frozen weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, generator: torch.Generator):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the same tensors, frozen
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        bound = 1 / math.sqrt(base.in_features)  # nn.Linear's (and PEFT's) kaiming-uniform init of a matrix
        with torch.no_grad():
            self.lora_A.copy_(torch.rand(self.lora_A.shape, generator=generator) * 2 * bound - bound)
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def frozen_weight(self) -> torch.Tensor:
        """W as the forward applies it: dequantized (fp32) when stored in NF4."""
        return nf4_weight(self, torch.float32) if is_nf4(self) else self.weight

    def delta(self) -> torch.Tensor:
        """The update of the weight, (out, in): scale * B A."""
        return self.scale * self.lora_B @ self.lora_A

    def forward(self, x):
        rows = self.dropout(x).reshape(-1, self.in_features) @ self.lora_A.t()  # (N, r)
        out = nf4_linear(x, self) if is_nf4(self) else F.linear(x, self.weight, self.bias)
        out = out.reshape(-1, self.out_features)
        # W x + scale (A x) B^T in one GEMM that adds into W x: no (N, out) temporaries for the scale and the sum
        return torch.addmm(out, rows, self.lora_B.t(), alpha=self.scale).view(*x.shape[:-1], self.out_features)


def targeted(model: Transformer, targets: list[str]) -> dict[str, nn.Linear]:
    """Our module path -> the nn.Linear of every targeted projection: blocks.<i>.attn.q, ..."""
    wanted = {TARGETS[t] for t in targets}
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.partition(".")[2].partition(".")[2] in wanted
            and name.startswith("blocks.")}


def add_adapters(model: Transformer, cfg: LoraConfig, seed: int, device=None) -> int:
    """Freeze every weight of `model` and put adapters on cfg.targets (seeded init); with cfg.quantize nf4 the frozen
    weights of those projections are quantized, on `device` (default: where they are; the GPU spares the host the
    work), and stay there. Returns the adapter parameter count. The model keeps its parameter names; the new ones end
    in .lora_A and .lora_B."""
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for name, linear in targeted(model, cfg.targets).items():
        parent, _, leaf = name.rpartition(".")
        lora = LoraLinear(linear, cfg.rank, cfg.alpha, cfg.dropout, generator)
        if cfg.quantize == "nf4":
            store_nf4(lora, device)
        setattr(model.get_submodule(parent), leaf, lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors by our parameter names (blocks.0.attn.q.lora_A, ...)."""
    return {n: p for n, p in model.named_parameters() if ".lora_" in n}


@torch.no_grad()
def merge_into(model: Transformer, tensors: dict[str, torch.Tensor], cfg: LoraConfig) -> Transformer:
    """Add the adapters' updates (our names, as adapters() gives them) to a plain model's weights, in fp32."""
    scale = cfg.alpha / cfg.rank
    for name in (n.removesuffix(".lora_A") for n in tensors if n.endswith(".lora_A")):
        linear = model.get_submodule(name)
        delta = scale * tensors[f"{name}.lora_B"].float() @ tensors[f"{name}.lora_A"].float()
        linear.weight.copy_((linear.weight.float() + delta.to(linear.weight.device)).to(linear.weight.dtype))
    return model


def peft_name(name: str) -> str:
    """blocks.0.attn.q.lora_A -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight (PEFT's keys)."""
    module, _, leaf = name.rpartition(".")
    return f"base_model.model.{to_hf_name(module + '.weight').removesuffix('.weight')}.{leaf}.weight"


def save_adapter(tensors: dict[str, torch.Tensor], cfg: LoraConfig, folder: str, base: str) -> None:
    """The adapters (our names) in PEFT's layout (write_adapter)."""
    write_adapter(folder, {peft_name(n): t for n, t in tensors.items()}, cfg, base, sorted(cfg.targets))


def write_adapter(folder: str, tensors: dict[str, torch.Tensor], cfg: LoraConfig, base: str,
                  targets: list[str]) -> None:
    """PEFT's layout: adapter_model.safetensors (`tensors` by PEFT's names, fp32) and adapter_config.json. A QLoRA
    adapter says so in both the config (base_model_quantization: PEFT ignores the key, with a warning) and a
    README.md, in the words PEFT's own card uses."""
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()},
              str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": cfg.rank,
              "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": targets,
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "use_rslora": False,
              "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    if cfg.quantize == "nf4":
        config["base_model_quantization"] = NF4_BASE
        (path / ADAPTER_CARD).write_text(nf4_card(base))
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def nf4_card(base: str) -> str:
    lines = "\n".join(f"- {k}: {v}" for k, v in NF4_BASE.items())
    return (f"---\nlibrary_name: peft\nbase_model: {base}\n---\n\n# QLoRA adapter\n\nTrained against an NF4 "
            "(4-bit NormalFloat, double quantization) copy of the base model. The following `bitsandbytes` "
            f"quantization config was used during training:\n{lines}\n\nLoad it onto the base in bf16 or fp32 "
            "(the merged model of this run was made that way), or onto the base loaded with that config.\n")


def load_adapter(folder: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """An adapter folder save_adapter wrote, as (tensors by our names, its LoraConfig)."""
    path = Path(folder)
    if not (path / ADAPTER_CONFIG).is_file():
        raise UserError(f"{folder}: no {ADAPTER_CONFIG}; an adapter folder holds {ADAPTER_CONFIG} and "
                        f"{ADAPTER_WEIGHTS}")
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    cfg = LoraConfig(rank=config["r"], alpha=float(config["lora_alpha"]), dropout=float(config["lora_dropout"]),
                     targets=list(config["target_modules"]),
                     quantize="nf4" if config.get("base_model_quantization") else "none")
    ours = {}
    for key, t in load_file(str(path / ADAPTER_WEIGHTS)).items():
        hf_module, _, leaf = key.removeprefix("base_model.model.").removesuffix(".weight").rpartition(".")
        ours[f"{from_hf_module(hf_module)}.{leaf}"] = t
    return ours, cfg


def from_hf_module(module: str) -> str:
    """model.layers.0.self_attn.q_proj -> blocks.0.attn.q."""
    _, _, i, rest = module.split(".", 3)
    return f"blocks.{i}.{next(ours for ours, hf in MODULES.items() if hf == rest)}"
