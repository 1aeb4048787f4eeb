"""What fits where: the memory plan of 7-8B models under each way of saving memory, and what each costs measured on
the CPU.

    python -m bench.fit_bench --plan        # the planned table (no model is built): seconds
    python -m bench.fit_bench --measure     # CPU: a ~100M Llama, one run of the train stage per setting: minutes

--plan: Llama-3.1-8B, Qwen2.5-7B and Gemma-3-4B (its text model) at 4 rows x 2048 tokens, bf16 autocast on one GPU,
with and without activation checkpointing, for full fine-tuning, full + 8-bit AdamW, full + optimizer offload, LoRA
r16 and QLoRA r16 (the seven projections). Per setting the GiB on the GPU (and in host memory when offloaded) with the
loss in chunks of MIN_CHUNK trained positions (what `loss_chunk: auto` comes down to on a tight card), and which
cards it fits: 24 GB (24,564 MiB, an RTX 3090/4090), 80 GB (81,559 MiB, an A100/H100), 141 GB (143,771 MiB, an
H200), each less 1 GiB for the CUDA context and the allocator. Then the one-line advice of check_fit for full
fine-tuning of Llama-3.1-8B on the 24 GB and 80 GB cards, with 64 and 256 GiB of host memory.
Gemma 3 is no native family: it is planned as the Architecture of its config numbers (34 layers, width 2560, 8 query
/ 4 key-value heads of 256, MLP 10240, a 262,208-token tied vocabulary, q/k norms); its extra post-attention and
post-MLP norms (2 more RMSNorms per block), its 5-in-6 sliding-window layers and GeGLU are not modelled: the norms
add ~2 x 4 bytes x tokens x width per block to the activations (~0.3 GiB over the model, unchecked), the window and
the activation function change no tensor the plan counts.

--measure: peak resident set and tokens/s of full, LoRA r16, QLoRA r16 and full + 8-bit AdamW on one ~100M Llama
(12 layers, width 768, untied 16k vocabulary), block 256, 4 rows a step, fp32 on the CPU: one run each of the real
train stage, so the peak includes Python, torch and the data (the resident set of a process that only imported them,
with and without bitsandbytes, is printed too)."""
import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30
CARDS = {"24 GB": 24564 * 2**20, "80 GB": 81559 * 2**20, "141 GB": 143771 * 2**20}
RESERVED = GIB  # the CUDA context and the allocator's slack
MODELS = {  # name: Architecture fields (from each model's config.json)
    "Llama-3.1-8B": dict(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, head_dim=128, intermediate_size=14336,
                         vocab_size=128256, tie_embeddings=False),
    "Qwen2.5-7B": dict(n_layer=28, n_embd=3584, n_head=28, n_kv_head=4, head_dim=128, intermediate_size=18944,
                       vocab_size=152064, tie_embeddings=False, qkv_bias=True),
    "Gemma-3-4B": dict(n_layer=34, n_embd=2560, n_head=8, n_kv_head=4, head_dim=256, intermediate_size=10240,
                       vocab_size=262208, tie_embeddings=True, qk_norm=True),
}
SETTINGS = {  # name: train fields (lora.* for the adapters)
    "full": {},
    "full + adamw8bit": {"optimizer": "adamw8bit"},
    "full + offload": {"offload": "optimizer"},
    "LoRA r16": {"lora.rank": 16},
    "QLoRA r16": {"lora.rank": 16, "lora.quantize": "nf4"},
}
ROWS, TOKENS = 4, 2048


def sft_config(**fields):
    """The project's train section with `fields` (lora.* in its adapters)."""
    from pipeline.config import SftConfig, load_params

    cfg = load_params("train", SftConfig, str(ROOT / "params.yaml"))
    lora = {k.removeprefix("lora."): v for k, v in fields.items() if k.startswith("lora.")}
    top = {k: v for k, v in fields.items() if not k.startswith("lora.")}
    return dataclasses.replace(cfg, **top, lora=dataclasses.replace(cfg.lora, **lora))


def architecture(name: str):
    from pipeline.model import Architecture

    return Architecture(**MODELS[name], max_seq_len=131072, rope_theta=500000.0, norm_eps=1e-5, init_std=0.02)


def plan_table() -> None:
    from pipeline.memory import MIN_CHUNK, plan_memory

    print(f"planned GiB per GPU at {ROWS} x {TOKENS} tokens, bf16, one GPU, loss in chunks of {MIN_CHUNK}; "
          "fits: planned <= card - 1 GiB\n")
    print("| model | setting | GPU GiB | fits | GPU GiB, checkpointed | fits | host GiB (offload) |")
    print("|---|---|---|---|---|---|---|")
    for model in MODELS:
        arch = architecture(model)
        for setting, fields in SETTINGS.items():
            cells, host = [], 0.0
            for checkpointing in (False, True):
                cfg = sft_config(batch_size=ROWS, grad_accum=1, loss_chunk=MIN_CHUNK,
                                 activation_checkpointing=checkpointing, **fields)
                plan = plan_memory(arch, cfg, TOKENS, 1, "cuda", True)
                fits = [card for card, total in CARDS.items() if plan.total() <= total - RESERVED]
                cells += [f"{plan.total() / GIB:,.1f}", ", ".join(fits) or "none"]
                host = plan.host() / GIB
            print(f"| {model} | {setting} | {' | '.join(cells)} | {f'{host:,.1f}' if host else ''} |")


def advice() -> None:
    """check_fit's line for full fine-tuning of Llama-3.1-8B (the project's train section, 4 x 2048) per card."""
    from pipeline.common import UserError
    from pipeline.memory import check_fit, plan_memory, sized_loss_chunk

    arch = architecture("Llama-3.1-8B")
    print()
    for card in ("24 GB", "80 GB"):
        free = CARDS[card] - RESERVED
        for host in (64, 256):
            for lora in (0, 16):
                cfg = sized_loss_chunk(arch, sft_config(batch_size=ROWS, grad_accum=1, **{"lora.rank": lora}),
                                       TOKENS, 1, "cuda", True, free)
                plan = plan_memory(arch, cfg, TOKENS, 1, "cuda", True)
                try:
                    check_fit(plan, free, cfg, 1, arch, host_free=host * GIB)
                    said = f"fits as it is: {plan.total() / GIB:,.1f} GiB (loss_chunk auto: {cfg.loss_chunk})"
                except UserError as e:
                    said = str(e)
                print(f"- {card} card, {host} GiB host, lora.rank {lora}: {said}")


# ---- measured on the CPU ----------------------------------------------------------------------------------------
RUNS = {"full": {}, "LoRA r16": {"lora": {"rank": 16}}, "QLoRA r16": {"lora": {"rank": 16, "quantize": "nf4"}},
        "full + adamw8bit": {"optimizer": "adamw8bit"}}


def run(folder: Path, name: str, steps: int) -> dict:
    from bench.memory_bench import SIZES, train_stage

    _, _, rows, _ = SIZES["100m"]
    train = {"max_steps": steps, "batch_size": rows, "grad_accum": 1, "save_every": 0, "eval_every": 1000,
             "log_every": 1, "device": "cpu"} | RUNS[name]
    r = train_stage(folder, name, train)
    return {"run": name, "tokens_per_s": r["tokens_per_s"], "seconds": r["seconds"],
            "peak_rss_gib": r["peak_memory_gib"], "plan_total_gib": r["plan_total_gib"],
            "plan_state_gib": sum(r[f"plan_{k}_gib"] for k in ("weights", "gradients", "optimizer"))}


def imported_rss(extra: str = "") -> float:
    """GiB resident in a process that imported the pipeline's training modules (and `extra`), nothing more."""
    code = f"import resource, pipeline.sft{extra}; print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=ROOT).stdout)


def measure(steps: int) -> None:
    from bench.memory_bench import workdir

    baseline, with_bnb = imported_rss(), imported_rss(", bitsandbytes")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        workdir(folder, "100m")
        results = [run(folder, name, steps) for name in RUNS]
    print(json.dumps({"imported_rss_gib": baseline, "imported_with_bitsandbytes_gib": with_bnb, "runs": results},
                     indent=1))
    full = results[0]
    print("\n| run | tokens/s | vs full | peak RSS (GiB) | vs full | planned weights + grads + optimizer (GiB) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['run']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / full['tokens_per_s']:.2f}x | "
              f"{r['peak_rss_gib']:.3f} | {r['peak_rss_gib'] / full['peak_rss_gib']:.2f}x | {r['plan_state_gib']:.3f} |")
    print(f"\nimported the pipeline alone: {baseline:.3f} GiB resident; with bitsandbytes: {with_bnb:.3f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--plan", action="store_true", help="the planned table and check_fit's advice")
    parser.add_argument("--measure", action="store_true", help="CPU runs of a ~100M model")
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per measured run")
    args = parser.parse_args()
    if args.plan or not args.measure:
        plan_table()
        advice()
    if args.measure:
        measure(args.steps)


if __name__ == "__main__":
    main()
