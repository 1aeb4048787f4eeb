"""Pictures and the Markdown report of the evaluate stage (PNG, offline): training curves (loss, dev loss, lr,
and the generation metrics logged during training) from DVCLive's TSV files, base-vs-SFT metric bars with their
bootstrap 95% intervals, regressions first, the general-ability suites and harness tasks, and held-out prompts
answered by both models side by side."""
import csv
import json
from pathlib import Path

import matplotlib
import pyarrow.parquet as pq

from pipeline.metrics import NOT_RATES, cell, measured

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_tsv(path: Path) -> tuple[list[float], list[float]]:
    """A DVCLive plot file (`step<TAB>name` header, one row per logged step) -> (steps, values)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    return [float(r[0]) for r in rows], [float(r[1]) for r in rows]


def plot_training(curves_dir: str, out_png: str) -> list[str]:
    """Loss with dev loss, learning rate, and the gen_* rates if logged; returns the curves drawn."""
    curves = {p.stem: read_tsv(p) for p in sorted(Path(curves_dir).glob("*.tsv"))}
    if "loss" not in curves:
        raise FileNotFoundError(f"{curves_dir}: no loss.tsv (the training curves of the train stage)")
    gen = [k for k in curves if k.startswith("gen_")]
    fig, axes = plt.subplots(1, 3 if gen else 2, figsize=(15 if gen else 10, 3.8))
    axes[0].plot(*curves["loss"], label="train loss", lw=1)
    if "dev_loss" in curves:
        axes[0].plot(*curves["dev_loss"], "o-", label="dev loss", ms=3)
    axes[0].set(xlabel="step", ylabel="loss (nats per trained token)", yscale="log", title="loss")
    axes[0].legend()
    if "lr" in curves:
        axes[1].plot(*curves["lr"])
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    for k in gen:
        axes[2].plot(*curves[k], "o-", ms=3, label=k.removeprefix("gen_"))
    if gen:
        axes[2].set(xlabel="step", ylabel="rate on dev prompts", ylim=(-0.02, 1.02), title="generation during training")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return list(curves)


def plot_metrics(metrics: dict, out_png: str, models=("base", "sft")) -> None:
    """Grouped bars per metric, one per model, with the bootstrap 95% interval as error bars."""
    keys = [k for k in measured(metrics[models[0]]) if k not in NOT_RATES and all(k in metrics[m] for m in models)]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(models)
    for j, m in enumerate(models):
        x = [i + (j - (len(models) - 1) / 2) * width for i in range(len(keys))]
        mean = [metrics[m][k] for k in keys]
        err = [[mu - metrics[m][f"{k}_lo"] for k, mu in zip(keys, mean)],
               [metrics[m][f"{k}_hi"] - mu for k, mu in zip(keys, mean)]]
        n = metrics[m]["n"]
        mc = f", mc n={metrics[m]['mc_n']}" if "mc_n" in metrics[m] else ""
        ax.bar(x, mean, width, yerr=err, capsize=3, label=f"{m} (n={n}{mc})")
    ax.set_xticks(range(len(keys)), keys)
    ax.set(ylim=(0, 1.05), ylabel="rate (95% bootstrap interval)", title="held-out evaluation: base vs SFT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def metrics_table(metrics: dict, models=("base", "sft")) -> str:
    """Markdown: one row per metric, one column per model plus the paired difference, intervals in brackets."""
    diff = f"{models[1]}_minus_{models[0]}"
    head = ["metric", *models, f"{models[1]} − {models[0]} (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key in measured(metrics[models[0]]):
        lines.append("| " + " | ".join([key, *(cell(metrics[m], key) for m in models),
                                        cell(metrics.get(diff, {}), key)]) + " |")
    return "\n".join(lines)


def judge_line(metrics: dict, models=("base", "sft")) -> str:
    """The judge's verdict in one paragraph, when there was a judge (evaluate.judge.model)."""
    j = metrics.get(f"{models[1]}_minus_{models[0]}", {})
    if "judge_win_rate" not in j:
        return ""
    return (f"\nJudge (`evaluate.judge.model`, both orders): {models[1]} win rate {cell(j, 'judge_win_rate')} over "
            f"{j['judge_n']} prompts: {j['judge_wins']} wins, {j['judge_ties']} ties, {j['judge_losses']} losses "
            "(0.5: no better than the base).\n")


def regressions_block(metrics: dict) -> str:
    """What fine-tuning broke, first in the report: the suites and harness tasks whose sft − base interval lies
    wholly below −evaluate.regression_margin (the evaluate stage's `regressions`)."""
    found = metrics.get("regressions")
    if found is None:
        return ""
    if not found.get("n"):
        return "\n**Regressions: none.** No suite or harness task got worse beyond its interval and the margin.\n"
    items = "\n".join(f"- **{name}**: {what}" for name, what in found.items() if name != "n")
    return (f"\n## ⚠ Regressions: {found['n']}\n\nSuites and harness tasks whose sft − base paired difference lies "
            f"wholly below −evaluate.regression_margin (score, difference [95% interval]):\n\n{items}\n")


def group_table(group: dict, models=("base", "sft")) -> str:
    """One suite or harness task: a row per score, a column per model and the paired difference."""
    diff = f"{models[1]}_minus_{models[0]}"
    keys = [k for k, v in group.get(models[0], {}).items() if not k.endswith(("_lo", "_hi"))]
    head = ["score", *models, f"{models[1]} − {models[0]} (paired)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([k, *(cell(group.get(m, {}), k) for m in models), cell(group.get(diff, {}), k)])
              + " |" for k in keys]
    return "\n".join(lines)


def general_section(metrics: dict, models=("base", "sft")) -> str:
    """The suites (groups with a `prompting` entry) and the harness tasks, one table each."""
    suites = [k for k, v in metrics.items() if isinstance(v, dict) and "prompting" in v and k != "harness"]
    harness = {k: v for k, v in metrics.get("harness", {}).items() if k != "prompting"}
    if not suites and not harness:
        return ""
    parts = ["## General ability: suites and harness tasks\n\nWhat fine-tuning may have cost: the same questions "
             "for both models. Suites (`evaluate.suites`): `acc` is the choice of highest summed log-likelihood, "
             "`acc_norm` the same per byte of each choice, `letter_acc` the letter the model writes when the options "
             "are listed, `exact_acc` the final answer extracted from what it writes (after `####`, else the last "
             "number); `mc_n` and `exact_n` count the questions."]
    for name in suites:
        how = ", ".join(f"{m} {p}" for m, p in metrics[name]["prompting"].items())
        parts.append(f"### Suite `{name}` (prompted: {how})\n\n{group_table(metrics[name], models)}")
    for name, group in harness.items():
        how = ", ".join(f"{m} {p}" for m, p in metrics["harness"].get("prompting", {}).items())
        parts.append(f"### lm-eval task `{name}` (prompted: {how})\n\n{group_table(group, models)}")
    return "\n\n".join(parts) + "\n"


def excerpt(text: str, chars: int = 300) -> str:
    """One line of at most `chars` characters: a long answer's beginning, `…` where it was cut."""
    line = " ".join(text.split())
    return line if len(line) <= chars else line[: chars - 1] + "…"


def side_by_side(generation: list[dict], n: int, models=("base", "sft"), kind: str = "short") -> str:
    by_model = {m: [r for r in generation if r["model"] == m] for m in models}
    blocks = []
    for i in range(min(n, len(by_model[models[0]]))):
        first = by_model[models[0]][i]
        lines = [f"**{i + 1}. {excerpt(first['prompt'])}** (gold: {excerpt(first['gold'])})", ""]
        for m in models:
            r = by_model[m][i]
            if kind == "long":
                verdict = f"ROUGE-L {r['rougeL']:.2f}, chrF {r['chrf']:.2f}, answer loss {r['answer_loss']:.2f}"
            else:
                verdict = "contains the answer" if r["contains_answer"] else "does not contain the answer"
            lines.append(f"- {m}: {excerpt(r['output'])!r} ({verdict}{'' if r['stopped'] else ', did not stop'})")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def write_report(metrics: dict, generation: list[dict], figures: dict[str, str], out_md: str, n: int) -> None:
    """The Markdown report: the before/after table, the pictures (paths relative to the report), examples."""
    root = Path(out_md).parent
    pictures = "\n\n".join(f"![{name}]({Path(p).relative_to(root)})" for name, p in figures.items())
    kind = metrics.get("answers", "short")
    scores = ("Long answers (`evaluate.answers`): `rougeL` (ROUGE-L F1), `chrf` (chrF, 0-1), `token_f1` (shared "
              "words) against the gold answer, `length_ratio` (output / gold characters)." if kind == "long" else
              "Short answers (`evaluate.answers`): `exact_match` and `contains_answer` after normalising (SPEC §5), "
              "`length_ok` (at most 3x the gold words).")
    mc = (" `mc_accuracy` is the multiple-choice accuracy from the option letters' scores at the answer position "
          "(`mc_n` questions)." if "mc_n" in metrics.get("base", {}) else "")
    Path(out_md).write_text(f"""# Evaluation: base vs SFT
{regressions_block(metrics)}
Same harness for both models (SPEC §5): greedy decoding with the chat template, stopping at the format's end
token. Every score is a mean over examples with its bootstrap 95% interval in brackets; the last column is the
SFT−base difference on the same examples with a paired bootstrap interval. {scores} `stopped`: the answer ended
with the end token within its budget; `distinct3`: unique word trigrams; `answer_loss`: the mean loss (nats per
token) of each gold answer given its conversation, lower is better.{mc}

{metrics_table(metrics)}
{judge_line(metrics)}
{pictures}

{general_section(metrics)}
## Fixed held-out prompts, answered by both models

{side_by_side(generation, n, kind=metrics.get("answers", "short"))}
""")


def make_report(metrics_path: str, predictions_dir: str, curves_dir: str, figures_dir: str, report_md: str,
                n_report: int) -> dict[str, str]:
    """From the evaluate stage's outputs: figures_dir/{training,metrics}.png and the Markdown report."""
    metrics = json.loads(Path(metrics_path).read_text())
    Path(figures_dir).mkdir(parents=True, exist_ok=True)
    figures = {"training curves": f"{figures_dir}/training.png", "base vs SFT": f"{figures_dir}/metrics.png"}
    plot_training(curves_dir, figures["training curves"])
    plot_metrics(metrics, figures["base vs SFT"])
    generation = pq.read_table(f"{predictions_dir}/generation.parquet").to_pylist()
    write_report(metrics, generation, figures, report_md, n_report)
    return figures
