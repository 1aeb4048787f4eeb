import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.hf import save_model
from pipeline.publish import check_gate, export, file_hash, model_card, push
from pipeline.template import render, render_text
from tests.conftest import CONVERSATIONS, config, tiny_model
from tests.hub_server import HubServer

ROOT = Path(__file__).resolve().parents[1]

METRICS = {"base": {"n": 3, "exact_match": 0.0, "contains_answer": 0.0, "stopped": 0.0, "length_ok": 0.0,
                    "distinct3": 0.5, "dev_loss": 5.0},
           "sft": {"n": 3, "exact_match": 0.667, "contains_answer": 0.667, "stopped": 1.0, "length_ok": 1.0,
                   "distinct3": 1.0, "dev_loss": 1.5}}


@pytest.fixture
def published(tok, tmp_path):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    out.mkdir()
    save_model(tiny_model(tok.get_vocab_size()), tok, str(model_dir))
    (tmp_path / "metrics.json").write_text(json.dumps(METRICS))
    (tmp_path / "train.jsonl").write_text("{}\n")
    export(config("publish", model_name="tiny"), str(model_dir), str(tmp_path / "metrics.json"), str(out),
           {"train": {"lr": 3e-4}}, [str(tmp_path / "train.jsonl")])
    return out


def test_exported_chat_template_renders_like_the_renderer(tok, published):
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(published))
    for conv in CONVERSATIONS:
        assert hf_tok.apply_chat_template(conv, tokenize=False) == render_text(conv)
        prompt = conv[:-1]
        assert hf_tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == render_text(
            prompt, add_generation_prompt=True)
    for conv in CONVERSATIONS[:3]:  # no marker-like text inside content: the ids agree too
        ids = hf_tok.apply_chat_template(conv, tokenize=True, return_dict=True)["input_ids"]
        assert ids == render(conv, tok)[0]


def test_published_folder_is_complete(published, tok):
    names = {p.name for p in published.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "README.md"} <= names
    assert json.loads((published / "generation_config.json").read_text())["eos_token_id"] == tok.token_to_id("<|end|>")
    card = (published / "README.md").read_text()
    assert "| stopped | 0.000 | 1.000 |" in card and "| n | 3 | 3 |" in card
    assert "Architecture: llama (LlamaForCausalLM), 2 layers" in card
    assert "<|assistant|>" in card and "Limitations" in card
    assert "train.jsonl`: sha256" in card


def test_push_skips_with_a_reason(published, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert "repo_id is empty" in push(config("publish"), str(published))
    assert "HF_TOKEN is not set" in push(config("publish", repo_id="me/model"), str(published))


def test_gate_refuses_a_model_that_does_not_stop():
    check_gate(config("publish", gate_min=0.9), METRICS)  # sft.stopped = 1.0 passes
    low = {"base": METRICS["base"], "sft": METRICS["sft"] | {"stopped": 0.42}}
    with pytest.raises(ValueError, match=r"sft.stopped = 0.420 is below publish.gate_min = 0.900"):
        check_gate(config("publish", gate_min=0.9), low)
    check_gate(config("publish", gate_min=0.4), low)
    with pytest.raises(ValueError, match="no sft.stopped"):
        check_gate(config("publish"), {"base": METRICS["base"]})


def test_gate_reads_the_metric_it_is_told():
    metrics = {"answers": "long", "sft": {"stopped": 0.1, "rougeL": 0.31},
               "sft_minus_base": {"rougeL": 0.05, "rougeL_lo": 0.01, "rougeL_hi": 0.09}}
    check_gate(config("publish", gate_metric="rougeL", gate_min=0.3), metrics)  # sft.stopped 0.1 is not read
    check_gate(config("publish", gate_metric="sft_minus_base.rougeL_lo", gate_min=0.0), metrics)
    with pytest.raises(ValueError, match=r"^refusing to publish: sft_minus_base.rougeL_lo = 0.010 is below "
                                         r"publish.gate_min = 0.020; set publish.gate_min lower"):
        check_gate(config("publish", gate_metric="sft_minus_base.rougeL_lo", gate_min=0.02), metrics)
    with pytest.raises(ValueError, match=r"no sft.chrf .*name one it measured: sft.stopped, sft.rougeL"):
        check_gate(config("publish", gate_metric="chrf"), metrics)
    with pytest.raises(ValueError, match="gate_metric"):
        config("publish", gate_metric="a.b.c")


def test_card_shows_intervals_and_dvc_lock_provenance(tok, tmp_path, monkeypatch):
    lock = {"schema": "2.0", "stages": {"train": {
        "cmd": "python -m stages.train", "params": {"params.yaml": {"train": {"lr": 3e-4}}},
        "deps": [{"path": "data/packed", "md5": "abc.dir"}, {"path": "stages/train.py", "md5": "code"}],
        "outs": [{"path": "models/sft", "md5": "def.dir"}, {"path": "reports/train/metrics.json", "md5": "timing"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    monkeypatch.chdir(tmp_path)
    metrics = {"base": METRICS["base"] | {"stopped_lo": 0.0, "stopped_hi": 0.1},
               "sft": METRICS["sft"] | {"stopped_lo": 0.9, "stopped_hi": 1.0}}
    save_model(tiny_model(tok.get_vocab_size()), tok, str(tmp_path / "model"))
    card = model_card(config("publish"), str(tmp_path / "model"), metrics, {}, {})
    assert "| stopped | 0.000 [0.000, 0.100] | 1.000 [0.900, 1.000] |" in card
    assert "**train**: `data/packed` abc.dir; `models/sft` def.dir\n" in card and "stages/train.py" not in card
    assert "timing" not in card  # the reports hold timings: two identical runs publish identical folders
    assert '"lr":0.0003' in card
    assert "Every weight was fine-tuned." in card
    lora = {"train": {"lora": {"rank": 16, "alpha": 32.0, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}}}
    card = model_card(config("publish"), str(tmp_path / "model"), metrics, lora, {})
    assert "Fine-tuned with LoRA (rank 16, alpha 32.0, on q_proj, v_proj); the adapters are merged" in card
    assert "NF4" not in card
    lora["train"]["lora"]["quantize"] = "nf4"
    card = model_card(config("publish"), str(tmp_path / "model"), metrics, lora, {})
    assert "QLoRA: the adapters were trained against an NF4 base" in card and "not onto the dequantized" in card


TOKEN = "hf_TestSecretToken0123456789abcdef"


def publish_stage(tmp_path, tok, env: dict, metrics: dict = METRICS) -> subprocess.CompletedProcess:
    """Run the real publish stage in a scratch project folder, as DVC would."""
    save_model(tiny_model(tok.get_vocab_size()), tok, str(tmp_path / "sft"))
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "train.jsonl").write_text('{"messages": []}\n')
    params = {"publish": {"repo_id": "tester/tiny-chat", "private": True, "model_name": "tiny",
                          "gate_metric": "stopped", "gate_min": 0.5, "no_regression": []}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    return subprocess.run([sys.executable, "-m", "stages.publish", "sft", "metrics.json", "out", "train.jsonl"],
                          cwd=tmp_path, env=clean | {"PYTHONPATH": str(ROOT)} | env, capture_output=True, text=True,
                          timeout=120)


def test_upload_to_a_hub_server_on_localhost(tok, tmp_path):
    with HubServer() as hub:
        proc = publish_stage(tmp_path, tok, {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 0, proc.stderr
    assert f"uploaded out to tester/tiny-chat on {hub.url}" in proc.stdout
    repo = hub.state.repos["tester/tiny-chat"]
    assert repo["private"] and repo["commits"] == ["Upload SFT model"]
    exported = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    assert repo["files"] == exported  # the whole folder, byte for byte
    assert "| stopped | 0.000 | 1.000 |" in repo["files"]["README.md"].decode()
    # the token travels in the Authorization header, and nowhere else
    assert all(h.get("authorization") == f"Bearer {TOKEN}" for m, _, h in hub.state.requests if m == "POST")
    assert not any(TOKEN.encode() in data for data in repo["files"].values())
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not any(TOKEN.encode() in p.read_bytes() for p in written)
    assert TOKEN not in proc.stdout + proc.stderr


def test_the_hub_rejecting_the_token_is_one_clear_line(tok, tmp_path):
    with HubServer(token="hf_the_right_one") as hub:
        proc = publish_stage(tmp_path, tok, {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN})
    assert proc.returncode == 1 and not hub.state.repos  # nothing created
    assert proc.stderr.splitlines() == [f"publish: the Hub at {hub.url} refused the upload to tester/tiny-chat (HTTP "
                                        "401); check HF_TOKEN: it must be a write token of the repo's owner; the "
                                        "exported folder is intact"]
    assert TOKEN not in proc.stdout + proc.stderr and (tmp_path / "out/model.safetensors").exists()


def test_upload_without_network_fails_fast_and_clearly(tok, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    t0 = time.monotonic()
    proc = publish_stage(tmp_path, tok, {"HF_ENDPOINT": dead, "HF_TOKEN": TOKEN})
    assert proc.returncode != 0 and f"cannot reach {dead}" in proc.stderr
    assert time.monotonic() - t0 < 20  # the client's own retries take ~25 s
    assert (tmp_path / "out" / "model.safetensors").exists()  # the export itself is kept
    proc = publish_stage(tmp_path / "out", tok, {"HF_HUB_OFFLINE": "1", "HF_TOKEN": TOKEN})
    assert proc.returncode != 0 and "HF_HUB_OFFLINE is set" in proc.stderr


def test_stage_refuses_to_publish_below_the_gate(tok, tmp_path):
    low = {"base": METRICS["base"], "sft": METRICS["sft"] | {"stopped": 0.2}}
    proc = publish_stage(tmp_path, tok, {"HF_TOKEN": TOKEN}, metrics=low)
    assert proc.returncode != 0 and "refusing to publish: sft.stopped = 0.200" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_base_model_from_a_hub_repo_id(tok, tmp_path):
    """Publish to the local Hub server, then name it as a base model: hf://org/name downloads it."""
    with HubServer() as hub:
        assert publish_stage(tmp_path, tok, {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN}).returncode == 0
        code = ("import sys; from pipeline.sources import resolve_model; from pipeline.hf import load_model; "
                "folder = resolve_model('hf://tester/tiny-chat', sys.argv[1]); print(folder); load_model(folder)")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "work")], capture_output=True, text=True,
                              env=clean | {"PYTHONPATH": str(ROOT), "HF_ENDPOINT": hub.url}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "work2")], capture_output=True, text=True,
                          env=clean | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert proc.returncode != 0 and "cannot download tester/tiny-chat: HF_HUB_OFFLINE is set" in proc.stderr


def test_data_hash_covers_a_folder_of_sources(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "a.jsonl").write_text("1\n")
    (folder / "b.jsonl").write_text("2\n")
    before = file_hash(str(folder))
    (folder / "b.jsonl").write_text("3\n")
    assert file_hash(str(folder)) != before
    (folder / "b.jsonl").write_text("2\n")
    assert file_hash(str(folder)) == before and file_hash(str(folder / "a.jsonl")) != before
