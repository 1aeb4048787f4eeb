"""GGUF (llama.cpp's format) -> a Hugging Face Llama folder this pipeline trains from: dequantized fp32 weights in
model.safetensors, config.json, and tokenizer.json rebuilt from the vocabulary and merges stored in the file.
Only the Llama architecture with a byte-level BPE ("gpt2") vocabulary is read; anything else is refused clearly."""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from pipeline.common import UserError

# GGUF tensor name -> HF Llama name ({i}: layer)
LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOKEN_TYPE_CONTROL = 3  # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 6 byte
TOKEN_TYPE_USER = 4


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def undo_rope_permutation(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp stores q/k rows of each head interleaved (pairs) for its RoPE; HF Llama keeps the two halves
    apart ('rotate half'). Rows per head go from [x0 y0 x1 y1 ...] back to [x0 x1 ... y0 y1 ...]."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise UserError(f"GGUF architecture {arch!r} is not supported (only 'llama'); use a Llama-architecture model")
    g = lambda key, default=None: _field(reader, f"llama.{key}", default)  # noqa: E731
    n_head = int(g("attention.head_count"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": int(g("embedding_length")), "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(g("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "vocab_size": len(_field(reader, "tokenizer.ggml.tokens")),
        "tie_word_embeddings": not has_output, "attention_bias": False, "mlp_bias": False, "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }


def gguf_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    """All weights dequantized to fp32 under their HF names, q/k rows put back in HF order."""
    from gguf.quants import dequantize

    out = {}
    for t in tqdm(reader.tensors, desc="dequantize", disable=None):
        try:
            w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except (NotImplementedError, KeyError, ValueError) as e:
            kind = getattr(t.tensor_type, "name", t.tensor_type)
            raise UserError(f"GGUF tensor {t.name}: quantisation type {kind} cannot be read by the gguf package "
                            f"({type(e).__name__}: {e}); use a GGUF in F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 or "
                            "a K-quant") from None
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims fastest-first
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = undo_rope_permutation(w, config["num_attention_heads"])
            elif parts[2] == "attn_k":
                w = undo_rope_permutation(w, config["num_key_value_heads"])
        elif parts[-1] == "rope_freqs" or t.name == "rope_freqs.weight":
            continue  # derived from rope_theta
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        out[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C", copy=True))
    return out


def gguf_tokenizer(reader) -> Tokenizer:
    """The byte-level BPE stored in the file, as a `tokenizers` Tokenizer; control and user-defined tokens become
    added (special) tokens. Digits are split one by one, as the 'smollm'/'llama-bpe' pre-tokenizers do."""
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise UserError(f"GGUF tokenizer {_field(reader, 'tokenizer.ggml.model')!r} is not supported (only 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix",
                                                                          False)), use_regex=True)
    if pre in ("smollm", "llama-bpe", "llama3"):
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER)]
    tok.add_special_tokens(special)
    return tok


def convert_gguf(path: str, out: str) -> dict:
    """Write `out/` (config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the file's chat
    template); returns the config."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    config = gguf_config(reader)
    tensors = gguf_tensors(reader, config)
    if config["tie_word_embeddings"]:
        tensors.pop("lm_head.weight", None)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tok = gguf_tokenizer(reader)
    tok.save(str(folder / "tokenizer.json"))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    def name(key: str) -> str | None:
        i = _field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[i]

    tok_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": name("bos"), "eos_token": name("eos"),
                  "pad_token": name("padding"),
                  "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
                  "clean_up_tokenization_spaces": False}
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    return config
