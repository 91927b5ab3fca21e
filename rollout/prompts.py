"""Prompt sources: which P prompts an iteration trains on, deterministic per (run seed, step)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from rollout.tiny.world import prompt_set


def load_prompts(spec: str) -> list[str]:
    """ "tiny:train" / "tiny:eval" / "tiny:curriculum", or a text file with one prompt per line (blank lines ignored)."""
    if spec.startswith("tiny:"):
        return prompt_set(spec.removeprefix("tiny:"))
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"prompt source {spec!r} is neither 'tiny:train', 'tiny:eval', 'tiny:curriculum' nor an existing text file")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {spec!r} holds no prompts")
    return prompts


class PromptSource:
    """P distinct prompts per step, drawn without replacement from a fixed list (with replacement if P exceeds it)."""

    def __init__(self, spec: str, run_seed: int) -> None:
        self.prompts = load_prompts(spec)
        self.run_seed = run_seed

    def batch(self, step: int, count: int) -> list[str]:
        rng = np.random.default_rng([self.run_seed, step])
        replace = count > len(self.prompts)
        return [self.prompts[i] for i in rng.choice(len(self.prompts), size=count, replace=replace)]
