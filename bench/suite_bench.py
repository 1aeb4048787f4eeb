"""Multiple-choice scoring speed: a suite of N questions (4 choices each) scored by the log-likelihood of every
choice, with the chat template, on one exported ~100M model folder (random weights: speed does not depend on them):
ours (pipeline/suites.py, what the evaluate stage runs), our lm-eval model class through lm-eval, and lm-eval's own
`hf` model class, in one run. Accuracies must agree (the same scores up to float noise). Usage:

    python bench/suite_bench.py [--questions 1000] [--batch-size 32] [--threads N] [--out /tmp/suite_bench]
                                [--order ours,lm-eval,hf]   (repeat names to interleave runs on a busy machine)
"""
import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere: the project root

from pipeline.common import setup_compute  # noqa: E402
from pipeline.hf import save_model  # noqa: E402
from pipeline.model import Architecture, Transformer  # noqa: E402
from pipeline.suites import context, encode_pair, encoder, loglikelihoods, read_suite  # noqa: E402
from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer  # noqa: E402

WORDS = ("river town mayor baker potter weaver smith miller fisher salt glass cheese copper paper honey timber silk "
         "wine iron amber rope lace tea red blue green yellow orange purple white black grey brown north south east "
         "west old new small large").split()
TASK = """task: bench_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def make_folder(out: Path, questions: int) -> tuple[str, Path]:
    """A ~113M Llama-shaped model (12 layers, width 768, SwiGLU 3072, vocabulary 8192) with a tokenizer trained on
    the suite's words, and the suite file (questions of 8-20 words, choices of 1-3 words)."""
    rng = random.Random(0)
    rows = [{"question": f"Question {i}: " + " ".join(rng.choices(WORDS, k=rng.randint(8, 20))) + "?",
             "choices": [" ".join(rng.choices(WORDS, k=rng.randint(1, 3))) for _ in range(4)],
             "answer": rng.randrange(4)} for i in range(questions)]
    out.mkdir(parents=True, exist_ok=True)
    suite = out / "bench.jsonl"
    suite.write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["question"] + " " + " ".join(r["choices"]) for r in rows] * 4
    save_tokenizer(train_tokenizer(texts, 8192), str(out / "tok"))
    tok = load_tokenizer(str(out / "tok"))
    arch = Architecture(n_layer=12, n_embd=768, n_head=12, n_kv_head=12, head_dim=64, intermediate_size=3072,
                        max_seq_len=1024, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=True, init_std=0.02,
                        vocab_size=tok.get_vocab_size())
    torch.manual_seed(0)
    model = Transformer(arch)
    model.init_weights(0)
    save_model(model, tok, str(out / "model"))
    (out / "task.yaml").write_text(TASK.format(data=suite))
    return str(out / "model"), suite


def ours(folder: str, suite: Path, batch_size: int) -> float:
    from pipeline.hf import load_model

    model, tok = load_model(folder).eval(), load_tokenizer(folder)
    questions, _ = read_suite(suite, "fail")
    encode, right = encoder(tok, "chat"), 0
    pairs, first = [], []
    for q in questions:
        ctx = context(q, "choice", [], "chat", tok)
        first.append(len(pairs))
        pairs += [encode_pair(encode, ctx, c) for c in q.choices]
    scores = loglikelihoods(model, pairs, batch_size, setup_compute("cpu", "float32"))
    for q, k in zip(questions, first):
        lls = [s for s, _ in scores[k : k + len(q.choices)]]
        right += lls.index(max(lls)) == q.gold
    return right / len(questions)


def harness(model, args, out: Path, batch_size: int) -> float:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(out), include_defaults=False)
    res = simple_evaluate(model=model, model_args=args, tasks=["bench_mc"], device="cpu", batch_size=batch_size,
                          apply_chat_template=True, task_manager=manager, bootstrap_iters=0, log_samples=False)
    return res["results"]["bench_mc"]["acc,none"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default="/tmp/suite_bench")
    p.add_argument("--order", default="ours,lm-eval,hf")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    out = Path(a.out)
    folder, suite = make_folder(out, a.questions)
    from pipeline.harness import model_class

    runs = {"ours": ("ours (pipeline/suites.py)", lambda: ours(folder, suite, a.batch_size)),
            "lm-eval": ("ours through lm-eval (PipelineLM)",
                        lambda: harness(model_class()(folder, batch_size=a.batch_size), None, out, a.batch_size)),
            "hf": ("lm-eval hf", lambda: harness("hf", f"pretrained={folder}", out, a.batch_size))}
    print(f"# {a.questions} questions x 4 choices, batch {a.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    times: dict[str, list[float]] = {}
    for key in a.order.split(","):
        name, fn = runs[key]
        start = time.perf_counter()
        acc = fn()
        took = time.perf_counter() - start
        times.setdefault(name, []).append(took)
        print(f"{name}: {took:.1f} s, {a.questions / took:.1f} questions/s, accuracy {acc:.3f}", flush=True)
    hf = min(times["lm-eval hf"]) if "lm-eval hf" in times else None
    for name, t in times.items():
        print(f"{name}: best {min(t):.1f} s" + (f", {hf / min(t):.2f}x lm-eval hf" if hf else ""))


if __name__ == "__main__":
    main()
