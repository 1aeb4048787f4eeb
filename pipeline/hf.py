"""Hugging Face folders: our model saved as transformers' LlamaForCausalLM (config.json, model.safetensors,
generation_config.json, the tokenizer files with the chat template) and loaded back. The one explicit map between
our parameter names and transformers' is here. Only safetensors are read: pickles are never loaded."""
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from pipeline.common import UserError
from pipeline.config import ModelConfig
from pipeline.model import Transformer
from pipeline.tokenizer import save_tokenizer, special_ids

# The one explicit map between our parameter names and transformers' LlamaForCausalLM names.
HF_NAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "attn_norm.weight": "input_layernorm.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "attn.q.weight": "self_attn.q_proj.weight",
    "attn.k.weight": "self_attn.k_proj.weight",
    "attn.v.weight": "self_attn.v_proj.weight",
    "attn.o.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}


def to_hf_name(name: str) -> str:
    if name.startswith("blocks."):
        _, i, rest = name.split(".", 2)
        return f"model.layers.{i}.{HF_NAMES[rest]}"
    return HF_NAMES[name]


def hf_config(cfg: ModelConfig, special: dict[str, int]) -> dict:
    """config.json for transformers' LlamaForCausalLM; both rope spellings for old and new versions."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "torch_dtype": "float32",
        "bos_token_id": None,
        "eos_token_id": special["eos"],
        "pad_token_id": special["pad"],
    }


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """Our ModelConfig from a Llama config.json; anything this model cannot represent is refused, naming it."""
    problems = []
    if hf.get("model_type") != "llama":
        problems.append(f"model_type is {hf.get('model_type')!r}; supported: llama")
    problems += [f"{key} is set; this model has no biases" for key in ("attention_bias", "mlp_bias") if hf.get(key)]
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        problems.append("head_dim differs from hidden_size / num_attention_heads")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # the new spelling, then the old one
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope scaling {rope!r} is not supported")
    if problems:
        raise UserError(f"{where}: refused: " + "; ".join(problems) + "; base.init_from takes a Llama-architecture "
                        "model (README: Bring your own data and model)")
    return ModelConfig(
        n_layer=hf["num_hidden_layers"], n_embd=n_embd, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head), intermediate_size=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), vocab_size=hf["vocab_size"],
    )


def save_model(model: Transformer, tok: Tokenizer, folder: str) -> None:
    """A complete HF Llama folder: config.json, model.safetensors (fp32; a tied lm_head is not stored),
    generation_config.json (stops at the format's end token) and the tokenizer files with the chat template."""
    special = special_ids(tok)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_embeddings:
            continue
        state[to_hf_name(name)] = p.detach().to("cpu", torch.float32).contiguous()
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(model.cfg, special), indent=2) + "\n")
    generation = {"eos_token_id": special["eos"], "pad_token_id": special["pad"], "do_sample": False,
                  "max_new_tokens": 200}
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tok, folder)


def load_model(folder: str, device="cpu") -> Transformer:
    """Load a HF Llama folder (safetensors only: pickles are never loaded)."""
    path = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (path / name).is_file():
            raise UserError(f"{folder}: no {name}; a model folder holds config.json and model.safetensors (pickled "
                            "weights are never loaded)")
    cfg = config_from_hf(json.loads((path / "config.json").read_text()), f"{folder}/config.json")
    model = Transformer(cfg)
    tensors = load_file(str(path / "model.safetensors"))
    expected = {to_hf_name(n) for n in model.state_dict() if not (n == "lm_head.weight" and cfg.tie_embeddings)}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise UserError(f"{folder}/model.safetensors: missing {missing[:5]}, unexpected {extra[:5]}; is it a "
                        "Llama model of the shape its config.json says?")
    by_hf = {to_hf_name(n): n for n in model.state_dict()}
    model.load_state_dict({by_hf[k]: v for k, v in tensors.items()}, strict=not cfg.tie_embeddings)
    return model.to(device)
