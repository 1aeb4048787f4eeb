"""One model interface, two implementations: `native` (pipeline/model.py, the families ported here) and
`transformers` (pipeline/hf_backend.py, any decoder transformers builds). base.backend picks one; `auto` takes native
for a family the port represents exactly, transformers for any other model_type, and says which and why.

What a model offers the pipeline, on either backend:
- forward(ids, labels, pos, doc, at, targets) -> (fp32 cross-entropy summed over the trained targets, their count),
  from the final hidden states at trained positions only, chunked by `loss_chunk`; forward(ids) -> logits (B, T, V);
  packed rows: positions restart and attention stays inside each conversation (doc) in every layer; states(ids, pos,
  doc) -> the final hidden states (B, T, D) and logits(h) -> fp32 logits, for scoring chosen positions only;
- `blocks` (the decoder layers: FSDP2 units, activation checkpointing by `checkpointing`), `neftune_alpha`,
  `compile_blocks()`, `num_params()`, `arch.max_seq_len`; in training, a mixture-of-experts model leaves its router
  load-balancing loss (coefficient applied) in `router_loss`, else None;
- generation through pipeline.generate.generate (the transformers backend decodes over its own cache: `decode`);
- LoRA on named projections (add_adapters), the adapter in PEFT's layout (save_adapter), the merged model saved in
  the base model's own config, dtype and shards (save_model), and a memory planner from config.json (planner)."""
import functools

import torch
from tokenizers import Tokenizer

from pipeline.common import UserError
from pipeline.config import BACKENDS, LoraConfig
from pipeline.families import read_config
from pipeline.model import Transformer

NATIVE = "native (pipeline/model.py)"


def choose(config: dict, backend: str, where: str = "config.json") -> tuple[str, str]:
    """(native | transformers, why) for a model's config.json and base.backend."""
    from pipeline.hf import architecture

    assert backend in BACKENDS, backend
    kind = config.get("model_type")
    if backend == "transformers":
        return "transformers", "base.backend: transformers"
    try:
        architecture(config, where)
    except UserError as e:
        if backend == "native":
            raise
        why = str(e).split("refused: ")[-1].split("; README")[0]
        return "transformers", f"model_type {kind!r}: the native port refuses it ({why})"
    return "native", (f"model_type {kind!r} is ported natively" if backend == "auto" else "base.backend: native")


def load_model(folder: str, backend: str = "auto", device="cpu", trust_remote_code: bool = False):
    """The model of a folder on the chosen backend, in fp32 (the master weights of training)."""
    if choose(read_config(folder), backend, f"{folder}/config.json")[0] == "native":
        from pipeline.hf import load_model as native

        return native(folder, device)
    from pipeline.hf_backend import load_model as transformers

    return transformers(folder, device, trust_remote_code)


def describe(folder: str, backend: str) -> str:
    """The start line's backend part: `backend native (why)`."""
    name, why = choose(read_config(folder), backend, f"{folder}/config.json")
    return f"backend {name} ({why})"


def save_model(model, tok: Tokenizer, folder: str, like: str, dtype: torch.dtype | None = None,
               max_shard_bytes: int = 5 * 10**9) -> None:
    if isinstance(model, Transformer):
        from pipeline.hf import save_model as native

        return native(model, tok, folder, like, dtype, max_shard_bytes)
    from pipeline.hf_backend import save_model as transformers

    return transformers(model, tok, folder, like, dtype, max_shard_bytes)


def add_adapters(model, cfg: LoraConfig, seed: int, device=None) -> int:
    """LoRA adapters on the targeted projections (QLoRA: their frozen weights stored in NF4 on `device`)."""
    if isinstance(model, Transformer):
        from pipeline.lora import add_adapters as native

        return native(model, cfg, seed, device)
    from pipeline.hf_backend import add_adapters as transformers

    return transformers(model, cfg, seed, device)


def save_adapter(model, tensors: dict[str, torch.Tensor], cfg: LoraConfig, folder: str, base: str) -> None:
    if isinstance(model, Transformer):
        from pipeline.lora import save_adapter as native

        return native(tensors, cfg, folder, base)
    from pipeline.hf_backend import save_adapter as transformers

    return transformers(tensors, cfg, folder, base)


def planner(folder: str, backend: str, trust_remote_code: bool = False):
    """(the memory planner of the folder's model, what it plans from) for pipeline.memory.plan_and_check: natively
    pipeline.memory.plan_memory and an Architecture; on transformers, pipeline.hf_memory's from config.json (and the
    folder's own modeling code, when it ships some and it is trusted)."""
    config = read_config(folder)
    if choose(config, backend, f"{folder}/config.json")[0] == "native":
        from pipeline.hf import architecture
        from pipeline.memory import plan_memory as native

        return native, architecture(config, f"{folder}/config.json")
    from pipeline.hf_memory import plan_memory as transformers

    return functools.partial(transformers, folder=folder, trust_remote_code=trust_remote_code), config


def one_per_row(arrays: dict) -> bool:
    """Every packed row holds at most one conversation (doc: -1 padding, else one index per row)."""
    doc = arrays["doc"]
    first = doc[:, :1]
    return bool(((doc == first) | (doc < 0)).all())


def check_rows(model, split: str, arrays: dict) -> None:
    """A model whose layers cannot keep packed conversations apart refuses rows that pack several."""
    if not getattr(model, "packable", True) and not one_per_row(arrays):
        raise UserError(f"{split} holds several conversations per packed row, but {model.why}; rerun the pack "
                        "stage (`dvc repro pack`), which packs one per row for this model")
