"""The base stage's work: the base model folder, pretrained from scratch on the corpus (the bundled default) or
imported from base.init_from (a model folder, a GGUF file or a Hub repo) with its loss on the corpus measured."""
import numpy as np

from pipeline.backend import describe, load_model
from pipeline.common import UserError, print0, setup_compute
from pipeline.config import BaseConfig, ModelConfig, PackConfig
from pipeline.corpus import read_corpus
from pipeline.hf import copy_model, save_model, save_options
from pipeline.memory import plan_and_check
from pipeline.model import Architecture, Transformer
from pipeline.pack import pack
from pipeline.sources import IMPORT_DIR, resolve_model
from pipeline.tokenizer import load_tokenizer
from pipeline.train import clear_checkpoint, evaluate_loss, make_logger, train


def corpus_rows(texts: list[str], tok, block_size: int, alone: bool = False) -> dict:
    """Pretraining rows: each document fully trained, cut into block_size pieces, packed with a document mask
    (alone: one piece per row, for a model whose layers cannot keep packed documents apart)."""
    ids, labels = [], []
    for enc in tok.encode_batch(texts, add_special_tokens=False):
        x = np.asarray(enc.ids, dtype=np.int32)
        for start in range(0, len(x), block_size):
            ids.append(x[start : start + block_size])
            labels.append(x[start : start + block_size])
    arrays, _ = pack(ids, labels, PackConfig(block_size=block_size, overlong="fail", seed=0, weights={}),
                     alone=alone)
    return arrays


def make_base(cfg: BaseConfig, model_cfg: ModelConfig, corpus: str, tokenizer: str, out: str | None,
              live_dir: str, ckpt_dir: str | None = None) -> None:
    """The base model folder (out None: a rank other than 0, which saves nothing): a copy of cfg.init_from, or a
    model pretrained on the corpus. A rerun after a crash resumes the pretraining from ckpt_dir."""
    tok = load_tokenizer(tokenizer)
    compute = setup_compute(cfg.pretrain.device, cfg.pretrain.dtype)
    if cfg.init_from:
        folder = resolve_model(cfg.init_from, IMPORT_DIR, code=cfg.trust_remote_code)
        print0(f"base: {describe(folder, cfg.backend)}")
        model = load_model(folder, cfg.backend, trust_remote_code=cfg.trust_remote_code)
        if load_tokenizer(folder).get_vocab() != tok.get_vocab():
            raise UserError(f"base.init_from={cfg.init_from}: its tokenizer differs from {tokenizer}; rerun the "
                            "tokenizer stage (`dvc repro tokenizer`), which takes the imported model's")
        print0(f"base: using {cfg.init_from} ({model.num_params():,} parameters), no pretraining")
        rows = corpus_rows(read_corpus(corpus), tok, cfg.block_size, alone=not getattr(model, "packable", True))
        # no training curve, but the same report: how well the imported model fits the corpus
        log, close = make_logger(live_dir, cfg.pretrain, {})
        # on the first corpus_eval_rows rows: a full pass of a real model over the corpus can take an hour on a CPU
        n = len(rows["ids"]) if cfg.corpus_eval_rows <= 0 else min(cfg.corpus_eval_rows, len(rows["ids"]))
        sample = {k: v[:n] for k, v in rows.items()}
        loss = evaluate_loss(model.to(compute.device), sample, cfg.pretrain.batch_size, compute)
        log({"corpus_loss": loss, "corpus_rows": n}, 0)
        close()
        if out is not None:
            copy_model(folder, tok, out)  # as it came: its config, dtype and shards
        return
    rows = corpus_rows(read_corpus(corpus), tok, cfg.block_size)
    arch = Architecture.from_params(model_cfg, tok.get_vocab_size())
    pretrain, plan = plan_and_check(arch, cfg.pretrain, cfg.block_size, compute, "base")  # as SFT: before the model
    model = Transformer(arch)
    model.init_weights(cfg.seed)
    train(pretrain, model, compute, rows, None, live_dir, "base", ckpt_dir=ckpt_dir, plan=plan)
    if out is not None:  # rank 0
        save_model(model.cpu(), tok, out, **save_options(cfg.pretrain))
        clear_checkpoint(ckpt_dir, cfg.pretrain)
