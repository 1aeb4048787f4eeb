"""Stage publish: fine-tuned model + metrics -> a self-contained folder with a model card; Hub upload if asked."""
import json

from pipeline.common import atomic_dir, print0, require_inputs, run_stage
from pipeline.config import PublishConfig, load_params, read_params
from pipeline.publish import check_gate, check_no_regression, export, push


def main(model: str, metrics: str, out: str, *data_files: str) -> None:
    cfg = load_params("publish", PublishConfig)
    require_inputs(model, metrics, *data_files)
    with open(metrics) as f:
        measured = json.load(f)
    check_gate(cfg, measured)
    check_no_regression(cfg, measured)
    with atomic_dir(out) as tmp:
        export(cfg, model, metrics, str(tmp), read_params(), list(data_files))
    print0(f"publish: {push(cfg, out)}")


if __name__ == "__main__":
    run_stage("publish", main)
