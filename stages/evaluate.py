"""Stage evaluate: base and fine-tuned models on held-out conversations -> metrics.json (grouped base/sft)
and per-example predictions."""
import sys

from pipeline.common import load_params
from pipeline.evaluate import EvaluateConfig, evaluate_pair


def main(base: str, sft: str, heldout: str, dev: str, metrics: str, predictions: str) -> None:
    cfg = load_params("evaluate", EvaluateConfig)
    evaluate_pair(cfg, {"base": base, "sft": sft}, heldout, dev, metrics, predictions)


if __name__ == "__main__":
    main(*sys.argv[1:])
