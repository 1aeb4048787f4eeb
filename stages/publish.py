"""Stage publish: fine-tuned model + metrics -> a self-contained folder with a model card; Hub upload if asked."""
import json
import sys

import yaml

from pipeline.common import atomic_dir, load_params, print0
from pipeline.publish import PublishConfig, check_gate, export, push


def main(model: str, metrics: str, out: str, *data_files: str) -> None:
    cfg = load_params("publish", PublishConfig)
    with open(metrics) as f:
        check_gate(cfg, json.load(f))
    with open("params.yaml") as f:
        params = yaml.safe_load(f)
    with atomic_dir(out) as tmp:
        export(cfg, model, metrics, str(tmp), params, list(data_files))
    print0(f"publish: {push(cfg, out)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
