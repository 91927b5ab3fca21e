"""Strict verifier accuracy of a policy on tiny-world prompts, overall and per task type."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rollout.policy import Policy
from rollout.samplers import EVAL_SEED_BASE, sample
from rollout.tiny.verifier import verify
from rollout.tiny.world import TASKS, parse_prompt, prompt_set


def evaluate_policy(
    policy: Policy,
    prompts: Sequence[str] | None = None,
    seeds_per_prompt: int = 8,
    steps: int = 10,
    solver: str = "euler",
    batch_size: int = 96,
    adapter: str | None = "current",
    progress: bool = False,
) -> dict:
    """{"strict", "reward", "per_task": {task: {"strict", "reward", "images"}}} over prompts x fixed eval seeds.

    Defaults are the eval protocol: the eval prompt set, 8 seeds each, 10 deterministic Euler steps, CFG 1.0.
    """
    prompts = list(prompt_set("eval") if prompts is None else prompts)
    pairs = [(p, EVAL_SEED_BASE + j) for p in prompts for j in range(seeds_per_prompt)]
    rewards = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        out = sample(policy, [p for p, _ in chunk], [s for _, s in chunk], steps, solver=solver, adapter=adapter, progress=progress)
        rewards += [verify(image, p) for image, (p, _) in zip(out.images, chunk)]
    rewards_arr = np.array(rewards)
    tasks = np.array([parse_prompt(p).task for p, _ in pairs])
    per_task = {
        task: {
            "strict": float((rewards_arr[tasks == task] == 1.0).mean()),
            "reward": float(rewards_arr[tasks == task].mean()),
            "images": int((tasks == task).sum()),
        }
        for task in TASKS
        if (tasks == task).any()
    }
    return {"strict": float((rewards_arr == 1.0).mean()), "reward": float(rewards_arr.mean()), "per_task": per_task}


def accuracy_table(result: dict) -> str:
    """A Markdown table of an `evaluate_policy` result."""
    lines = ["| task | strict accuracy | mean reward | images |", "|---|---|---|---|"]
    for task, row in result["per_task"].items():
        lines.append(f"| {task} | {row['strict']:.3f} | {row['reward']:.3f} | {row['images']} |")
    total = sum(row["images"] for row in result["per_task"].values())
    lines.append(f"| **overall** | **{result['strict']:.3f}** | **{result['reward']:.3f}** | {total} |")
    return "\n".join(lines)
