"""What fine-tuning cost, the evaluate stage's second half: the suites of evaluate.suites and the lm-eval tasks of
evaluate.harness.tasks, run on base and fine-tuned model alike -> one group per suite and a `harness` group in
metrics.json (n, 95% intervals, the paired difference), `regressions` (those whose sft − base interval lies wholly
below −evaluate.regression_margin), and every per-question score in predictions/{suites,harness}.parquet."""
import json
from pathlib import Path

from pipeline.common import UserError, setup_compute, write_json
from pipeline.config import EvaluateConfig
from pipeline.evaluate import write_parquet
from pipeline.harness import per_document, require_lm_eval, run_tasks, task_manager
from pipeline.backend import load_model
from pipeline.metrics import paired, regressed, summarize
from pipeline.suites import CHOICE_SCORES, EXACT_SCORES, read_suite, score_suite, split_shots, suite_files
from pipeline.tokenizer import load_tokenizer


def check_general(cfg: EvaluateConfig, suites: str, on_error: str) -> dict:
    """Before any model runs: every suite file reads (a bad row fails here, naming file:line) and lm-eval is
    installed when tasks are asked for. -> {suite name: (questions, rows left out by reason)}."""
    read = {name: read_suite(path, on_error) for name, path in suite_files(suites).items()}
    for name, (_, dropped) in read.items():
        if dropped:
            print(f"evaluate: suite {name}: {sum(dropped.values())} bad rows left out {dropped}")
    clash = sorted(set(read) & set(cfg.harness.tasks))
    if clash:
        raise UserError(f"{clash[0]} is both a suite (evaluate.suites) and a harness task; rename the suite file")
    if cfg.harness.tasks:
        require_lm_eval()
    return read


def compare(rows: dict[str, list[dict]], keys: tuple, n_boot: int, seed: int, prefix: str) -> dict:
    """{model: summary, sft_minus_base: paired difference} of per-question rows, when there are any."""
    if not next(iter(rows.values())):
        return {}
    out = {name: summarize(r, keys, n_boot, seed, prefix) for name, r in rows.items()}
    if len(rows) == 2:
        a, b = rows
        out[f"{b}_minus_{a}"] = paired(rows[a], rows[b], keys, n_boot, seed, prefix)
    return out


def merge(groups: list[dict]) -> dict:
    """Summaries of several kinds of question, model by model, in one group."""
    out: dict = {}
    for g in groups:
        for name, values in g.items():
            out.setdefault(name, {}).update(values)
    return out


def evaluate_suites(cfg: EvaluateConfig, models: dict[str, str], read: dict, compute, backend: str = "auto",
                    trust_remote_code: bool = False) -> tuple[dict, list[dict]]:
    """Each suite on each model (on base.backend) -> ({suite: {prompting, model: summary, sft_minus_base: ...}},
    rows)."""
    asked = {suite: split_shots(questions, cfg.fewshot, cfg.limit) for suite, (questions, _) in read.items()}
    rows: dict[str, dict] = {suite: {} for suite in read}
    for name, folder in models.items():  # each model loaded once, for every suite
        if not read:
            break
        model = load_model(folder, backend, trust_remote_code=trust_remote_code).to(compute.device)
        tok = load_tokenizer(folder)
        for suite, (shots, scored) in asked.items():
            rows[suite][name] = score_suite(model, tok, scored, shots, getattr(cfg.prompting, name),
                                            cfg.suite_max_new_tokens, cfg.batch_size, compute, suite, name)
        del model
    groups = {}
    for suite, per_model in rows.items():
        kinds = [({n: [x for x in r if x["kind"] == "choice"] for n, r in per_model.items()}, CHOICE_SCORES, "mc_"),
                 ({n: [x for x in r if x["kind"] == "exact"] for n, r in per_model.items()}, EXACT_SCORES, "exact_")]
        groups[suite] = {"prompting": {n: getattr(cfg.prompting, n) for n in models}} | merge(
            [compare(r, keys, cfg.n_boot, cfg.seed, prefix) for r, keys, prefix in kinds])
        dropped = read[suite][1]
        if dropped:
            groups[suite]["left_out"] = sum(dropped.values())
        print(f"evaluate: suite {suite}: " + "; ".join(
            f"{n} " + ", ".join(f"{k} {v:.3f}" for k, v in groups[suite][n].items()
                                if k in CHOICE_SCORES + EXACT_SCORES) for n in models))
    return groups, [r for per_model in rows.values() for rs in per_model.values() for r in rs]


def evaluate_harness(cfg: EvaluateConfig, models: dict[str, str], backend: str = "auto",
                     trust_remote_code: bool = False) -> tuple[dict, list[dict]]:
    """evaluate.harness.tasks on each model through our lm-eval model class -> ({prompting, task: {model: summary,
    sft_minus_base: ...}}, per-document rows). Scores are our means over lm-eval's per-document scores (for a group
    such as mmlu: over all its documents), with our bootstrap intervals and paired differences."""
    docs, manager = {}, task_manager(cfg)
    for name, folder in models.items():
        chat = getattr(cfg.prompting, name) == "chat"
        results = run_tasks(cfg, manager, folder, chat, backend, trust_remote_code)
        docs[name] = {task: per_document(results, task) for task in cfg.harness.tasks}
    group: dict = {"prompting": {n: "chat_template" if getattr(cfg.prompting, n) == "chat" else "plain"
                                 for n in models}}
    rows = []
    for task in cfg.harness.tasks:
        per_model = {name: docs[name][task] for name in models}
        first = next(iter(per_model.values()))  # the scores every document has (a group may mix tasks)
        keys = tuple(k for k in (first[0] if first else {})
                     if k not in ("task", "doc_id") and all(k in r for r in first))
        group[task] = compare(per_model, keys, cfg.n_boot, cfg.seed, "")
        rows += [{"harness_task": task, "model": name} | r for name, rs in per_model.items() for r in rs]
        print(f"evaluate: harness {task}: " + "; ".join(
            f"{n} " + ", ".join(f"{k} {group[task][n][k]:.3f}" for k in keys) for n in models if n in group[task]))
    return group, rows


def find_regressions(metrics: dict, suites: list[str], tasks: list[str], margin: float) -> dict:
    """{n: how many suites and tasks regressed, name: `key diff [lo, hi]; ...`} from their sft − base groups."""
    out: dict = {"n": 0}
    for name, group in [(s, metrics[s]) for s in suites] + [(t, metrics["harness"][t]) for t in tasks]:
        worse = regressed(group.get("sft_minus_base", {}), margin)
        if worse:
            out["n"] += 1
            out[name] = "; ".join(worse)
    return out


def evaluate_general(cfg: EvaluateConfig, models: dict[str, str], read: dict, metrics_path: str,
                     predictions_dir: str, backend: str = "auto", trust_remote_code: bool = False) -> dict:
    """Suites and harness tasks added to the metrics.json evaluate_pair wrote; rows to predictions_dir. The models
    run on base.backend (pipeline/backend.py)."""
    metrics = json.loads(Path(metrics_path).read_text())
    compute = setup_compute(cfg.device, cfg.dtype)
    groups, rows = evaluate_suites(cfg, models, read, compute, backend, trust_remote_code)
    metrics |= groups
    if cfg.harness.tasks:
        metrics["harness"], harness_rows = evaluate_harness(cfg, models, backend, trust_remote_code)
        write_parquet(f"{predictions_dir}/harness.parquet", harness_rows)
    metrics["regressions"] = find_regressions(metrics, list(groups), list(cfg.harness.tasks), cfg.regression_margin)
    if metrics["regressions"]["n"]:
        print(f"evaluate: REGRESSIONS beyond the margin {cfg.regression_margin}: "
              + " | ".join(f"{k}: {v}" for k, v in metrics["regressions"].items() if k != "n"))
    write_json(metrics_path, metrics)
    if rows:
        write_parquet(f"{predictions_dir}/suites.parquet", rows)
    return metrics
