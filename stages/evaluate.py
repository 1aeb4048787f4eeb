"""Stage evaluate: base and fine-tuned models on held-out conversations, multiple-choice questions, general-ability
suites (and lm-eval tasks if asked for) -> metrics.json (grouped base/sft, intervals, paired difference, regressions),
predictions (parquet), pictures and a report."""
from pipeline.common import require_inputs, run_stage
from pipeline.config import BaseConfig, EvaluateConfig, RenderConfig, load_params
from pipeline.evaluate import evaluate_pair
from pipeline.general import check_general, evaluate_general
from pipeline.gpus import claim_gpus
from pipeline.report import make_report


def main(base: str, sft: str, heldout: str, mc: str, suites: str, dev: str, curves: str, metrics: str,
         predictions: str, figures: str, report: str) -> None:
    cfg = load_params("evaluate", EvaluateConfig)
    on_error = load_params("render", RenderConfig).on_error  # bad held-out rows: as the render stage treats them
    source = load_params("base", BaseConfig)  # base.backend and base.trust_remote_code
    require_inputs(base, sft, heldout, mc, suites, dev, curves)
    read = check_general(cfg, suites, on_error)  # a bad suite row or a missing lm-eval fails before any model runs
    claim_gpus("evaluate", cfg.device, 1)  # a free GPU of its own, before CUDA starts
    models = {"base": base, "sft": sft}
    evaluate_pair(cfg, models, heldout, mc, dev, metrics, predictions, on_error, source.backend,
                  source.trust_remote_code)
    evaluate_general(cfg, models, read, metrics, predictions, source.backend, source.trust_remote_code)
    make_report(metrics, predictions, curves, figures, report, cfg.n_report)


if __name__ == "__main__":
    run_stage("evaluate", main)
