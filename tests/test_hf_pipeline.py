"""The transformers backend through the real stages. One `dvc repro` (slow) on a Qwen3.5 checkpoint, the family
that shows most at once: transformers trains it (`auto`, and the start lines say why), its linear-attention layers
get one conversation per packed row (pack.json says so), and the published folder keeps its config, bf16 and
shards and loads in transformers. The train stage's work in-process for a mixture of experts with LoRA: its
load-balancing loss is logged apart from the loss, and the PEFT adapter is written."""
import json
import shutil

import pytest
import torch

from pipeline.backend import load_model, planner
from tests.test_hf_backend import hub_folder, theirs


@pytest.mark.slow
def test_short_sft_run_of_qwen3_5_through_the_real_stages(chatml_tok, tmp_path):
    import yaml

    from tests.conftest import ROOT, merge
    from tests.test_pipeline import TINY, run

    folder = hub_folder(tmp_path / "hub", "qwen3_5", chatml_tok.get_vocab_size(), tok=chatml_tok)
    repo = tmp_path / "repo"
    for part in ("pipeline", "stages"):
        shutil.copytree(ROOT / part, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    params = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), {
        "base": {"init_from": str(folder), "corpus_eval_rows": 4}, "pack": {"block_size": 128}, "lr": 1.0e-3,
        "train": {"max_steps": 2, "batch_size": 2, "max_shard_gb": 4.0e-5},  # 40 KB shards
        "evaluate": {"limit": 3, "max_new_tokens": 4, "multiple_choice": False,
                     "during_train": {"prompts": 2, "samples": 1}}})
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git init -q -b main && dvc init -q && git add -A && git commit -qm init", repo)
    out = run("dvc repro", repo)
    assert "backend transformers (model_type 'qwen3_5_text': the native port refuses it" in out
    assert "sft: memory plan per rank: weights" in out and "linear_attention layers carry state" in out
    pack = json.loads((repo / "reports/pack.json").read_text())
    assert pack["train"]["one_per_row"] and pack["train"]["rows"] == pack["train"]["packed"]
    published = repo / "publish/model"
    config = json.loads((published / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == original["model_type"] and config["architectures"] == original["architectures"]
    assert config["torch_dtype"] == "bfloat16" and len(list(published.glob("model-*-of-*.safetensors"))) > 2
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert metrics["sft"]["n"] == 3 and metrics["sft"]["dev_loss"] > 0
    ids = torch.randint(3, config["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(3))
    after = load_model(str(published))
    with torch.no_grad():
        torch.testing.assert_close(after.eval()(ids), theirs(published)(ids).logits, rtol=1e-4, atol=1e-4)


def test_lora_sft_of_a_mixture_of_experts_logs_its_load_balancing_loss_apart(chatml_tok, tmp_path):
    import dataclasses

    from pipeline.pack import save_packed
    from pipeline.sft import finetune
    from tests.conftest import config
    from tests.test_backend_contract import rows

    folder = hub_folder(tmp_path / "hub", "qwen3_moe", chatml_tok.get_vocab_size(), tok=chatml_tok)
    for split, seed in (("train", 0), ("dev", 1)):
        save_packed(rows(chatml_tok.get_vocab_size(), n=12, seed=seed), str(tmp_path / "packed" / split))
    cfg = config("train", max_steps=2, batch_size=2, save_every=0, eval_every=100, max_shard_gb=4.0e-5)
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=4))
    summary = finetune(cfg, config("evaluate").during_train, str(folder), str(tmp_path / "packed"),
                       str(tmp_path / "sft"), str(tmp_path / "live"), adapter_out=str(tmp_path / "adapter"))
    assert summary["router_aux_loss"] > 0 and summary["loss"] > 0
    logged = (tmp_path / "live/plots/metrics/router_aux_loss.tsv").read_text().splitlines()
    assert logged[0] == "step\trouter_aux_loss" and len(logged) == 3
    assert (tmp_path / "adapter/adapter_model.safetensors").is_file()
    merged, base = load_model(str(tmp_path / "sft")), load_model(str(folder))
    changed = [n for (n, a), b in zip(merged.named_parameters(), base.parameters()) if not torch.equal(a, b)]
    assert changed and all(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight"))
                           for n in changed)  # the experts are stacked tensors: not LoRA targets here


def test_exact_resume_on_the_transformers_backend(chatml_tok, tmp_path, capsys):
    """A run resumed from its step-4 checkpoint ends with the weights of a run never interrupted, bit for bit."""
    from pipeline.common import setup_compute
    from pipeline.train import train
    from tests.conftest import config
    from tests.test_backend_contract import rows

    folder = hub_folder(tmp_path / "hub", "gemma3", chatml_tok.get_vocab_size())
    data = rows(chatml_tok.get_vocab_size(), n=30)
    cfg = config("train", max_steps=6, batch_size=2, save_every=2, lr=1e-3, device="cpu", eval_every=100)
    plan_memory, shape = planner(str(folder), "auto")
    plan = plan_memory(shape, cfg, 64, 1, "cpu", False)
    whole = load_model(str(folder))
    train(cfg, whole, setup_compute("cpu", "float32"), data, None, ckpt_dir=str(tmp_path / "ckpt"), plan=plan)
    resumed = load_model(str(folder))
    train(cfg, resumed, setup_compute("cpu", "float32"), data, None, ckpt_dir=str(tmp_path / "ckpt"), plan=plan)
    assert "resuming from" in capsys.readouterr().out
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_fsdp_on_two_ranks_on_the_transformers_backend_follows_one_process(tmp_path, tok, monkeypatch):
    """The train stage under torchrun, parallel: fsdp, the decoder layers as FSDP2 units, with activation
    checkpointing: the same weights as one process with twice the batch."""
    import tests.test_resume as resume
    from tests.test_fsdp import SHORT, assert_close, weights
    from tests.test_resume import finish, make_workdir, stage

    real = resume.write_params
    monkeypatch.setattr(resume, "write_params", lambda folder, **kw: real(folder, base={"backend": "transformers"},
                                                                        **kw))
    workdir = make_workdir(tmp_path, tok)
    log = finish(stage(workdir, "one", SHORT))
    assert "sft: backend transformers (base.backend: transformers)" in log
    log = finish(stage(workdir, "fsdp", SHORT | {"nproc": 2, "batch_size": 4, "parallel": "fsdp",
                                                 "activation_checkpointing": True}))
    assert "launching 2 processes" in log and "(FSDP)" in log
    assert_close(weights(workdir, "fsdp"), weights(workdir, "one"))
