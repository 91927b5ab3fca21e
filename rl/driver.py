"""The driver: one iteration of DESIGN.md section 1 per step, each phase in a named timer.

The driver holds ObjectRefs and scalars (rewards, advantages, metrics); images, latents and weights
go worker -> object store -> worker.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import torch

from actors.groups import WorkerGroup
from actors.workers import LearnerWorker, RewardWorker, RolloutWorker
from rl.advantages import zero_variance_groups
from rl.config import Recipe
from rl.selection import select_contrastive
from rollout.prompts import PromptSource
from rollout.samplers import seed_for


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict] = field(default_factory=list)


class Timers:
    """Named wall-clock timers; `seconds` holds the last step's time per phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        seconds, self.seconds = dict(self.seconds), defaultdict(float)
        return {f"time/{name}": value for name, value in seconds.items()}


class Driver:
    def __init__(self, recipe: Recipe) -> None:
        self.recipe = recipe
        cluster = recipe.cluster
        if not ray.is_initialized():
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        self.prompt_source = PromptSource(recipe.run.prompts, recipe.run.seed)
        model = recipe.model.model_dump()
        self.rollout = None
        if recipe.sol.enabled:
            self.rollout = WorkerGroup(
                RolloutWorker, cluster.rollout_workers, cluster.rollout_resources, cluster.max_restarts,
                model, recipe.sol.explore_precision, recipe.sol.quant_backend, cluster.torch_threads,
            )
        specs = [spec.model_dump() for spec in recipe.rewards.models]
        self.reward = WorkerGroup(RewardWorker, cluster.reward_workers, cluster.reward_resources, cluster.max_restarts, specs, recipe.rewards.retries, cluster.torch_threads)
        self.learner = WorkerGroup(LearnerWorker, 1 if cluster.remote_learners else 0, cluster.learner_resources, 0, recipe.model_dump(), cluster.torch_threads)
        self.weights_ref = None
        self.version = 0
        self.timers = Timers()
        self.reward_weights = np.array([spec.weight for spec in recipe.rewards.models])

    # --- phases ------------------------------------------------------------------------------

    def explore(self, prompts: list[str], step: int) -> list[list[ray.ObjectRef]]:
        """Per prompt, shards of N candidate images from the rollout workers (refs)."""
        sol, shards = self.recipe.sol, self.recipe.cluster.shards_per_prompt
        pool = np.array_split(np.arange(sol.pool_size), shards)
        refs = []
        for p, prompt in enumerate(prompts):
            refs.append([
                self.rollout.call(p * shards + s, "explore", [prompt] * len(js), [seed_for(self.recipe.run.seed, step, p, int(j)) for j in js], sol.explore_steps, "euler", self.version)
                for s, js in enumerate(pool)
            ])
        return refs

    def score(self, image_refs: list[ray.ObjectRef], prompts: list[list[str]]) -> np.ndarray:
        """Rewards [B, R] of the concatenated shards, scored as each shard lands."""
        pending = {ref: i for i, ref in enumerate(image_refs)}
        scores: list[np.ndarray | None] = [None] * len(image_refs)
        score_refs = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            score_refs[i] = self.reward.call(i, "score", ready[0], prompts[i])
        for i, ref in score_refs.items():
            scores[i] = ray.get(ref)
        return np.concatenate(scores)

    def select(self, pool_scores: np.ndarray) -> list[list[int]]:
        """Per prompt, the K candidate indices to regenerate (from the weighted proxy reward)."""
        k, mode = self.recipe.algorithm.group_size, self.recipe.sol.selection
        generator = torch.Generator().manual_seed(self.recipe.run.seed)
        return [
            select_contrastive(torch.from_numpy(np.nansum(scores * self.reward_weights, axis=1)), k, mode, generator).tolist()
            for scores in pool_scores
        ]

    # --- one iteration ------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        recipe, timer = self.recipe, self.timers
        P, K = recipe.algorithm.prompts_per_step, recipe.algorithm.group_size
        with timer("prompts"):
            prompts = self.prompt_source.batch(step, P)
        metrics: dict[str, float] = {}
        if recipe.sol.enabled:
            with timer("explore"):
                pool_refs = self.explore(prompts, step)
            with timer("score"):
                flat_refs = [ref for shards in pool_refs for ref in shards]
                shard_prompts = [[prompt] * n for prompt, n in self._shard_sizes(prompts)]
                pool_scores = self.score(flat_refs, shard_prompts).reshape(P, recipe.sol.pool_size, -1)
            with timer("select"):
                chosen = self.select(pool_scores)
            seeds = [[seed_for(recipe.run.seed, step, p, j) for j in chosen[p]] for p in range(P)]
            metrics["explore/reward_mean"] = float(np.nanmean(pool_scores[..., 0]))
        else:
            seeds = [[seed_for(recipe.run.seed, step, p, j) for j in range(K)] for p in range(P)]
        flat_prompts = [prompt for prompt in prompts for _ in range(K)]
        flat_seeds = [s for row in seeds for s in row]
        group_ids = [p for p in range(P) for _ in range(K)]
        with timer("regen"):
            regen_ref = self.learner.call(0, "regenerate", flat_prompts, flat_seeds)
        with timer("rescore"):
            rewards = ray.get(self.reward.call(0, "score", regen_ref, flat_prompts))
        with timer("update"):
            metrics |= ray.get(self.learner.call(0, "train", rewards, group_ids))
        if self.rollout is not None:
            with timer("sync"):
                self.sync_weights()
        metrics |= {f"reward/{spec.name}": float(np.nanmean(rewards[:, r])) for r, spec in enumerate(recipe.rewards.models)}
        metrics["train/zero_variance_groups"] = float(zero_variance_groups(torch.tensor(rewards[:, 0]), torch.tensor(group_ids)))
        return metrics | self.timers.pop()

    def sync_weights(self) -> None:
        """Learner rank 0 publishes the merged sampling weights once; every rollout worker re-quantizes."""
        self.weights_ref = self.learner.call(0, "explore_weights")
        self.version += 1
        ray.get(self.rollout.call_all("set_weights", self.weights_ref, self.version))

    def _shard_sizes(self, prompts: list[str]) -> list[tuple[str, int]]:
        sizes = [len(js) for js in np.array_split(np.arange(self.recipe.sol.pool_size), self.recipe.cluster.shards_per_prompt)]
        return [(prompt, n) for prompt in prompts for n in sizes]


def train(recipe: Recipe) -> RunResult:
    """Run recipe.run.steps iterations; returns the output directory and the per-step metrics."""
    driver = Driver(recipe)
    result = RunResult(Path(recipe.run.output_dir))
    for step in range(recipe.run.steps):
        result.history.append({"step": step} | driver.step(step))
    return result
