"""bench/gpu_check.py, the one-command check of the CUDA path, runs its CPU subset here (in `make test` and CI), so
it cannot rot before a GPU runs it: every check that can run on the CPU passes, the CUDA-only ones say SKIP."""
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT


@pytest.mark.slow
def test_gpu_check_runs_its_cpu_subset():
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    verdicts = {line.split()[1].rstrip(":"): line.split()[0] for line in lines[1:]}
    cpu = ["attention-dtypes", "flex-vs-sdpa-bf16", "compiled-blocks", "generation-without-recompiles"]
    cuda_only = ["fused-adamw", "bench-124m", "lora-bf16-base", "qlora-8bit-offload", "ddp-2gpu-resume", "fsdp-2gpu"]
    if torch.cuda.is_available():  # on a GPU machine the whole list runs (ddp and fsdp need two GPUs)
        assert all(verdicts[name] == "PASS" for name in cpu + cuda_only[:4]), proc.stdout
        return
    assert verdicts == {**dict.fromkeys(cpu, "PASS"), **dict.fromkeys(cuda_only, "SKIP")}, proc.stdout
    assert "q/k/v bf16" in proc.stdout and "none added" in proc.stdout
