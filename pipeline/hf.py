"""Hugging Face model folders, both ways. In: a model of a supported family (llama, with llama3 or linear RoPE
scaling; qwen2; qwen3; mistral) from its config.json and one or many safetensors shards, in fp32, bf16 or fp16,
streamed shard by shard into our fp32 weights. Out: a folder transformers loads with no code of ours, in the
model's own config.json (every field carried over), generation config and dtype, sharded above a size limit.
Pickled weights are never loaded."""
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from pipeline.common import UserError
from pipeline.config import TrainConfig
from pipeline.families import read_config
from pipeline.model import Architecture, Transformer, inv_freq
from pipeline.tokenizer import save_tokenizer, special_ids

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
            "mistral": "MistralForCausalLM"}  # model_type -> the transformers class config.json names
ROPE_SCALING = {"llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
                "linear": ("factor",)}  # supported rope types -> the keys they need
INDEX = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# our module paths -> transformers' (per layer after model.layers.<i>., or at the root); the one explicit name map
MODULES = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head",
           "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
           "attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
           "attn.o": "self_attn.o_proj", "attn.q_norm": "self_attn.q_norm", "attn.k_norm": "self_attn.k_norm",
           "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}


def to_hf_name(name: str) -> str:
    """Our parameter name -> transformers': "blocks.3.attn.q.bias" -> "model.layers.3.self_attn.q_proj.bias"."""
    module, _, leaf = name.rpartition(".")
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"model.layers.{i}.{MODULES[rest]}.{leaf}"
    return f"{MODULES[module]}.{leaf}"


def architecture(hf: dict, where: str = "config.json") -> Architecture:
    """Our Architecture from a config.json; anything the model code cannot represent exactly is refused, naming
    every reason at once."""
    family, problems = hf.get("model_type"), []
    if family not in FAMILIES:
        problems.append(f"model_type {family!r} is not supported (supported: {', '.join(FAMILIES)})")
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r}: only silu (SwiGLU)")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})  # the new spelling, then the old one
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", *ROPE_SCALING):
        problems.append(f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_SCALING)})")
    elif kind != "default" and not all(k in rope for k in ROPE_SCALING[kind]):
        problems.append(f"rope scaling {kind} needs {', '.join(ROPE_SCALING[kind])}")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append("partial_rotary_factor is not supported")
    if family in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        problems.append("use_sliding_window (a window on some layers only) is not supported")
    if problems:
        raise UserError(f"{where}: refused: " + "; ".join(problems) + "; README: Bring your own data and model")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    attention_bias = bool(hf.get("attention_bias", False))
    return Architecture(
        n_layer=hf["num_hidden_layers"], n_embd=n_embd, n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads") or n_head, head_dim=hf.get("head_dim") or n_embd // n_head,
        intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        vocab_size=hf["vocab_size"], rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        rope_scaling=() if kind == "default" else (("rope_type", kind),) + tuple(
            (k, float(rope[k])) for k in ROPE_SCALING[kind]),
        qkv_bias=family == "qwen2" or attention_bias, o_bias=attention_bias and family != "qwen2",
        mlp_bias=bool(hf.get("mlp_bias", False)), qk_norm=family == "qwen3",
        sliding_window=int(hf.get("sliding_window") or 0) if family == "mistral" else 0)


def hf_config(arch: Architecture, special: dict[str, int]) -> dict:
    """config.json of the bundled model, a plain Llama; both rope spellings for old and new transformers."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": arch.vocab_size,
        "hidden_size": arch.n_embd, "intermediate_size": arch.intermediate_size, "num_hidden_layers": arch.n_layer,
        "num_attention_heads": arch.n_head, "num_key_value_heads": arch.n_kv_head, "head_dim": arch.head_dim,
        "hidden_act": "silu", "max_position_embeddings": arch.max_seq_len, "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": arch.rope_theta},
        "tie_word_embeddings": arch.tie_embeddings, "attention_bias": False, "mlp_bias": False,
        "initializer_range": arch.init_std, "torch_dtype": "float32", "bos_token_id": None,
        "eos_token_id": special["eos"], "pad_token_id": special["pad"],
    }


def weight_files(folder: str) -> dict[str, list[str]]:
    """The safetensors files of a model folder -> the tensor names the index says each holds (one file: all)."""
    path = Path(folder)
    if (path / INDEX).is_file():
        by_file: dict[str, list[str]] = {}
        for name, file in json.loads((path / INDEX).read_text())["weight_map"].items():
            by_file.setdefault(file, []).append(name)
        missing = [f for f in by_file if not (path / f).is_file()]
        if missing:
            raise UserError(f"{folder}: {INDEX} lists {', '.join(sorted(missing))}, which is not in the folder; "
                            "download the whole model again")
        return by_file
    if (path / "model.safetensors").is_file():
        return {"model.safetensors": []}  # one file: whatever it holds
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    raise UserError(f"{folder}: no safetensors weights (model.safetensors or {INDEX})"
                    + (f"; {', '.join(pickles)} would need unpickling, which is never done" if pickles else "")
                    + "; convert the model to safetensors")


def weights_dtype(folder: str) -> torch.dtype:
    """The dtype a model folder stores its weights in: config.json's (torch_)dtype, else the first tensor's."""
    hf = read_config(folder)
    name = hf.get("dtype") or hf.get("torch_dtype")
    if name in DTYPES:
        return DTYPES[name]
    file = next(iter(weight_files(folder)))
    with safe_open(str(Path(folder) / file), framework="pt") as f:
        stored = f.get_slice(next(iter(f.keys()))).get_dtype()  # from the header: "F32", "BF16", "F16"
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}.get(stored, torch.float32)


def load_model(folder: str, device="cpu") -> Transformer:
    """A model folder as our Transformer, in fp32 (the master weights of training, whatever the file's dtype),
    read shard by shard: one tensor at a time is converted, so no second copy of the weights is ever held."""
    arch = architecture(read_config(folder), f"{folder}/config.json")
    with torch.device("meta"):
        model = Transformer(arch)
    model = model.to_empty(device="cpu")
    if arch.tie_embeddings:  # to_empty gives every parameter its own storage: tie them again
        model.lm_head.weight = model.embed.weight
    model.rope_freq = inv_freq(arch)  # a buffer made on the meta device, not in the weights
    params = dict(model.named_parameters())  # a tied lm_head is the embedding: listed once
    expected = {to_hf_name(n): n for n in params}
    seen = set()
    for file in weight_files(folder):
        with safe_open(str(Path(folder) / file), framework="pt") as f:
            for key in f.keys():
                if key == "lm_head.weight" and arch.tie_embeddings:
                    continue  # some tied checkpoints store the shared matrix twice
                if key not in expected:
                    raise UserError(f"{folder}/{file}: unexpected tensor {key}; is it a {', '.join(FAMILIES)} model "
                                    "of the shape its config.json says?")
                p, t = params[expected[key]], f.get_tensor(key)
                if tuple(t.shape) != tuple(p.shape):
                    raise UserError(f"{folder}/{file}: {key} has shape {tuple(t.shape)}, config.json implies "
                                    f"{tuple(p.shape)}")
                with torch.no_grad():
                    p.copy_(t)
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise UserError(f"{folder}: missing tensors {missing[:4]}{' ...' if len(missing) > 4 else ''}; a shard may "
                        "be missing or cut short")
    return model.to(device)


def shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, grouped into files of at most max_bytes (a single larger tensor gets a file alone)."""
    groups, size = [{}], 0
    for name, t in state.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def save_model(model: Transformer, tok: Tokenizer, folder: str, like: str | None = None,
               dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 10**9) -> None:
    """A complete model folder: config.json, the weights (safetensors, in shards of at most max_shard_bytes with
    model.safetensors.index.json when they do not fit one), generation_config.json (stopping at the chat format's
    end token) and the tokenizer files with the chat template. With `like` (the folder the model came from), its
    config.json is kept field for field and its generation config gets our end token added to its end ids; the
    weights are written in `dtype`, by default the dtype `like` stores (fp32 for the bundled model)."""
    special = special_ids(tok)
    dtype = dtype or (weights_dtype(like) if like else torch.float32)
    state = {to_hf_name(n): p.detach().to("cpu", dtype).contiguous() for n, p in model.named_parameters()}
    path = Path(folder)
    path.mkdir(parents=True, exist_ok=True)
    groups = shards(state, max_shard_bytes)
    if len(groups) == 1:
        save_file(groups[0], str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, group in enumerate(groups, start=1):
            name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
            save_file(group, str(path / name), metadata={"format": "pt"})
            weight_map |= dict.fromkeys(group, name)
        total = sum(t.numel() * t.element_size() for t in state.values())
        (path / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
                                  + "\n")
    if like:
        write_configs(folder, like, dtype, tok)
        return
    config = hf_config(model.arch, special)
    generation = {"eos_token_id": special["eos"], "pad_token_id": special["pad"], "do_sample": False,
                  "max_new_tokens": 200}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tok, folder)


def write_configs(folder: str, like: str, dtype: torch.dtype, tok: Tokenizer, drop: tuple[str, ...] = ()) -> None:
    """config.json of `like` field for field (but `drop`), with the dtype the weights were written in;
    its generation config with our end token added to its end ids; the tokenizer files with the chat template."""
    special = special_ids(tok)
    path = Path(folder)
    config = read_config(like) | {"torch_dtype": next(k for k, v in DTYPES.items() if v == dtype)}
    for key in ("dtype", *drop):  # transformers 5 writes `dtype`; one spelling, read by old and new
        config.pop(key, None)
    theirs = Path(like) / "generation_config.json"
    generation = json.loads(theirs.read_text()) if theirs.is_file() else {}
    ends = generation.get("eos_token_id", config.get("eos_token_id"))
    ends = [e for e in (ends if isinstance(ends, list) else [ends]) if e is not None]
    ends += [special["eos"]] if special["eos"] not in ends else []
    generation["eos_token_id"] = ends[0] if len(ends) == 1 else ends  # one id stays a number, as it came
    generation.setdefault("pad_token_id", special["pad"])
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_tokenizer(tok, folder)


def model_files(folder: str) -> list[str]:
    """The files that make a model folder: config, generation config, weights (and their index), tokenizer files."""
    names = ["config.json", "generation_config.json", *weight_files(folder), INDEX, "tokenizer.json",
             "tokenizer_config.json"]
    return [n for n in names if (Path(folder) / n).is_file()]


def copy_model(src: str, tok: Tokenizer, out: str) -> None:
    """An imported model as it came (config, weights in their dtype and shards), with our tokenizer files."""
    Path(out).mkdir(parents=True, exist_ok=True)
    for name in model_files(src):
        if not name.startswith("tokenizer"):
            shutil.copy2(Path(src) / name, Path(out) / name)
    save_tokenizer(tok, out)


def save_options(cfg: TrainConfig) -> dict:
    """save_model's dtype and shard size from the train (or base.pretrain) params."""
    return {"dtype": None if cfg.save_dtype == "auto" else DTYPES[cfg.save_dtype],
            "max_shard_bytes": int(cfg.max_shard_gb * 10**9)}
