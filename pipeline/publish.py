"""Publishing: the fine-tuned model folder + eval metrics -> a self-contained folder with a model card
(`export`), uploaded to the Hugging Face Hub when asked for (`push`). Tokens come from the environment only."""
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import yaml

from pipeline.chat import CHAT_TEMPLATE

MODEL_FILES = ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
               "tokenizer_config.json")
METRICS = ("exact_match", "contains_answer", "stopped", "length_ok", "distinct3", "dev_loss")


@dataclasses.dataclass
class PublishConfig:
    repo_id: str = ""  # Hugging Face Hub repo, e.g. user/tiny-chat; empty: export only, no upload
    private: bool = True  # create the Hub repo as private
    model_name: str = "sft-chat"  # name shown in the model card


def file_hash(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def eval_table(metrics: dict) -> str:
    lines = ["| metric | base | sft |", "|---|---|---|"]
    for key in ("n", *METRICS):
        row = [metrics.get(m, {}).get(key) for m in ("base", "sft")]
        cells = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in row]
        lines.append(f"| {key} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def model_card(cfg: PublishConfig, model_dir: str, metrics: dict, params: dict, data: dict[str, str]) -> str:
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    arch = (f"Llama architecture: {hf['num_hidden_layers']} layers, width {hf['hidden_size']}, "
            f"{hf['num_attention_heads']} query / {hf['num_key_value_heads']} key-value heads, "
            f"SwiGLU {hf['intermediate_size']}, vocabulary {hf['vocab_size']}, "
            f"tied embeddings: {hf['tie_word_embeddings']}.")
    provenance = "\n".join(f"- `{path}`: sha256 `{digest}`" for path, digest in data.items())
    return f"""---
library_name: transformers
tags: [sft, chat]
---
# {cfg.model_name}

A chat model fine-tuned with supervised fine-tuning (SFT) from a base model by this project's DVC pipeline.

{arch}

## Chat format
Each turn is `<|role|>` + content + `<|end|>` (roles: system, user, assistant), with no newlines around the
markers. A prompt for generation ends with `<|assistant|>`; the model answers and ends with `<|end|>`, which is the
end-of-sequence id in `generation_config.json`. `tokenizer.apply_chat_template(messages,
add_generation_prompt=True)` renders exactly what training used:

```
{CHAT_TEMPLATE}
```

Decoding: greedy (or a low temperature), stop at `<|end|>`, a few dozen new tokens suffice for short answers.

## Evaluation (held-out conversations, greedy, judge-free)
{eval_table(metrics)}

Rates are means over n examples; with small n a few points of difference are noise.

## Provenance
Data and tokenizer:
{provenance}

Parameters (`params.yaml`):
```yaml
{yaml.safe_dump(params, sort_keys=False).strip()}
```

## Limitations
Small models hallucinate confidently. SFT shapes format (answer briefly, stop), not knowledge: a fact the base
model did not learn in pretraining is not learned here. Evaluate on your own data before relying on it.
"""


def export(cfg: PublishConfig, model_dir: str, metrics_path: str, out: str, params: dict,
           data_files: list[str]) -> None:
    """Write the publishable folder: the model files, and README.md (the model card)."""
    for name in MODEL_FILES:
        shutil.copy2(Path(model_dir) / name, Path(out) / name)
    metrics = json.loads(Path(metrics_path).read_text())
    data = {p: file_hash(p) for p in data_files}
    (Path(out) / "README.md").write_text(model_card(cfg, model_dir, metrics, params, data))


def push(cfg: PublishConfig, folder: str) -> str:
    """Upload to the Hub when publish.repo_id and HF_TOKEN are set; otherwise say why not and return."""
    token = os.environ.get("HF_TOKEN")
    if not cfg.repo_id:
        return "publish.repo_id is empty: exported only, nothing uploaded"
    if not token:
        return f"HF_TOKEN is not set: not uploading to {cfg.repo_id}"
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
    api.upload_folder(repo_id=cfg.repo_id, folder_path=folder, commit_message="Upload SFT model")
    return f"uploaded {folder} to {cfg.repo_id}"
