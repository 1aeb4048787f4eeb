"""Where a base model comes from: `base.init_from` names a local Hugging Face Llama folder, a GGUF file, or a Hub
repo id (`hf://org/name`, optionally `@revision`). Each is turned into a local folder in the layout this pipeline
reads (config.json, model.safetensors, tokenizer.json); pickles are never downloaded or loaded."""
from pathlib import Path

from pipeline.common import UserError, hub_offline

HUB_PREFIX = "hf://"
IMPORT_DIR = ".cache/init_from"  # converted GGUF and downloaded Hub models: outside DVC outputs, git-ignored
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
             "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def resolve_model(spec: str, work_dir: str, code: bool = False) -> str:
    """A local folder for `spec`; GGUF files are converted and Hub repos downloaded into work_dir/ (with the
    modeling code a repo ships when `code`: base.trust_remote_code)."""
    if spec.startswith(HUB_PREFIX):
        return download_from_hub(spec[len(HUB_PREFIX):], str(Path(work_dir) / "hub"), code)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"base.init_from: GGUF file {spec} does not exist; fix base.init_from")
        from pipeline.gguf import convert_gguf

        out = Path(work_dir) / "gguf"
        convert_gguf(str(path), str(out))
        return str(out)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"base.init_from: {spec} has no config.json; point it at a Hugging Face model folder")
        return str(path)
    raise UserError(f"base.init_from: {spec!r} is neither a model folder, a .gguf file, nor hf://org/name")


def download_from_hub(repo: str, out: str, code: bool = False) -> str:
    """snapshot_download of the safetensors and JSON files only (and Python files when `code`); a clear error when
    offline."""
    repo_id, _, revision = repo.partition("@")
    if hub_offline():
        raise UserError(f"base.init_from: cannot download {repo_id}: HF_HUB_OFFLINE is set. Download it once "
                           "online (or copy the folder here) and point base.init_from at the local folder")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision or None, local_dir=out,
                                   allow_patterns=HUB_FILES + (["*.py"] if code else []),
                                   etag_timeout=10)
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as e:
        raise UserError(f"base.init_from: cannot download {repo_id} from the Hub ({type(e).__name__}: {e}). "
                           "Offline? Point base.init_from at a local folder instead") from None
    if not any(Path(folder).glob("*.safetensors")):
        raise UserError(f"base.init_from: {repo_id} has no safetensors weights (pickled weights are never loaded)")
    return folder
