"""Every stage ends a user error (bad data, a bad or missing param, a missing input, a refused model, an offline
Hub, a refused publication) with one line on stderr, `<stage>: <what>, <where>, <what to do>`, and exit status 1;
a bug keeps its traceback. The stages run as DVC runs them: `python -m stages.<name> ...` in the project folder."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.common import UserError, run_stage
from pipeline.hf import save_model
from tests.conftest import CONVERSATIONS, ROOT, tiny_model, write_params


def stage(folder, name: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=folder, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)} | (env or {}), timeout=300)


def one_line(proc: subprocess.CompletedProcess, name: str, *parts: str) -> str:
    """The run failed with exit status 1 and exactly one line on stderr, `<name>: ...` holding every part."""
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{name}: "), proc.stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


def test_synth_bad_params_all_at_once(tmp_path):
    write_params(tmp_path, synth={"n_towns": 0, "frac_fact": 2.0})
    one_line(stage(tmp_path, "synth", "out"), "synth", "params.yaml: ", "synth.n_towns=0 must be at least 1",
             "synth.frac_fact=2.0 must be in [0, 1]")
    assert not (tmp_path / "out").exists()


def test_tokenizer_missing_corpus_and_unknown_base_model(tmp_path):
    write_params(tmp_path)
    one_line(stage(tmp_path, "tokenizer", "corpus.jsonl", "tok"), "tokenizer", "missing input corpus.jsonl",
             "dvc repro")
    write_params(tmp_path, base={"init_from": "nowhere/model"})
    one_line(stage(tmp_path, "tokenizer", "corpus.jsonl", "tok"), "tokenizer",
             "base.init_from: 'nowhere/model' is neither a model folder, a .gguf file, nor hf://org/name")
    (tmp_path / "corpus.jsonl").write_text('{"text": "a b c"}\n{"txt": "oops"}\n')
    write_params(tmp_path)
    one_line(stage(tmp_path, "tokenizer", "corpus.jsonl", "tok"), "tokenizer", "corpus.jsonl:2: not a JSON object")


def test_base_refuses_an_unsupported_family_and_the_hub_offline(tmp_path, tok):
    from pipeline.tokenizer import save_tokenizer

    save_tokenizer(tok, str(tmp_path / "tok"))
    (tmp_path / "corpus.jsonl").write_text('{"text": "The river Osk flows through Velmora."}\n')
    gpt2 = tmp_path / "gpt2"
    save_model(tiny_model(tok.get_vocab_size()), tok, str(gpt2))
    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    write_params(tmp_path, base={"init_from": str(gpt2), "backend": "native"})
    args = ("corpus.jsonl", "tok", "base", "reports/base", "ckpt")
    one_line(stage(tmp_path, "base", *args), "base", "config.json: refused: model_type 'gpt2' is not supported "
             "(supported: llama, qwen2, qwen3, mistral)")
    write_params(tmp_path, base={"init_from": str(gpt2), "backend": "auto"})  # transformers knows gpt2: not these
    one_line(stage(tmp_path, "base", *args), "base", "weights do not match its config.json")
    (gpt2 / "config.json").write_text(json.dumps(config | {"model_type": "gpt0"}))
    one_line(stage(tmp_path, "base", *args), "base", "model_type 'gpt0' is known neither to the native backend nor "
             "to transformers")
    write_params(tmp_path, base={"init_from": "hf://me/model"})
    one_line(stage(tmp_path, "base", *args, env={"HF_HUB_OFFLINE": "1"}), "base",
             "cannot download me/model: HF_HUB_OFFLINE is set")
    assert not (tmp_path / "base").exists()


def test_render_a_bad_row_is_one_line_with_file_and_line(tmp_path, tok):
    from pipeline.tokenizer import save_tokenizer

    save_tokenizer(tok, str(tmp_path / "tok"))
    good = json.dumps({"messages": CONVERSATIONS[0]})
    (tmp_path / "data").mkdir()
    (tmp_path / "data/x.jsonl").write_text(f"{good}\n{{not json\n{good}\n")
    write_params(tmp_path)
    args = ("tok", "data/x.jsonl", "data/x.jsonl", "data/x.jsonl", "rendered", "render.json")
    one_line(stage(tmp_path, "render", *args), "render", "render: data/x.jsonl:2: invalid_json; fix the row, or set "
             "render.on_error: skip")
    assert not (tmp_path / "rendered").exists() and not (tmp_path / "render.json").exists()
    write_params(tmp_path, render={"on_error": "skip"})
    assert stage(tmp_path, "render", *args).returncode == 0  # skipped and counted
    assert json.loads((tmp_path / "render.json").read_text())["train"]["dropped"] == {"invalid_json": 1}
    write_params(tmp_path, render={"on_error": "ignore"})
    one_line(stage(tmp_path, "render", *args), "render", "render.on_error='ignore' must be fail or skip")


def test_pack_train_and_evaluate_name_their_missing_inputs(tmp_path):
    write_params(tmp_path)
    one_line(stage(tmp_path, "pack", "rendered", "base", "packed", "pack.json", "lengths"), "pack",
             "missing input rendered, base")
    one_line(stage(tmp_path, "train", "base", "packed", "sft", "reports/train", "ckpt", "adapter"), "train",
             "missing input base, packed")
    write_params(tmp_path, lr="fast")
    one_line(stage(tmp_path, "train", "base", "packed", "sft", "reports/train", "ckpt", "adapter"), "train",
             "lr='fast' must be a number (float)")
    write_params(tmp_path)
    args = ("base", "sft", "heldout.jsonl", "mc.jsonl", "suites", "dev", "curves", "metrics.json", "predictions",
            "figures", "eval.md")
    one_line(stage(tmp_path, "evaluate", *args), "evaluate", "missing input base, sft, heldout.jsonl, mc.jsonl, "
             "suites, dev, curves")


def test_publish_gate_and_offline_hub_are_one_line(tmp_path, tok):
    save_model(tiny_model(tok.get_vocab_size()), tok, str(tmp_path / "sft"))
    (tmp_path / "metrics.json").write_text(json.dumps({"sft": {"stopped": 0.25}}))
    write_params(tmp_path)
    one_line(stage(tmp_path, "publish", "sft", "metrics.json", "out"), "publish",
             "refusing to publish: sft.stopped = 0.250 is below publish.gate_min = 0.900")
    (tmp_path / "metrics.json").write_text(json.dumps({"sft": {"stopped": 1.0}}))
    write_params(tmp_path, publish={"repo_id": "me/model"})
    one_line(stage(tmp_path, "publish", "sft", "metrics.json", "out", env={"HF_TOKEN": "hf_x", "HF_HUB_OFFLINE": "1"}),
             "publish", "HF_HUB_OFFLINE is set, so nothing can be uploaded")
    assert (tmp_path / "out/model.safetensors").exists()  # the export is kept


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["stage", "x.jsonl"])

    def refuses(path):
        raise UserError(f"{path}:2: invalid_json; fix the row")

    with pytest.raises(SystemExit) as e:
        run_stage("render", refuses)
    assert e.value.code == 1 and capsys.readouterr().err == "render: x.jsonl:2: invalid_json; fix the row\n"

    def bug(path):
        return {}[path]

    with pytest.raises(KeyError):  # not a UserError: the traceback stays
        run_stage("render", bug)


def test_train_that_cannot_fit_the_device_stops_before_loading_the_model_naming_what_fits(tmp_path, tok):
    from tests.test_resume import make_workdir

    make_workdir(tmp_path, tok)
    good = (tmp_path / "base/model.safetensors").read_bytes()
    (tmp_path / "base/model.safetensors").write_bytes(b"not read")  # loading it would fail another way
    during = {"during_train": {"prompts": 0, "samples": 0}}
    write_params(tmp_path, train={"batch_size": 8, "max_steps": 2, "activation_checkpointing": False},
                 evaluate=during)
    args = ("base", "packed", "sft", "reports/train", "ckpt", "adapter")
    small = {"SFT_DEVICE_MEMORY": "4MiB"}  # the plan of this tiny run is ~5.1 MiB, most of it activations
    line = one_line(stage(tmp_path, "train", *args, env=small), "train", "training needs ~0.005 GiB per rank but "
                    "0.0039 GiB is free", "cheapest that fits: dvc exp run -S train.activation_checkpointing=true")
    assert "-S train.batch_size=4 -S train.grad_accum=2" in line
    assert not (tmp_path / "sft").exists()
    (tmp_path / "base/model.safetensors").write_bytes(good)
    write_params(tmp_path, train={"batch_size": 8, "max_steps": 2, "activation_checkpointing": True}, evaluate=during)
    done = stage(tmp_path, "train", *args, env=small)  # the advice taken: it runs
    assert done.returncode == 0, done.stderr
    assert "memory plan per rank" in done.stdout and (tmp_path / "sft/model.safetensors").is_file()
    metrics = json.loads((tmp_path / "reports/train/metrics.json").read_text())
    assert metrics["plan_total_gib"] <= 4 / 1024 and metrics["peak_memory_gib"] > 0


def test_base_pretraining_that_cannot_fit_stops_before_building_the_model(tmp_path, tok):
    """The base stage plans its pretraining as the train stage plans SFT: one line naming what would fit."""
    from pipeline.tokenizer import save_tokenizer

    save_tokenizer(tok, str(tmp_path / "tok"))
    (tmp_path / "corpus.jsonl").write_text('{"text": "The river Osk flows through Velmora."}\n' * 40)
    write_params(tmp_path, base={"block_size": 64, "pretrain": {"batch_size": 8, "max_steps": 2,
                                                                "activation_checkpointing": False}},
                 model={"n_layer": 2, "n_embd": 32, "n_head": 2, "n_kv_head": 1, "intermediate_size": 64})
    args = ("corpus.jsonl", "tok", "base", "reports/base", "ckpt")
    # planned: ~5.1 MiB, ~3.9 MiB with activation checkpointing
    line = one_line(stage(tmp_path, "base", *args, env={"SFT_DEVICE_MEMORY": "4.5MiB"}), "base",
                    "training needs ~", "cheapest that fits: dvc exp run -S base.pretrain.activation_checkpointing=true")
    assert "base.pretrain.activation_checkpointing=true" in line, line
    assert not (tmp_path / "base").exists() and not (tmp_path / "reports/base").exists()
