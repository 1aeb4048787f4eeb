"""Stage synth: seed -> bundled default world: corpus.jsonl, train/dev/heldout.jsonl."""
import sys

from pipeline.common import atomic_dir, load_params
from pipeline.synth import SynthConfig, generate


def main(out: str) -> None:
    cfg = load_params("synth", SynthConfig)
    with atomic_dir(out) as tmp:
        counts = generate(cfg, str(tmp))
    print(f"synth: wrote {counts} to {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
