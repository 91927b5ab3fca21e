"""The testbed's rewards, registered through the `solray.rewards` entry points like any plug-in's."""

from __future__ import annotations

from typing import Any

import numpy as np

from rewards.base import Reward, mean_and_se
from rollout.tiny.alignment import alignment
from rollout.tiny.verifier import verify
from rollout.tiny.world import ALL_PROMPTS, TASKS, parse_prompt


class TinyVerifier(Reward):
    """Partial credit of the tiny world's verifier in [0, 1] (1.0 = strict pass); NaN for other prompts."""

    name = "tiny_verifier"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        return np.array([verify(image, p) if p in ALL_PROMPTS else np.nan for image, p in zip(images, prompts)])

    def eval_metrics(self, scores: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Strict accuracy (reward == 1.0) with its standard error, and per task type, over the tiny-world prompts."""
        mine = np.array([prompt in ALL_PROMPTS for prompt in prompts], dtype=bool)
        if not mine.any():
            return {}
        strict = (scores[mine] == 1.0).astype(float)
        tasks = np.array([parse_prompt(prompt).task for prompt, kept in zip(prompts, mine) if kept])
        mean, se = mean_and_se(strict)
        return {"strict": mean, "strict_se": se} | {
            f"task/{task}": float(strict[tasks == task].mean()) for task in TASKS if (tasks == task).any()
        }


class TinyAlignment(Reward):
    """Dense prompt alignment of the tiny world in [0, 1] (rollout.tiny.alignment): the verifier's checks made
    continuous; the testbed's PickScore, while the strict verifier stays the eval metric. NaN for other prompts."""

    name = "tiny_alignment"

    def __call__(self, images: np.ndarray, prompts: list[str], metadata: list[dict[str, Any]]) -> np.ndarray:
        return np.array([alignment(image, p) if p in ALL_PROMPTS else np.nan for image, p in zip(images, prompts)])
