"""Compare two experiments example by example: `python -m pipeline.compare A.parquet B.parquet [--model sft]`
reads two predictions/generation.parquet files (say from two `dvc exp` runs or git revisions), pairs the rows
by example, and prints B − A per metric with a paired bootstrap 95% interval, then the examples that changed."""
import argparse

import pyarrow.parquet as pq

from pipeline.common import UserError, one_line_errors
from pipeline.metrics import RATES, paired


def load_rows(path: str, model: str) -> list[dict]:
    rows = [r for r in pq.read_table(path).to_pylist() if r["model"] == model]
    if not rows:
        raise UserError(f"{path}: no predictions of model {model!r}; use --model base or sft")
    return sorted(rows, key=lambda r: r["example"])


def compare(a_path: str, b_path: str, model: str = "sft", n_boot: int = 1000, seed: int = 0) -> tuple[dict, list]:
    """(paired B − A summary, [(A row, B row) whose contains_answer differs]) over the same examples."""
    a, b = load_rows(a_path, model), load_rows(b_path, model)
    if [(r["example"], r["prompt"], r["gold"]) for r in a] != [(r["example"], r["prompt"], r["gold"]) for r in b]:
        raise UserError("the two files do not hold the same examples (prompt and gold per example); "
                         "compare runs on the same held-out data")
    changed = [(ra, rb) for ra, rb in zip(a, b) if ra["contains_answer"] != rb["contains_answer"]]
    return paired(a, b, RATES, n_boot, seed), changed


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m pipeline.compare", description=__doc__.split("\n")[0])
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--model", default="sft", help="which model's rows to compare (base | sft)")
    ap.add_argument("--show", type=int, default=10, help="changed examples to print")
    args = ap.parse_args(argv)
    summary, changed = compare(args.a, args.b, args.model)
    print(f"n = {summary['n']} examples, B − A with a paired bootstrap 95% interval:")
    for key in RATES:
        print(f"  {key:16s} {summary[key]:+.3f} [{summary[key + '_lo']:+.3f}, {summary[key + '_hi']:+.3f}]  "
              f"better in {summary[key + '_wins']}, worse in {summary[key + '_losses']}")
    for ra, rb in changed[: args.show]:
        print(f"\n#{ra['example']} {ra['prompt']!r} (gold {ra['gold']!r})\n  A: {ra['output'][:120]!r}\n"
              f"  B: {rb['output'][:120]!r}")


if __name__ == "__main__":
    with one_line_errors("compare"):
        main()
