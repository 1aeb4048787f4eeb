"""lm-evaluation-harness tasks through this project's model code: an lm-eval model class of ours (log-likelihoods
batched as the suites score them, generation by pipeline/generate.py, the model's chat template when asked for), and
the evaluate stage's run of named tasks on base and fine-tuned model -> per-document scores for the paired
comparison. lm-eval is optional: it is imported only when a task is asked for."""
import functools
import importlib.util
import logging
import sys
from pathlib import Path

from tqdm import tqdm

from pipeline.common import UserError, setup_compute
from pipeline.config import EvaluateConfig
from pipeline.generate import GREEDY, Sampling, generate
from pipeline.backend import load_model
from pipeline.suites import loglikelihoods
from pipeline.template import chat_format, layout, render_text, text_tokenizer
from pipeline.template import chat_template as jinja_template
from pipeline.tokenizer import load_tokenizer

LM_EVAL = "lm-eval==0.4.13"  # the version the tests run (requirements-test.txt)


def require_lm_eval() -> None:
    """One line saying what to install when lm-eval is missing."""
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError(f"evaluate.harness.tasks asks for lm-evaluation-harness tasks, but lm-eval is not installed; "
                        f"run `pip install {LM_EVAL}` (or empty evaluate.harness.tasks)")


@functools.cache
def model_class():
    """PipelineLM, our lm_eval.api.model.TemplateLM (defined on first use, so that lm-eval stays optional)."""
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class PipelineLM(TemplateLM):
        """A model folder as lm-eval sees a model: text in, log-likelihoods and generated text out. Text is read as
        transformers' tokenizer reads it (special tokens the chat template writes are parsed), so that a task scores
        the same tokens here as with lm-eval's own `hf` model class; apply_chat_template renders with the model's chat
        format (the template exported with it)."""

        def __init__(self, pretrained: str, batch_size: int | str = 32, device: str = "cpu", dtype: str = "auto",
                     max_gen_toks: int = 256, backend: str = "auto", trust_remote_code: bool = False, **_):
            super().__init__()
            self.folder = str(pretrained)
            self.compute = setup_compute("auto" if device in (None, "auto") else str(device).split(":")[0], dtype)
            self.model = load_model(self.folder, backend, trust_remote_code=trust_remote_code)
            self.model = self.model.to(self.compute.device).eval()
            self.tok = load_tokenizer(self.folder)
            self.parsing = text_tokenizer(self.tok)
            self.fmt = chat_format(self.tok)
            self.ends = layout(self.tok).ends
            self.batch = int(batch_size) if str(batch_size).isdigit() else 32
            self.max_gen_toks = int(max_gen_toks)
            bos = self.parsing.encode("", add_special_tokens=True).ids  # what the tokenizer adds itself, if anything
            self.bos = bos[0] if bos else None

        @property
        def eot_token_id(self) -> int:
            return self.ends[0]

        @property
        def prefix_token_id(self) -> int:
            return self.bos if self.bos is not None else self.eot_token_id

        @property
        def max_length(self) -> int:
            return self.model.arch.max_seq_len

        @property
        def tokenizer_name(self) -> str:
            return self.folder.replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return jinja_template(self.fmt) if chat_template else None

        def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
            if add_generation_prompt:
                return render_text(chat_history, add_generation_prompt=True, fmt=self.fmt)
            *before, last = chat_history  # continue the last (assistant) message: its header, then its text so far
            return render_text(before, add_generation_prompt=True, fmt=self.fmt) + last["content"]

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **_) -> list[int]:
            if add_special_tokens is None:  # as transformers: the tokenizer's own additions, unless already there
                bos = self.bos is not None and string.startswith(self.parsing.id_to_token(self.bos))
                add_special_tokens = not bos
            return self.parsing.encode(string, add_special_tokens=add_special_tokens).ids

        def tok_decode(self, ids: list[int]) -> str:
            return self.tok.decode(ids)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **_) -> list[tuple[float, bool]]:
            results = loglikelihoods(self.model, [(c, x) for _, c, x in requests], self.batch, self.compute)
            for (strings, _, _), answer in zip(requests, results):
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owner = [], []
            for k, (string,) in enumerate(r.args for r in requests):
                for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append((ctx, cont))
                    owner.append(k)
            scores = loglikelihoods(self.model, windows, self.batch, self.compute)
            totals = [0.0] * len(requests)
            for k, (score, _) in zip(owner, scores):
                totals[k] += score
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list = [None] * len(requests)
            groups: dict[str, list[int]] = {}
            for i, r in enumerate(requests):  # one decoding setting per group
                groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
            for idx in groups.values():
                kwargs = dict(requests[idx[0]].args[1])
                until = kwargs.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                budget = int(kwargs.get("max_gen_toks") or kwargs.get("max_new_tokens") or self.max_gen_toks)
                sampling = GREEDY if not kwargs.get("do_sample") or not kwargs.get("temperature") else Sampling(
                    float(kwargs["temperature"]), int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
                room = max(1, self.max_length - budget)  # the prompt keeps its last tokens, as lm-eval's hf class
                prompts = [self.tok_encode(requests[i].args[0])[-room:] for i in idx]
                order = sorted(range(len(idx)), key=lambda j: len(prompts[j]))
                for start in tqdm(range(0, len(order), self.batch), desc="generate", disable=not sys.stderr.isatty()):
                    chunk = order[start : start + self.batch]
                    with self.compute.autocast():
                        news = generate(self.model, [prompts[j] for j in chunk], budget, self.ends, sampling)
                    for j, new in zip(chunk, news):
                        text = self.tok.decode([t for t in new if t not in self.ends])
                        for stop in until:  # generation stops at an end id; a stop string cuts the text after it
                            if stop:
                                text = text.split(stop)[0]
                        out[idx[j]] = text
                        self.cache_hook.add_partial("generate_until", requests[idx[j]].args, text)
            return out

    return PipelineLM


# ---- the evaluate stage's harness run ----------------------------------------------------------------------
def leaves(name: str, groups: dict) -> list[str]:
    """The tasks a requested name stands for: itself, or every task under it (mmlu: its 57 subjects)."""
    if name not in groups:
        return [name]
    return [leaf for sub in groups[name] for leaf in leaves(sub, groups)]


def per_document(results: dict, name: str) -> list[dict]:
    """One row per document of the task(s) `name` stands for, in a fixed order: {task, doc_id, score: value} for
    every numeric per-document score (a filter other than `none` is named after the score: exact_match_strict-match)."""
    rows: dict[tuple, dict] = {}
    for leaf in leaves(name, results.get("group_subtasks", {})):
        for sample in results["samples"].get(leaf, []):
            row = rows.setdefault((leaf, sample["doc_id"]), {"task": leaf, "doc_id": sample["doc_id"]})
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    key = metric if sample.get("filter", "none") == "none" else f"{metric}_{sample['filter']}"
                    row[key] = float(value)
    return [rows[k] for k in sorted(rows)]


def task_manager(cfg: EvaluateConfig):
    """lm-eval's index of the tasks asked for: the include_path folder alone when it holds them all (indexing
    lm-eval's own thousands of task files takes seconds), else lm-eval's tasks too. An unknown name fails here."""
    require_lm_eval()
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    from lm_eval.tasks import TaskManager

    h = cfg.harness
    if h.include_path and not Path(h.include_path).is_dir():
        raise UserError(f"evaluate.harness.include_path={h.include_path!r} is not a folder of task YAML files")
    manager = TaskManager(include_path=h.include_path, include_defaults=False) if h.include_path else None
    if manager is None or set(h.tasks) - set(manager.all_tasks):
        manager = TaskManager(include_path=h.include_path or None)
    unknown = [t for t in h.tasks if t not in manager.all_tasks]
    if unknown:
        raise UserError(f"evaluate.harness.tasks: lm-eval knows no task {', '.join(unknown)}; check the names "
                        "(`lm_eval ls tasks`) or add its YAML under evaluate.harness.include_path")
    return manager


def run_tasks(cfg: EvaluateConfig, manager, folder: str, chat: bool, backend: str = "auto",
              trust_remote_code: bool = False) -> dict:
    """lm-eval's simple_evaluate of evaluate.harness.tasks on one model folder (on base.backend) through PipelineLM,
    with the chat template or without, keeping every document's scores (log_samples)."""
    from lm_eval import simple_evaluate

    h = cfg.harness
    lm = model_class()(folder, batch_size=cfg.batch_size, device=cfg.device, dtype=cfg.dtype, backend=backend,
                       trust_remote_code=trust_remote_code)
    try:
        return simple_evaluate(model=lm, tasks=list(h.tasks), num_fewshot=None if h.num_fewshot < 0 else h.num_fewshot,
                               limit=h.limit or None, apply_chat_template=chat, fewshot_as_multiturn=chat,
                               log_samples=True, task_manager=manager, bootstrap_iters=0, random_seed=cfg.seed)
    except (ConnectionError, OSError) as e:  # a dataset neither cached nor local, with the Hub offline
        raise UserError(f"evaluate.harness: a task's dataset cannot be loaded ({str(e).splitlines()[0][:200]}); "
                        "download it once online into your Hugging Face cache (docs/evaluation.md: Suites)") from None
