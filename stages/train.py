"""Stage train: base model + packed data -> fine-tuned model folder (LoRA: merged) and the LoRA adapter folder,
training curves in DVCLive.
The resume checkpoint folder (last argument) is no DVC out: a rerun after a crash continues from it.
It first takes free GPUs of its own (pipeline/gpus.py): train.nproc > 1 takes that many and reruns this script
under torchrun; started by torchrun (RANK set), it is one rank of the run."""
import sys

from pipeline.common import require_inputs, run_stage
from pipeline.config import BaseConfig, DuringTrainConfig, SftConfig, load_params
from pipeline.distributed import launch, output_dir
from pipeline.gpus import claim_gpus
from pipeline.sft import finetune


def main(base: str, packed: str, out: str, live_dir: str, ckpt_dir: str, adapter_out: str) -> None:
    cfg, during = load_params("train", SftConfig), load_params("evaluate.during_train", DuringTrainConfig)
    source = load_params("base", BaseConfig)  # base.backend and base.trust_remote_code
    require_inputs(base, packed)
    claim_gpus("train", cfg.device, cfg.nproc)  # GPUs of its own, before CUDA starts; torchrun ranks inherit them
    if launch(cfg.nproc, "stages.train", sys.argv[1:]):
        return
    # rank 0: sibling temp dirs that replace `out` and `adapter_out` on success
    with output_dir(out) as tmp, output_dir(adapter_out) as adapter_tmp:
        finetune(cfg, during, base, packed, tmp, live_dir, ckpt_dir, adapter_tmp, source.backend,
                 source.trust_remote_code)


if __name__ == "__main__":
    run_stage("train", main)
