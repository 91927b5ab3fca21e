"""Evaluation probes and image grids of a run, sampled by learner rank 0 with eval.adapter."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import ray

from actors.groups import LearnerGroup, RewardGroup
from rewards.base import mean_and_se
from rl.config import Recipe
from rollout.prompts import PromptSource, load_prompts
from rollout.samplers import EVAL_SEED_BASE

GRID_PROMPTS, GRID_SEEDS = 4, 4  # the image-grid probe: eval prompts x seeds, the same at every grid
Fetch = Callable[[ray.ObjectRef], Any]


def evaluate(recipe: Recipe, learners: LearnerGroup, rewards: RewardGroup, fetch: Fetch) -> dict[str, float]:
    """Probes of eval.adapter (the EMA of the trained LoRA, or the LoRA) with the eval protocol's sampler:
    the held-out eval.prompts (metrics eval/) and, with eval.train_prompts, the prompts the run trains
    on (eval_train/), each prompt with fixed eval seeds. Per probe: every training and eval.rewards
    reward's mean and standard error, and the rewards' own eval metrics (the tiny verifier's strict accuracy)."""
    config = recipe.eval
    metrics = probe(recipe, learners, rewards, fetch, "eval", config.prompts, config.seeds_per_prompt)
    if config.train_prompts is not None:
        metrics |= probe(recipe, learners, rewards, fetch, "eval_train", config.train_prompts, config.train_seeds_per_prompt)
    return metrics


def probe(
    recipe: Recipe, learners: LearnerGroup, rewards: RewardGroup, fetch: Fetch, prefix: str, source: str, seeds_per_prompt: int
) -> dict[str, float]:
    """One probe: source's prompts x seeds_per_prompt eval seeds; metrics under prefix/."""
    config = recipe.eval
    prompt_list = load_prompts(source)
    prompts = [prompt for prompt in prompt_list for _ in range(seeds_per_prompt)]
    seeds = [EVAL_SEED_BASE + j for j in range(seeds_per_prompt)] * len(prompt_list)
    images_ref = learners.sample_images(prompts, seeds, config.steps, config.solver)
    scores = fetch(rewards.score(0, images_ref, prompts, evaluation=True))
    names = [spec.name for spec in recipe.rewards.models] + list(recipe.eval_only_rewards)
    metrics = {}
    for r, name in enumerate(names):
        mean, se = mean_and_se(scores[:, r])
        metrics |= {f"{prefix}/{name}": mean, f"{prefix}/{name}_se": se}
    extra = fetch(rewards.eval_metrics(scores, prompts))
    return metrics | {f"{prefix}/{key}": value for key, value in extra.items()}


def grid_samples(recipe: Recipe, learners: LearnerGroup, rewards: RewardGroup, fetch: Fetch) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A fixed probe, GRID_PROMPTS prompts (of eval.train_prompts when set: where training shows first, else
    eval.prompts) x GRID_SEEDS seeds, sampled with eval.adapter: images, prompts, first reward."""
    config = recipe.eval
    grid_prompts = PromptSource(config.train_prompts or config.prompts, recipe.run.seed).batch(0, GRID_PROMPTS)
    prompts = [prompt for prompt in grid_prompts for _ in range(GRID_SEEDS)]
    images_ref = learners.sample_images(prompts, list(range(GRID_SEEDS)) * len(grid_prompts))
    scores = fetch(rewards.score(0, images_ref, prompts))
    # The one place the driver fetches images: a few, every logging.grid_every steps.
    return ray.get(images_ref), prompts, scores[:, 0]
