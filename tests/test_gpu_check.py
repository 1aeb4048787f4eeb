"""bench/gpu_check.py, the one-command check of the CUDA path, runs its CPU subset here (in `make test` and CI) the
way a GPU machine runs it, `make gpu-check PYTHON=<its own python>`: no venv made, nothing installed, and none of the
packages such a machine lacks imported (they are blocked). Every check that can run on the CPU passes, the CUDA-only
ones say SKIP; and a check can fail: a FlexAttention mask that lets conversations see each other fails."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

# what this project installs that a GPU machine's own Python does not have (it has torch, triton, numpy, pyyaml,
# pyarrow, tqdm, safetensors, tokenizers, jinja2, transformers, peft)
MISSING_ON_GPU_MACHINE = ("dvc", "dvc_s3", "dvclive", "wandb", "gguf", "rouge_score", "matplotlib", "sacrebleu",
                          "psutil", "moto", "accelerate", "bitsandbytes")
BLOCKER = f'''import sys

class Blocker:  # a GPU machine's Python: these packages are not installed
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {MISSING_ON_GPU_MACHINE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)

sys.meta_path.insert(0, Blocker())
'''
CPU = ["compiled-blocks", "attention-dtypes", "flex-vs-sdpa-bf16", "generation-without-recompiles", "ddp-resume",
       "fsdp-vs-one"]
CUDA_ONLY = ["speed-124m", "fused-adamw", "lora-bf16-base", "qlora-8bit-offload"]


@pytest.mark.slow
def test_make_gpu_check_runs_its_cpu_subset_with_the_given_python_and_nothing_else(tmp_path):
    for name in ("Makefile", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path)
    for name in ("pipeline", "bench"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "blocker").mkdir()
    (tmp_path / "blocker/sitecustomize.py").write_text(BLOCKER)
    env = os.environ | {"PYTHONPATH": str(tmp_path / "blocker"), "PIP_NO_INDEX": "1"}
    blocked = subprocess.run([sys.executable, "-c", "import dvclive"], env=env, capture_output=True, text=True)
    assert blocked.returncode == 1 and "(blocked)" in blocked.stderr  # the blocker works
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["make", "gpu-check", f"PYTHON={sys.executable}", f"GPU_CHECK_ARGS=--json {out}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "imports torch: no venv, nothing installed" in proc.stdout and not (tmp_path / ".venv").exists()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    verdicts = {line["check"]: line["verdict"] for line in lines}
    assert list(verdicts) == [line.split()[1].rstrip(":") for line in proc.stdout.splitlines()
                              if line.startswith(("PASS ", "SKIP "))]  # one JSON line per check, in order
    if torch.cuda.is_available():  # on a GPU machine every check runs (ddp and fsdp need two GPUs)
        assert all(v == "PASS" or (v == "SKIP" and k in ("ddp-resume", "fsdp-vs-one")) for k, v in verdicts.items()), \
            proc.stdout
        return
    assert verdicts == {**dict.fromkeys(CPU, "PASS"), **dict.fromkeys(CUDA_ONLY, "SKIP")}, proc.stdout
    figures = {line["check"]: line for line in lines}
    # the comparisons are made where they can fail: a broken document mask moves the logits far beyond the tolerance
    assert figures["compiled-blocks"]["gap_logits"] < 0.1 < 5 * 0.1 < figures["compiled-blocks"]["broken_mask_logits"]
    assert figures["ddp-resume"]["weights_gap"] < 1e-6 and figures["fsdp-vs-one"]["grad_norm_gap"] < 1e-4
    assert "q/k/v bf16" in proc.stdout and "none added on the second step" in proc.stdout


@pytest.mark.filterwarnings("ignore:flex_attention called without")
def test_a_flex_mask_that_lets_conversations_see_each_other_fails_the_check(monkeypatch):
    import bench.gpu_check as gc

    if not gc.CUDA:  # eager FlexAttention, forward only, as the CPU subset runs it
        monkeypatch.setattr(gc.model_module, "_flex_compiled", gc.model_module.flex_attention)
    gc.model_module.enable_flex()
    right = gc.model_module.flex_block_mask
    gc.flex_vs_sdpa()
    monkeypatch.setattr(gc.model_module, "flex_block_mask", lambda doc, window=0: right(torch.where(doc >= 0, 0, -1)))
    with pytest.raises(AssertionError, match="logits differ by"):
        gc.flex_vs_sdpa()
