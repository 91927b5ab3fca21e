"""Wall time to sample 96 tiny-model images with 10 steps (fp32, CPU), per solver; writes bench/results/sample_speed.json.

Run: python bench/sample_speed.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from rollout import load_policy
from rollout.samplers import sample
from rollout.tiny import prompt_set


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/results/sample_speed.json")
    args = parser.parse_args()
    policy = load_policy("tiny")
    eval_prompts = prompt_set("eval")
    prompts = [eval_prompts[i % len(eval_prompts)] for i in range(96)]
    seeds = list(range(96))
    sample(policy, prompts, seeds, steps=2)  # warm-up: allocator and prompt cache
    result = {
        "images": 96,
        "steps": 10,
        "precision": "fp32",
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    for solver in ("euler", "dpm2", "sde"):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            sample(policy, prompts, seeds, steps=10, solver=solver)
            times.append(time.perf_counter() - start)
        result[f"{solver}_seconds_best"] = min(times)
        result[f"{solver}_seconds_all"] = times
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
