"""Stage evaluate: base and fine-tuned models on held-out conversations and multiple-choice questions ->
metrics.json (grouped base/sft, intervals, paired difference), predictions (parquet), pictures and a report."""
import sys

from pipeline.common import load_params
from pipeline.evaluate import EvaluateConfig, evaluate_pair
from pipeline.report import make_report


def main(base: str, sft: str, heldout: str, mc: str, dev: str, curves: str, metrics: str, predictions: str,
         figures: str, report: str) -> None:
    cfg = load_params("evaluate", EvaluateConfig)
    evaluate_pair(cfg, {"base": base, "sft": sft}, heldout, mc, dev, metrics, predictions)
    make_report(metrics, predictions, curves, figures, report, cfg.n_report)


if __name__ == "__main__":
    main(*sys.argv[1:])
