"""Stage synth: seed -> the bundled default world: corpus.jsonl, train/dev/heldout.jsonl, mc.jsonl, world.json,
suites/world.jsonl."""
from pipeline.common import atomic_dir, run_stage
from pipeline.config import SynthConfig, load_params
from pipeline.synth import generate


def main(out: str) -> None:
    cfg = load_params("synth", SynthConfig)
    with atomic_dir(out) as tmp:
        counts = generate(cfg, str(tmp))
    print(f"synth: wrote {counts} to {out}")


if __name__ == "__main__":
    run_stage("synth", main)
