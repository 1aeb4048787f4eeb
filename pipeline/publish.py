"""Publishing: the fine-tuned model folder + eval metrics -> a self-contained folder with a model card
(`export`), uploaded to the Hugging Face Hub when asked for (`push`). Tokens come from the environment only."""
import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import yaml

from pipeline.common import UserError, hub_offline
from pipeline.config import PublishConfig
from pipeline.families import text_config
from pipeline.hf import model_files
from pipeline.metrics import cell, measured
from pipeline.template import chat_template, layout
from pipeline.tokenizer import load_tokenizer


def check_gate(cfg: PublishConfig, metrics: dict) -> None:
    """The publish gate on publish.gate_metric (by default sft.stopped: a chat model that does not stop makes servers
    generate until their limit)."""
    group, key = cfg.gate_metric.split(".") if "." in cfg.gate_metric else ("sft", cfg.gate_metric)
    name = f"{group}.{key}"
    measured = metrics.get(group) if isinstance(metrics.get(group), dict) else {}
    value = measured.get(key)
    if not isinstance(value, (int, float)):
        there = ", ".join(f"{group}.{k}" for k in measured)
        raise UserError(f"the metrics have no {name} (publish.gate_metric); run the evaluate stage first (`dvc repro "
                        f"evaluate`) or name one it measured{': ' + there if there else ''}")
    if not value >= cfg.gate_min:
        why = (" (the fine-tuned model does not end enough held-out answers with its end token). Train longer or "
               "check the mask in reports/render.json;") if name == "sft.stopped" else ";"
        raise UserError(f"refusing to publish: {name} = {value:.3f} is below publish.gate_min = {cfg.gate_min:.3f}"
                        f"{why} set publish.gate_min lower to publish anyway")


def check_no_regression(cfg: PublishConfig, metrics: dict) -> None:
    """publish.no_regression: refuse a model that regressed on a named suite or harness task (the evaluate stage's
    `regressions`: an sft − base interval wholly below −evaluate.regression_margin), in one line with the figures."""
    if not cfg.no_regression:
        return
    known = [k for k, v in metrics.items() if isinstance(v, dict) and "prompting" in v and k != "harness"]
    known += [k for k in metrics.get("harness", {}) if k != "prompting"]
    missing = [n for n in cfg.no_regression if n not in known]
    if missing:
        raise UserError(f"publish.no_regression names {', '.join(missing)}, which the metrics do not have (suites "
                        f"and tasks measured: {', '.join(known) or 'none'}); fix the names or add the suite "
                        "(evaluate.suites) or task (evaluate.harness.tasks)")
    found = metrics.get("regressions", {})
    worse = [f"{n}: {found[n]}" for n in cfg.no_regression if n in found]
    if worse:
        raise UserError(f"refusing to publish: the fine-tuned model regressed on {' | '.join(worse)} (sft − base, "
                        "95% interval wholly below −evaluate.regression_margin); fix the fine-tuning (lower lr, fewer "
                        "steps, mix in general data) or drop the name from publish.no_regression")


def file_hash(path: str) -> str:
    """sha256 (first 16 hex digits) of a file, or of a folder's files with their relative paths, in order."""
    h, root = hashlib.sha256(), Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file()) if root.is_dir() else [root]
    for f in files:
        if root.is_dir():
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def eval_table(metrics: dict) -> str:
    """Base vs fine-tuned, with the 95% interval where the metrics carry one (key_lo, key_hi)."""
    lines = ["| metric | base | sft |", "|---|---|---|"]
    for key in measured(metrics.get("sft", {})):
        lines.append(f"| {key} | {cell(metrics.get('base', {}), key)} | {cell(metrics.get('sft', {}), key)} |")
    return "\n".join(lines)


def general_table(metrics: dict) -> str:
    """The general-ability suites and harness tasks (evaluate stage): each score base, sft and the paired difference
    with its 95% interval; empty when none was run."""
    groups = [(f"suite {k}", v) for k, v in metrics.items() if isinstance(v, dict) and "prompting" in v
              and k != "harness"]
    groups += [(f"lm-eval {k}", v) for k, v in metrics.get("harness", {}).items() if k != "prompting"]
    lines = []
    for name, group in groups:
        for key in [k for k in group.get("sft_minus_base", {}) if f"{k}_lo" in group["sft_minus_base"]]:
            lines.append(f"| {name} | {key} | {cell(group.get('base', {}), key)} | {cell(group.get('sft', {}), key)} "
                         f"| {cell(group['sft_minus_base'], key)} |")
    if not lines:
        return ""
    return ("\n\nGeneral ability (the same questions for both models; sft − base paired, 95% interval):\n\n"
            "| suite or task | score | base | sft | sft − base |\n|---|---|---|---|---|\n" + "\n".join(lines))


def lock_provenance(lock_path: str = "dvc.lock") -> str:
    """What DVC recorded for the stages that made the model: the hashes of their data and model inputs and outputs
    (code files and reports/ left out: training curves hold timings, which differ from run to run while the data
    and the weights do not, so two identical runs publish identical folders) and params. Empty when there is no
    dvc.lock (a stage run by hand)."""
    if not Path(lock_path).exists():
        return ""
    stages = (yaml.safe_load(Path(lock_path).read_text()) or {}).get("stages", {})
    lines = []
    for name in ("synth", "tokenizer", "base", "render", "pack", "train"):
        stage = stages.get(name)
        if not stage:
            continue
        files = [f"`{d['path']}` {d.get('md5', '?')}" for d in stage.get("deps", []) + stage.get("outs", [])
                 if not d["path"].endswith(".py") and not d["path"].startswith("reports/")]
        params = stage.get("params", {}).get("params.yaml", {})
        lines.append(f"- **{name}**: " + "; ".join(files))
        if params:
            lines.append(f"  params: `{json.dumps(params, separators=(',', ':'), default=str)}`")
    return "\n".join(lines)


def model_card(cfg: PublishConfig, model_dir: str, metrics: dict, params: dict, data: dict[str, str]) -> str:
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    text = text_config(hf)  # a vision-language model's language model
    act = {"silu": "SwiGLU"}.get(text.get("hidden_act") or text.get("hidden_activation") or "silu",
                                 f"gated {text.get('hidden_act') or text.get('hidden_activation')} MLP")
    arch = (f"Architecture: {hf.get('model_type', 'llama')} ({', '.join(hf.get('architectures', []))}), "
            f"{text['num_hidden_layers']} layers, width {text['hidden_size']}, {text['num_attention_heads']} query / "
            f"{text.get('num_key_value_heads') or text['num_attention_heads']} key-value heads, {act} "
            f"{text['intermediate_size']}, vocabulary {text['vocab_size']}, tied embeddings: "
            f"{hf.get('tie_word_embeddings', text.get('tie_word_embeddings', False))}; weights in "
            f"{hf.get('torch_dtype', 'float32')}.")
    fmt = layout(load_tokenizer(model_dir)).fmt
    end, header = f"`{fmt.end}`", f"`{fmt.header('assistant')}`".replace("\n", "\\n")
    lora = params.get("train", {}).get("lora") or {}
    how = (f"Fine-tuned with LoRA (rank {lora['rank']}, alpha {lora['alpha']}, on {', '.join(lora['targets'])}); "
           "the adapters are merged into these weights." if lora.get("rank") else "Every weight was fine-tuned.")
    if lora.get("rank") and lora.get("quantize") == "nf4":
        how += (" QLoRA: the adapters were trained against an NF4 base (bitsandbytes 4-bit NormalFloat, double "
                "quantization, bf16 compute) and merged onto the base's original weights, not onto the "
                "dequantized NF4 ones.")
    provenance = "\n".join(f"- `{path}`: sha256 `{digest}`" for path, digest in data.items())
    lock = lock_provenance()
    if lock:
        provenance += f"\n\nRecorded by DVC (`dvc.lock`, md5 of inputs and outputs, params per stage):\n{lock}"
    return f"""---
library_name: transformers
tags: [sft, chat]
---
# {cfg.model_name}

A chat model fine-tuned with supervised fine-tuning (SFT) from a base model by this project's DVC pipeline.

{arch} {how}

## Chat format
Format `{fmt.name}`: each turn is {fmt.describe()} (roles: system, user, assistant, tool). A prompt for generation
ends with {header}; the model answers and ends with {end}, which is the end-of-sequence id in
`generation_config.json`. `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders exactly what
training used:

```
{chat_template(fmt)}
```

Decoding: greedy (or a low temperature), stop at {end}, a few dozen new tokens suffice for short answers.

## Evaluation (held-out conversations, greedy, judge-free)
{eval_table(metrics)}{general_table(metrics)}

Rates are means over n examples; brackets give a bootstrap 95% interval where measured. With small n a few points
of difference are noise.

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
    for name in model_files(model_dir):  # config, weights (every shard and the index), tokenizer files
        shutil.copy2(Path(model_dir) / name, Path(out) / name)
    metrics = json.loads(Path(metrics_path).read_text())
    data = {p: file_hash(p) for p in data_files}
    (Path(out) / "README.md").write_text(model_card(cfg, model_dir, metrics, params, data))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def check_reachable(endpoint: str, timeout: float = 5.0) -> None:
    """Fail in seconds, with a clear message, where the client would retry for half a minute."""
    if hub_offline():
        raise UserError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it or clear "
                           "publish.repo_id")
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise UserError(f"cannot reach {endpoint} ({e}); the exported folder is intact, upload it "
                           "later with `dvc repro publish` once online, or clear publish.repo_id") from None


def push(cfg: PublishConfig, folder: str) -> str:
    """Upload to the Hub (or the server HF_ENDPOINT names) when publish.repo_id and HF_TOKEN are set; otherwise
    say why not and return. The token goes in request headers only, never into a file."""
    token = os.environ.get("HF_TOKEN")
    if not cfg.repo_id:
        return "publish.repo_id is empty: exported only, nothing uploaded"
    if not token:
        return f"HF_TOKEN is not set: not uploading to {cfg.repo_id}"
    endpoint = hub_endpoint()
    check_reachable(endpoint)
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
        api.upload_folder(repo_id=cfg.repo_id, folder_path=folder, commit_message="Upload SFT model")
    except HfHubHTTPError as e:
        status = getattr(e.response, "status_code", None)
        what = ("check HF_TOKEN: it must be a write token of the repo's owner" if status in (401, 403)
                else "see the Hub's status, then rerun `dvc repro publish`")
        raise UserError(f"the Hub at {endpoint} refused the upload to {cfg.repo_id} (HTTP {status}); {what}; the "
                        "exported folder is intact") from None
    return f"uploaded {folder} to {cfg.repo_id} on {endpoint}"
