"""Run a few learner steps on a fixed, seeded batch and write what happened (rank 0) to a JSON file.

Used by tests/trainer/learner/test_learner_distributed.py under DeepSpeed's launcher (any world size) and as a
plain process (world size 1). Every rank builds the same sample list from the same seed, as the loop's
broadcast would give it.

    python tests/trainer/learner/scripts/learner_steps.py --model DIR --out FILE [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[4]))


def fixed_samples(n: int, seed: int = 0) -> list:
    """n responses in groups of 4 (the last may be short): each group one prompt of 3-9 tokens and one cached
    prefix of 0-6 tokens, each response that prefix plus 0-6 tokens of its own; advantages drawn."""
    from trainer.learner.batch import TrainSample

    rng = random.Random(seed)
    samples = []
    for i in range(n):
        if i % 4 == 0:
            prompt = [rng.randrange(3, 131) for _ in range(rng.randint(3, 9))]
            prefix = [rng.randrange(3, 131) for _ in range(rng.randint(0, 6))]
        own = [rng.randrange(3, 131) for _ in range(rng.randint(0 if prefix else 1, 6))]
        samples.append(
            TrainSample(
                prompt_ids=prompt,
                response_ids=prefix + own,
                prefix_len=len(prefix),
                advantage=rng.uniform(-1.5, 1.5),
                question_id=f"q{i // 4}",
            )
        )
    return samples


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=11)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--weights", help="also save rank 0's named_weights after the steps here")
    parser.add_argument("--load", help="resume from this learner checkpoint before the steps")
    parser.add_argument("--save", help="save a learner checkpoint here after --save-after steps")
    parser.add_argument("--save-after", type=int, default=1)
    parser.add_argument("--export", help="export_hf the policy here after the steps")
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()

    import torch

    from services.core.config import load_config
    from services.core.logs import setup_logging
    from trainer import dist
    from trainer.learner.engine import Learner
    from trainer.weights.export import export_hf, named_weights

    setup_logging("INFO")  # the learner's start line says what it trains and its reference
    torch.manual_seed(0)
    cfg = load_config(None, args.overrides)
    learner = Learner(cfg, args.model, total_steps=10)
    samples = fixed_samples(args.samples)
    client_state = learner.load_checkpoint(args.load) if args.load else None
    steps = []
    for index in range(args.steps):
        if args.save and index == args.save_after:
            learner.save_checkpoint(args.save, {"saved_after": index})
        steps.append(learner.train_step(samples).as_dict())
    weights = {name: tensor.float().clone() for name, tensor in named_weights(learner)}
    if args.export:
        export_hf(learner, args.export)
    if dist.is_main():
        if args.weights:
            from safetensors.torch import save_file

            save_file(weights, args.weights)
        Path(args.out).write_text(
            json.dumps(
                {
                    "world_size": dist.world_size(),
                    "steps": steps,
                    "names": sorted(weights),
                    "client_state": client_state,
                },
                indent=1,
            )
        )
    dist.barrier()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
