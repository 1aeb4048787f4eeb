"""What a model's config.json says before any weights are read (no torch here, so the pack stage can ask): its text
config, its layer types, and whether its layers can keep the conversations of a packed row apart. Attention layers
can (the document mask; a sliding window ANDed with it); a linear-attention or recurrent layer (Gated DeltaNet,
Mamba, short convolutions) carries its state from one conversation into the next, so such a model is trained on one
conversation per row."""
import json
from pathlib import Path

from pipeline.common import UserError

ATTENTION_LAYERS = ("full_attention", "sliding_attention")  # the layer types the packed-row masks keep apart
RECURRENT = {"mamba", "mamba2", "falcon_mamba", "falcon_h1", "jamba", "zamba", "zamba2", "bamba", "nemotron_h",
             "granitemoehybrid", "recurrent_gemma", "rwkv", "xlstm", "lfm2", "lfm2_moe", "minimax", "qwen3_next",
             "qwen3_5", "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "olmo_hybrid"}  # state across tokens


def read_config(folder: str) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UserError(f"{folder}: no config.json; a model folder holds config.json and safetensors weights")
    return json.loads(path.read_text())


def text_config(config: dict) -> dict:
    """The language model's part of a config (a vision-language model nests it as text_config)."""
    return config.get("text_config") or config


def layer_types(config: dict) -> list[str]:
    """Each decoder layer's kind: the config's layer_types, else every layer full attention, or sliding when the
    config sets a window (as the model code of such families picks its one mask)."""
    text = text_config(config)
    n = int(text.get("num_hidden_layers") or 0)
    if text.get("layer_types"):
        return list(text["layer_types"])
    if text.get("use_sliding_window") is False:
        return ["full_attention"] * n
    return ["sliding_attention" if text.get("sliding_window") else "full_attention"] * n


def packing(config: dict) -> tuple[bool, str]:
    """(whether packed rows are safe for this model, why not when they are not)."""
    kind = config.get("model_type", "?")
    others = sorted(set(layer_types(config)) - set(ATTENTION_LAYERS))
    if others:
        return False, (f"{kind}'s {', '.join(others)} layers carry state across the conversations of a packed row "
                       "(their reference implementation takes no conversation boundaries): one conversation per row")
    if kind in RECURRENT or text_config(config).get("model_type") in RECURRENT:
        return False, (f"{kind} has recurrent or linear-attention layers that carry state across a packed row: one "
                       "conversation per row")
    return True, ""
