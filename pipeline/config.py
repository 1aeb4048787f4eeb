"""params.yaml -> one dataclass per section, strictly: a missing or unknown key, a value of the wrong type and every
failed check are reported together, naming the key. No field has a default: params.yaml is the one place a value
is written (its comments document them). No torch here, so loading params is cheap."""
import dataclasses
import math
import types
import typing

import yaml

from pipeline.common import UserError

PARAMS_FILE = "params.yaml"
CHAT_FORMATS = ("markers", "chatml")  # pipeline/template.py defines them
TRAIN_ON = ("all_assistant", "last_assistant", "everything")
SYNTH_TASKS = ("fact", "passage", "arith", "multi")
MAX_SYLLABLES = 100  # onsets x vowels of pipeline/synth.py
TOP_LEVEL = {"lr": "train"}  # top-level keys of params.yaml, each the value of a key of this section


class ParamError(UserError):
    """Every problem found in a section, each `key=value why` (or `key: why`)."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def require(cfg, rules: dict[str, tuple[bool, str]]) -> None:
    """rules: key -> (holds, what the value must be). Raises one ParamError listing every rule that fails."""
    bad = [f"{key}={getattr(cfg, key)!r} {why}" for key, (ok, why) in rules.items() if not ok]
    if bad:
        raise ParamError(bad)


def _coerce(value, kind, key: str):
    """A scalar as its declared type, or a problem. DVC writes `-S lr=3e-5` as '3e-05', which YAML reads as a
    string, so numbers and booleans written as strings are read back; 1 is a float, a float is never an int."""
    if kind in (int, float) and isinstance(value, str):
        try:
            value = int(value) if kind is int else float(value)
        except ValueError:
            return None, f"{key}={value!r} must be a number ({kind.__name__})"
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if isinstance(kind, types.UnionType):  # a number or a word, e.g. int | str for `200` or `auto`
        for option in typing.get_args(kind):
            if option is not str:
                number, problem = _coerce(value, option, key)
                if not problem:
                    return number, None
        if isinstance(value, str):
            return value, None
        return None, f"{key}={value!r} must be {' or '.join(k.__name__ for k in typing.get_args(kind))}"
    if kind is float and type(value) is int:
        value = float(value)
    if kind is list and isinstance(value, list) and not all(isinstance(v, str) for v in value):
        return None, f"{key}={value!r} must be a list of names"
    if kind in (int, float, str, bool, dict, list) and type(value) is not kind:
        return None, f"{key}={value!r} must be {({dict: 'a mapping', list: 'a list'}).get(kind, kind.__name__)}"
    if kind is float and not math.isfinite(value):
        return None, f"{key}={value!r} must be finite"
    return value, None


def from_dict(cls, section, where: str):
    """Build dataclass `cls` from a mapping; raises ParamError naming every missing, unknown or mistyped key and
    every failed check (nested sections included), each as `where.key`."""
    if not isinstance(section, dict):
        raise ParamError([f"{where}: must be a mapping of keys, got {section!r}"])
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    problems = [f"{where}.{k}: unknown key (known: {', '.join(names)})" for k in section if k not in names]
    problems += [f"{where}.{k}: missing" for k in names if k not in section]
    kwargs = {}
    for key in names:
        if key not in section:
            continue
        if dataclasses.is_dataclass(hints[key]):
            try:
                kwargs[key] = from_dict(hints[key], section[key], f"{where}.{key}")
            except ParamError as e:
                problems += e.problems
            continue
        kwargs[key], problem = _coerce(section[key], hints[key], f"{where}.{key}")
        if problem:
            problems.append(problem)
    if problems:
        raise ParamError(problems)
    try:
        return cls(**kwargs)
    except ParamError as e:
        raise ParamError([f"{where}.{p}" for p in e.problems]) from None


def read_params(path: str = PARAMS_FILE) -> dict:
    try:
        with open(path) as f:
            params = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; run from the project folder (the one with dvc.yaml)") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    if not isinstance(params, dict):
        raise UserError(f"{path}: expected a mapping of sections")
    return params


def load_params(section: str, cls, path: str = PARAMS_FILE):
    """One section of params.yaml (`evaluate.during_train` for a nested one) as its dataclass. The SFT learning
    rate is the top-level `lr`, which users sweep as `dvc exp run -S lr=3e-5`: it fills train's `lr`."""
    params = read_params(path)
    node, where = params, []
    for part in section.split("."):
        where.append(part)
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"{path}: section {'.'.join(where)} is missing; add it (see the project's params.yaml)")
        node = node[part]
    extra = {key: params[key] for key, owner in TOP_LEVEL.items() if owner == section and key in params}
    clash = [key for key in extra if isinstance(node, dict) and key in node]
    missing = [key for key, owner in TOP_LEVEL.items() if owner == section and key not in params]
    problems = [f"{section}.{k}: the {section} section takes it from the top-level `{k}` of params.yaml "
                f"(`dvc exp run -S {k}=...`); remove {section}.{k}" for k in clash]
    problems += [f"{k}: missing at the top of params.yaml" for k in missing]
    if problems:
        raise UserError(f"{path}: " + "; ".join(problems))
    try:
        return from_dict(cls, node | extra if isinstance(node, dict) else node, section)
    except ParamError as e:  # a top-level key is named as the user writes it: `lr`, not `train.lr`
        own = tuple(f"{section}.{k}{sep}" for k in extra for sep in "=:")
        problems = [p.removeprefix(f"{section}.") if p.startswith(own) else p for p in e.problems]
        raise UserError(f"{path}: " + "; ".join(problems)) from None


# ---- the sections -------------------------------------------------------------------------------------------
@dataclasses.dataclass
class SynthConfig:
    seed: int  # one seed for the world, the held-out split, the corpus and the conversations
    n_towns: int  # towns in the world (5 facts each)
    n_people: int  # people in the world (5 facts each); the first n_towns are the mayors
    n_regions: int  # region names shared by the towns
    n_rivers: int  # river names shared by the towns
    n_syllables: int  # syllables (of 100) that names are built from; names are 2 syllables + an optional coda
    docs_per_entity: int  # corpus documents per town and per person, each restating all its facts
    docs_per_group: int  # corpus documents listing the towns of each region and each river
    n_arith_docs: int  # corpus documents of worked sums and differences
    n_reading_docs: int  # corpus documents describing an invented entity, then asking about it
    corpus_question_frac: float  # chance that a corpus sentence is phrased as question + answer
    heldout_frac: float  # fraction of (entity, attribute) facts asked about only in heldout.jsonl
    n_train: int  # conversations in train.jsonl
    n_dev: int  # conversations in dev.jsonl (same distribution as train, none identical to one)
    n_heldout: int  # conversations in heldout.jsonl (held-out facts, fresh passages and sums)
    frac_fact: float  # closed-book single question about a world fact
    frac_passage: float  # question answered from a passage about an invented entity in the user turn
    frac_arith: float  # a + b or a - b
    frac_multi: float  # 2..max_turns follow-up questions about the same (or a linked) entity
    max_turns: int  # most user/assistant exchanges in a multi-turn conversation
    system_frac: float  # fraction of conversations that begin with a system message
    arith_max: int  # operands are drawn from 0..arith_max; differences are never negative
    n_mc: int  # multiple-choice questions in mc.jsonl (options a-d, gold = a letter) about known facts
    n_mc_train: int  # multiple-choice conversations added to train.jsonl, about other known facts than mc.jsonl
    n_suite_mc: int  # multiple-choice questions about held-out facts in suites/world.jsonl (a general-ability suite)
    n_suite_arith: int  # sums and differences in phrasings the chat data never uses, in suites/world.jsonl

    def __post_init__(self):
        fracs = ("corpus_question_frac", "heldout_frac", "system_frac") + tuple(f"frac_{t}" for t in SYNTH_TASKS)
        lows = dict(n_towns=1, n_regions=1, n_rivers=1, docs_per_entity=1, n_train=1, arith_max=1, max_turns=2,
                    docs_per_group=0, n_arith_docs=0, n_reading_docs=0, n_dev=0, n_heldout=0, n_mc=0, n_mc_train=0,
                    n_suite_mc=0, n_suite_arith=0)
        n_names = self.n_towns + self.n_regions + self.n_rivers + 3 * self.n_people  # first, last and pet names
        rules = {k: (0.0 <= getattr(self, k) <= 1.0, "must be in [0, 1]") for k in fracs}
        rules |= {k: (getattr(self, k) >= low, f"must be at least {low}") for k, low in lows.items()}
        rules["frac_multi"] = (rules["frac_multi"][0] and abs(sum(getattr(self, f"frac_{t}") for t in SYNTH_TASKS)
                                                              - 1.0) < 1e-6,
                               "must be in [0, 1], and frac_fact + frac_passage + frac_arith + frac_multi sum to 1")
        rules["n_people"] = (self.n_people >= self.n_towns, f"must be >= n_towns={self.n_towns}: every town needs a "
                                                            "mayor")
        # room for unique, prefix-free names and for passage names
        rules["n_syllables"] = (2 <= self.n_syllables <= MAX_SYLLABLES and self.n_syllables ** 2 >= 3 * n_names,
                                f"must be in [2, {MAX_SYLLABLES}] with n_syllables**2 >= {3 * n_names} "
                                f"(3 x the {n_names} names)")
        held = round(self.heldout_frac * 5 * (self.n_towns + self.n_people))
        rules["heldout_frac"] = (0.0 <= self.heldout_frac <= 0.8 and (held >= 1 or not self.n_heldout),
                                 "must be in [0, 0.8] and hold out at least one fact when n_heldout > 0")
        require(self, rules)


@dataclasses.dataclass
class TokenizerConfig:
    vocab_size: int  # byte-level BPE vocabulary, chat markers included
    chat_format: str  # auto | template (the imported model's own) | markers | chatml
    thinking: str  # an empty <think></think> a template writes before an answer: context (untrained, in the
    # prompt) | train (trained with the answer)

    def __post_init__(self):
        require(self, {"vocab_size": (self.vocab_size >= 256 + 6, "must be >= 262 (256 bytes + chat markers)"),
                       "chat_format": (self.chat_format in ("auto", "template", *CHAT_FORMATS),
                                       f"must be auto, template or one of {', '.join(CHAT_FORMATS)}"),
                       "thinking": (self.thinking in THINKING, f"must be one of {', '.join(THINKING)}")})


@dataclasses.dataclass
class ModelConfig:
    n_layer: int  # transformer blocks
    n_embd: int  # hidden width
    n_head: int  # query heads
    n_kv_head: int  # key/value heads (grouped-query attention); divides n_head
    intermediate_size: int  # SwiGLU hidden width
    max_seq_len: int  # max_position_embeddings written to config.json
    rope_theta: float  # RoPE base
    norm_eps: float  # RMSNorm epsilon
    tie_embeddings: bool  # share input embedding and output layer
    init_std: float  # weight init standard deviation
    vocab_size: int  # 0: taken from the tokenizer when the model is built

    def __post_init__(self):
        positive = ("n_layer", "n_embd", "n_head", "n_kv_head", "intermediate_size", "max_seq_len")
        rules = {k: (getattr(self, k) >= 1, "must be >= 1") for k in positive}
        if not any(getattr(self, k) < 1 for k in positive):
            rules["n_embd"] = (self.n_embd % self.n_head == 0 and (self.n_embd // self.n_head) % 2 == 0,
                               f"must be n_head={self.n_head} times an even head size (RoPE)")
            rules["n_kv_head"] = (self.n_head % self.n_kv_head == 0, f"must divide n_head={self.n_head}")
        rules |= {"rope_theta": (self.rope_theta > 0, "must be > 0"), "norm_eps": (self.norm_eps > 0, "must be > 0"),
                  "init_std": (self.init_std > 0, "must be > 0"), "vocab_size": (self.vocab_size >= 0, "must be >= 0")}
        require(self, rules)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


DEVICES, DTYPES = ("auto", "cpu", "cuda"), ("auto", "bfloat16", "float32")
BACKENDS = ("auto", "native", "transformers")  # pipeline/backend.py
THINKING = ("context", "train")  # pipeline/model_template.py: what an empty <think></think> before an answer is
SAVE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclasses.dataclass
class TrainConfig:
    seed: int  # data order seed
    lr: float  # peak learning rate (SFT: the top-level `lr` of params.yaml)
    min_lr_frac: float  # cosine floor, as a fraction of lr
    warmup_frac: float  # linear warmup, as a fraction of all steps
    epochs: float  # passes over the packed rows (ignored when max_steps > 0)
    max_steps: int  # optimizer steps; 0: derived from epochs
    batch_size: int  # packed rows per micro-batch, per process
    grad_accum: int  # micro-batches per optimizer step
    weight_decay: float  # AdamW decay, matrices only
    beta1: float
    beta2: float
    eps: float
    grad_clip: float  # max global gradient norm (the pre-clip norm is logged)
    eval_every: int  # steps between dev-loss evaluations
    log_every: int  # steps between log lines when stdout is not a terminal
    max_bad_steps: int  # consecutive non-finite steps before the run stops
    save_every: int  # steps between resume checkpoints; 0: none
    remote_checkpoints: bool  # also upload each resume checkpoint to the default DVC remote; a rerun anywhere resumes
    remote_keep: int  # remote checkpoints a finished run keeps (0: none)
    nproc: int  # processes (GPUs) on this machine; > 1 relaunches the stage under torchrun (DDP)
    compile: bool  # torch.compile the blocks on CUDA (fixed shapes); CPU always runs eager
    activation_checkpointing: bool  # recompute blocks in backward: less memory, ~30% more compute
    loss_chunk: int | str  # trained positions per output-layer chunk in the loss; 0: all at once; auto: the largest
    # chunk the free device memory takes (pipeline/memory.py)
    device: str  # auto | cpu | cuda
    dtype: str  # auto (bf16 autocast on CUDA, fp32 on CPU) | bfloat16 | float32
    wandb_project: str  # set to log to W&B too (mode from WANDB_MODE; default offline)
    save_dtype: str  # the saved weights: auto (the dtype the base came in; fp32 when pretrained here) | float32 | ...
    max_shard_gb: float  # saved weights above this size are split into safetensors shards with an index

    def __post_init__(self):
        at_least_1 = ("batch_size", "grad_accum", "eval_every", "log_every", "max_bad_steps", "nproc")
        rules = {k: (getattr(self, k) >= 1, "must be >= 1") for k in at_least_1}
        rules |= {k: (getattr(self, k) >= 0, "must be >= 0") for k in ("save_every", "weight_decay", "remote_keep")}
        rules["loss_chunk"] = (self.loss_chunk == "auto" or isinstance(self.loss_chunk, int) and self.loss_chunk >= 0,
                               "must be auto or a number of positions >= 0 (0: all at once)")
        rules |= {
            "lr": (self.lr > 0, "must be > 0"),
            "min_lr_frac": (0 <= self.min_lr_frac <= 1, "must be in [0, 1]"),
            "warmup_frac": (0 <= self.warmup_frac < 1, "must be in [0, 1)"),
            "max_steps": (self.max_steps >= 0, "must be >= 0 (0: from epochs)"),
            "epochs": (self.max_steps > 0 or self.epochs > 0, "must be > 0 when max_steps is 0"),
            "beta1": (0 <= self.beta1 < 1, "must be in [0, 1)"), "beta2": (0 <= self.beta2 < 1, "must be in [0, 1)"),
            "eps": (self.eps > 0, "must be > 0"), "grad_clip": (self.grad_clip > 0, "must be > 0"),
            "device": (self.device in DEVICES, f"must be one of {', '.join(DEVICES)}"),
            "dtype": (self.dtype in DTYPES, f"must be one of {', '.join(DTYPES)} (float16 needs loss scaling)"),
            "save_dtype": (self.save_dtype in SAVE_DTYPES, f"must be one of {', '.join(SAVE_DTYPES)}"),
            "max_shard_gb": (self.max_shard_gb > 0, "must be > 0"),
        }
        require(self, rules)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PEFT's names
PARALLEL = ("ddp", "fsdp")
QUANTIZE = ("none", "nf4")  # the frozen base of the adapted projections: as loaded | 4-bit NormalFloat (QLoRA)
OPTIMIZERS = ("adamw", "adamw8bit")  # AdamW with fp32 moments | with 8-bit blockwise moments (bitsandbytes)
OFFLOAD = ("none", "optimizer")  # optimizer state (with the fp32 weights and gradients) in host memory (FSDP2)


@dataclasses.dataclass
class LoraConfig:
    rank: int  # adapter rank r; 0: full fine-tuning
    alpha: float  # the adapter's update is scaled by alpha / rank
    dropout: float  # dropout on the adapter's input, in training only
    targets: list  # the projections that get adapters, by transformers' names (q_proj ... down_proj)
    quantize: str  # none | nf4: the adapted projections' frozen weights stored in 4-bit NF4 (QLoRA)

    def __post_init__(self):
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        require(self, {"rank": (self.rank >= 0, "must be >= 0 (0: full fine-tuning)"),
                       "quantize": (self.quantize in QUANTIZE and (self.quantize == "none" or self.rank > 0),
                                    f"must be one of {', '.join(QUANTIZE)}; nf4 (QLoRA) needs adapters: rank > 0"),
                       "alpha": (self.alpha > 0, "must be > 0"),
                       "dropout": (0 <= self.dropout < 1, "must be in [0, 1)"),
                       "targets": (bool(self.targets) and not bad and len(set(self.targets)) == len(self.targets),
                                   f"must list some of {', '.join(LORA_TARGETS)}, each once")})


@dataclasses.dataclass
class SftConfig(TrainConfig):
    """The train section: the training loop's params plus what only fine-tuning has."""
    lora: LoraConfig  # low-rank adapters instead of full fine-tuning (rank > 0)
    parallel: str  # with nproc > 1 (or under torchrun): ddp (a whole copy per GPU) | fsdp (weights, gradients and
    # optimizer state sharded over the GPUs)
    neftune_alpha: float  # NEFTune: uniform noise of scale alpha / sqrt(L * d) on the input embeddings in training
    # steps (L: the row's tokens, d: the width); 0: off
    optimizer: str  # adamw | adamw8bit (8-bit blockwise moments, bitsandbytes)
    offload: str  # none | optimizer: weights, gradients and optimizer state in host memory (FSDP2's CPU offload)

    def __post_init__(self):
        super().__post_init__()
        fsdp = self.parallel == "fsdp" or self.offload == "optimizer"  # offload runs through FSDP2, on one GPU too
        nf4 = self.lora.quantize == "nf4"
        require(self, {"parallel": (self.parallel in PARALLEL, f"must be one of {', '.join(PARALLEL)}"),
                       "neftune_alpha": (self.neftune_alpha >= 0, "must be >= 0 (0: off)"),
                       "optimizer": (self.optimizer in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
                       "offload": (self.offload in OFFLOAD, f"must be one of {', '.join(OFFLOAD)}")})
        # what does not run together (FSDP2's shards are DTensors: bitsandbytes refuses them)
        problems = [f"lora.quantize='nf4' does not run under FSDP2 (parallel='{self.parallel}', offload="
                    f"'{self.offload}'): 4-bit shards have open silent-corruption reports upstream; use parallel: ddp "
                    "and offload: none with nf4"] if fsdp and nf4 else []
        if fsdp and self.optimizer == "adamw8bit":
            problems.append(f"optimizer='adamw8bit' does not run on FSDP2's sharded parameters (parallel="
                            f"'{self.parallel}', offload='{self.offload}'); use optimizer: adamw there")
        if self.offload == "optimizer" and self.parallel == "ddp" and self.nproc > 1:
            problems.append("offload='optimizer' shards through FSDP2: with nproc > 1 set parallel: fsdp")
        if problems:
            raise ParamError(problems)


@dataclasses.dataclass
class BaseConfig:
    seed: int  # weight-init seed of the bundled base model
    init_from: str  # instead of pretraining: a model folder, a .gguf file or hf://org/name (pipeline/sources.py)
    backend: str  # auto | native | transformers: the implementation that trains, evaluates and exports the model
    trust_remote_code: bool  # run modeling code a model folder ships (config.json auto_map); false: refuse it
    block_size: int  # tokens per packed pretraining row
    corpus_eval_rows: int  # corpus rows on which an imported model's loss is measured (0: all of them)
    pretrain: TrainConfig  # pretraining hyperparameters (its own lr)

    def __post_init__(self):
        require(self, {"block_size": (self.block_size >= 8, "must be >= 8"),
                       "corpus_eval_rows": (self.corpus_eval_rows >= 0, "must be >= 0 (0: all)"),
                       "backend": (self.backend in BACKENDS, f"must be one of {', '.join(BACKENDS)}")})


@dataclasses.dataclass
class RenderConfig:
    on_error: str  # a malformed row: fail (file:line: reason) | skip (dropped and counted by reason)
    train_on: str  # trained turns: all_assistant | last_assistant | everything (ablations)
    batch_size: int  # conversations per encode_batch call and per parquet row group
    unpaired: str  # turns with nothing to pair with (params.yaml): drop (the conversation, counted) | trim (the turns)

    def __post_init__(self):
        require(self, {"on_error": (self.on_error in ("fail", "skip"), "must be fail or skip"),
                       "unpaired": (self.unpaired in ("drop", "trim"), "must be drop or trim"),
                       "train_on": (self.train_on in TRAIN_ON, f"must be one of {', '.join(TRAIN_ON)}"),
                       "batch_size": (self.batch_size >= 1, "must be >= 1")})


@dataclasses.dataclass
class PackConfig:
    block_size: int  # tokens per packed row
    overlong: str  # longer than block_size: drop | truncate | exchanges | split | fail (params.yaml: what each does)
    seed: int  # the weighted, shuffled order of the train conversations
    weights: dict  # train source -> weight (repeat/subsample); absent: 1

    def __post_init__(self):
        bad = []
        for name, w in self.weights.items():
            if isinstance(w, str):  # `dvc exp run -S +pack.weights.a=3e-5` writes 3e-05, which YAML reads as a string
                try:
                    w = self.weights[name] = float(w)
                except ValueError:
                    pass
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 <= w < math.inf:
                bad.append(name)
        require(self, {"block_size": (self.block_size >= 8, "must be >= 8"),
                       "overlong": (self.overlong in ("drop", "truncate", "exchanges", "split", "fail"),
                                    "must be drop, truncate, exchanges, split or fail"),
                       "weights": (not bad, f"must map each source to a number >= 0 (not so for {bad})")})


@dataclasses.dataclass
class DuringTrainConfig:
    prompts: int  # dev conversations answered at every train.eval_every (generation metrics logged); 0: off
    max_new_tokens: int  # generation budget per answer during training
    samples: int  # of those, the first N answers are written as samples (samples.jsonl, samples.md)

    def __post_init__(self):
        require(self, {"prompts": (self.prompts >= 0, "must be >= 0"),
                       "max_new_tokens": (self.max_new_tokens >= 1, "must be >= 1"),
                       "samples": (0 <= self.samples <= max(0, self.prompts), "must be in [0, prompts]")})


@dataclasses.dataclass
class BudgetConfig:
    factor: float  # evaluate.max_new_tokens: auto gives each answer factor x its gold answer's tokens,
    floor: int  # at least this many,
    cap: int  # at most this many

    def __post_init__(self):
        require(self, {"factor": (self.factor >= 1.0, "must be >= 1 (a budget shorter than the gold answer)"),
                       "floor": (self.floor >= 1, "must be >= 1"),
                       "cap": (self.cap >= self.floor, "must be >= floor")})


ANSWER_KINDS = ("auto", "short", "long")
PROMPTINGS = ("chat", "plain")


@dataclasses.dataclass
class PromptingConfig:
    base: str  # how suites and harness tasks prompt the base model: chat (its chat template) | plain (few-shot text)
    sft: str  # the same for the fine-tuned model

    def __post_init__(self):
        require(self, {k: (getattr(self, k) in PROMPTINGS, f"must be one of {', '.join(PROMPTINGS)}")
                       for k in ("base", "sft")})


@dataclasses.dataclass
class HarnessConfig:
    tasks: list  # lm-evaluation-harness task names (lm-eval installed); empty: none
    limit: int  # first N documents of each task; 0: all
    num_fewshot: int  # solved examples before each document; -1: each task's own default
    include_path: str  # a folder of task YAML files of your own (lm-eval's --include_path); empty: none

    def __post_init__(self):
        require(self, {"limit": (self.limit >= 0, "must be >= 0 (0: all)"),
                       "num_fewshot": (self.num_fewshot >= -1, "must be >= 0, or -1 (each task's default)"),
                       "tasks": (len(set(self.tasks)) == len(self.tasks), "must name each task once")})


def prompt_problem(prompt: str) -> str:
    """Why a judging prompt cannot be used, or ""."""
    missing = [f for f in ("{question}", "{answer_a}", "{answer_b}") if f not in prompt]
    if missing:
        return f"must contain {', '.join(missing)}"
    try:
        prompt.format(question="", answer_a="", answer_b="")
    except (KeyError, IndexError, ValueError) as e:
        return f"has braces other than the three fields ({e!r}); write a literal brace as {{{{ or }}}}"
    return ""


@dataclasses.dataclass
class JudgeConfig:
    model: str  # a model folder the pipeline can load, to compare base and SFT answers; empty: no judge
    prompt: str  # the judging prompt, with {question}, {answer_a}, {answer_b}; the judge answers A or B

    def __post_init__(self):
        problem = prompt_problem(self.prompt)
        require(self, {"prompt": (not problem, problem)})


@dataclasses.dataclass
class EvaluateConfig:
    mc: str  # multiple-choice conversations (options `a) ...` in the user turn, gold letter)
    multiple_choice: bool  # false: no multiple-choice score (the report and card show only what was measured)
    answers: str  # short | long | auto: which generation scores apply (params.yaml says what each measures)
    max_new_tokens: int | str  # generation budget per answer: a number, or auto (from its gold answer, see budget)
    budget: BudgetConfig
    batch_size: int  # prompts decoded together
    limit: int  # evaluate the first N held-out conversations (and N multiple-choice questions); 0: all
    n_boot: int  # bootstrap resamples for the 95% intervals
    seed: int  # bootstrap seed
    n_report: int  # held-out prompts shown side by side (base, sft) in the Markdown report
    device: str  # auto | cpu | cuda
    dtype: str  # auto | bfloat16 | float32
    during_train: DuringTrainConfig  # read by the train stage
    judge: JudgeConfig  # an optional local judge of base vs SFT answers
    suites: str  # general-ability suites: a .jsonl file or a folder of them (one suite per file, named by its stem)
    prompting: PromptingConfig  # per model: chat template or plain few-shot text (suites and harness tasks)
    fewshot: int  # solved examples before each suite question (the first N of each kind in its file, not scored)
    suite_max_new_tokens: int  # generation budget of the suites' letter and exact answers
    regression_margin: float  # a suite or task regresses when its sft - base interval lies wholly below -margin
    harness: HarnessConfig  # lm-evaluation-harness tasks (optional)

    def __post_init__(self):
        fixed = isinstance(self.max_new_tokens, int)
        require(self, {"max_new_tokens": (self.max_new_tokens == "auto" or fixed and self.max_new_tokens >= 1,
                                          "must be a number >= 1 or auto"),
                       "answers": (self.answers in ANSWER_KINDS, f"must be one of {', '.join(ANSWER_KINDS)}"),
                       "batch_size": (self.batch_size >= 1, "must be >= 1"),
                       "limit": (self.limit >= 0, "must be >= 0 (0: all)"),
                       "n_boot": (self.n_boot >= 100, "must be >= 100"),
                       "n_report": (self.n_report >= 0, "must be >= 0"),
                       "device": (self.device in DEVICES, f"must be one of {', '.join(DEVICES)}"),
                       "dtype": (self.dtype in DTYPES, f"must be one of {', '.join(DTYPES)}"),
                       "suites": (bool(self.suites), "must name a suite file or folder"),
                       "fewshot": (self.fewshot >= 0, "must be >= 0"),
                       "suite_max_new_tokens": (self.suite_max_new_tokens >= 1, "must be >= 1"),
                       "regression_margin": (self.regression_margin >= 0, "must be >= 0")})


@dataclasses.dataclass
class PublishConfig:
    repo_id: str  # Hugging Face Hub repo, e.g. user/tiny-chat; empty: export only, no upload
    private: bool  # create the Hub repo as private
    model_name: str  # name shown in the model card
    gate_metric: str  # the gate reads this key of metrics.json: `stopped` (group sft) or `group.key`
    gate_min: float  # refuse to publish when that metric is below this
    no_regression: list  # suite or harness task names: refuse to publish when one regressed (metrics' regressions)

    def __post_init__(self):
        require(self, {"gate_metric": (bool(self.gate_metric) and self.gate_metric.count(".") <= 1,
                                       "must name a metric: key (of group sft) or group.key"),
                       "repo_id": (not self.repo_id or self.repo_id.count("/") == 1, "must be user/name or empty")})


SECTIONS = {"synth": SynthConfig, "tokenizer": TokenizerConfig, "model": ModelConfig, "base": BaseConfig,
            "render": RenderConfig, "pack": PackConfig, "train": SftConfig, "evaluate": EvaluateConfig,
            "publish": PublishConfig}
