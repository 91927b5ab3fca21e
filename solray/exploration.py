"""How an iteration picks the K seeds per prompt that the learners regenerate and train on.

OnPolicy (sol.enabled false): the first K seeds; the learners' samples are the policy's own.
SolExploration (Sol-RL): rollout workers explore N candidates per prompt at explore precision, the
reward group scores them as they land, the weighted proxy reward picks the contrastive K
(rl.selection), and after each update the workers receive the new LoRA factors and re-quantize.
With algorithm.pipeline_depth 1, step t+1's pool is explored and scored (on a driver thread) while
the learners regenerate and train step t: with the weights of step t, one version behind those
that regenerate it. A checkpoint keeps that pool's scores, so a resumed run selects as the
uninterrupted one did.

Both have the same methods, so the driver's step has no Sol-RL branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from actors.groups import LearnerGroup, RolloutGroup, WorkerClasses
from actors.workers import ExploreRequest
from rl.advantages import drop_failed_groups, weighted_reward
from rl.config import Recipe
from rl.fidelity import spearman
from rl.selection import select_contrastive
from rollout.samplers import seed_for, seeds_for

logger = logging.getLogger(__name__)
# (image refs, each ref's prompts) -> rewards [B, R] of the concatenated shards
Scorer = Callable[[list[ray.ObjectRef], list[list[str]]], np.ndarray]


class OnPolicy:
    """No exploration: every prompt trains on its first K seeds (the baseline)."""

    version = 0  # of the weights explore copies hold: there are none

    def __init__(self, recipe: Recipe) -> None:
        self.group_size = recipe.algorithm.group_size

    def choose(self, prompts: list[str], step: int) -> tuple[list[list[int]], dict[str, float]]:
        """Per prompt, the candidate indices to regenerate; and metrics."""
        return [list(range(self.group_size)) for _ in prompts], {}

    def after_update(self, chosen: list[list[int]], rewards: np.ndarray) -> dict[str, float]:
        """Work after the optimizer step, given the regenerated batch's rewards [P * K, R]; its metrics."""
        return {}

    def state(self) -> dict[str, Any]:
        """What a checkpoint must keep to continue exploration exactly (JSON values)."""
        return {}

    def restore(self, version: int, state: dict[str, Any]) -> None:
        """Bring exploration to the weights of `version` and to a `state` from `state()` (a resume)."""

    def shutdown(self) -> None:
        """Stop what exploration started."""


@dataclass
class ExploredPool:
    """A step's pool, explored with the weights of `version`: proxy rewards [P, N, R] and the prompts whose pools failed to score."""

    step: int
    version: int
    scores: np.ndarray
    failed: int

    def to_json(self) -> dict[str, Any]:
        scores = [[[None if np.isnan(v) else float(v) for v in row] for row in prompt] for prompt in self.scores]
        return {"step": self.step, "version": self.version, "scores": scores, "failed": self.failed}

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> ExploredPool:
        scores = np.array(state["scores"], dtype=np.float64)  # null -> NaN
        return cls(state["step"], state["version"], scores, state["failed"])


class SolExploration:
    """Sol-RL's explore / score / select before regeneration, and the weight sync after the update."""

    def __init__(
        self,
        recipe: Recipe,
        learners: LearnerGroup,
        score: Scorer,
        fetch: Callable[[ray.ObjectRef], Any],
        timers,
        workers: WorkerClasses,
        prompts_for: Callable[[int], list[str]],
    ) -> None:
        """score and fetch: the driver's (thread-safe: a pipelined pool is scored on a driver thread); prompts_for(step):
        the step's prompts (a pipelined pool is explored one step ahead)."""
        self.recipe, self.learners, self.score, self.fetch, self.timers = recipe, learners, score, fetch, timers
        self.prompts_for = prompts_for
        self.ahead: Future[ExploredPool] | None = None  # pipeline_depth 1: the next step's pool, being explored and scored
        self.scorer = ThreadPoolExecutor(1, thread_name_prefix="explore-ahead") if recipe.algorithm.pipeline_depth else None
        self.rollout = RolloutGroup(recipe, workers.rollout, learners.placement if recipe.cluster.placement == "colocated" else None)
        self.reward_weights = torch.tensor([spec.weight for spec in recipe.rewards.models], dtype=torch.float32)
        self.weights_ref: ray.ObjectRef | None = None  # the current LoRA factors, for workers that must catch up
        self.version = 0
        self.pool_scores: np.ndarray | None = None  # [P, N, R] of the step being trained

    def choose(self, prompts: list[str], step: int) -> tuple[list[list[int]], dict[str, float]]:
        if self.ahead is not None:
            with self.timers("explore_wait"):  # the part of the pool's exploring and scoring that training did not hide
                pool = self.ahead.result()
            self.ahead = None
            if pool.step != step:  # a bug, not a user error: the pool ahead is always the next step's
                raise RuntimeError(f"the pool explored ahead is step {pool.step}'s, not step {step}'s")
        else:
            with self.timers("explore"):
                shards = self.explore(prompts, step)
            with self.timers("score"):
                pool = self.score_pool(shards, prompts, step, self.version)
        if self.scorer is not None and step + 1 < self.recipe.run.steps:
            self.explore_ahead(step + 1)
        self.pool_scores = pool.scores
        with self.timers("select"):
            chosen = self.select(pool.scores, step)
        metrics = {
            "explore/failed_prompts": pool.failed,
            "explore/reward_mean": float(np.nanmean(pool.scores[..., 0])),
            "explore/staleness": float(self.version - pool.version),
        }
        return chosen, metrics

    def explore_ahead(self, step: int) -> None:
        """Start exploring `step`'s pool with the current weights (its requests queue on the rollout workers before the
        coming weight sync), and score it on the driver's thread as its shards land."""
        prompts = self.prompts_for(step)
        shards = self.explore(prompts, step)
        self.ahead = self.scorer.submit(self.score_pool, shards, prompts, step, self.version)

    def explore(self, prompts: list[str], step: int) -> list[tuple[ray.ObjectRef, list[str]]]:
        """The step's P x N candidates, in (prompt, candidate) order, as rollout_workers x cluster.explore_shards_per_worker
        contiguous shards (at most one per candidate), shard i on worker i % n: per shard, the ref of its images and their prompts.

        Shards span prompts so that the driver's calls grow with the workers, not with the prompts (a call per prompt
        cost the driver 5-7% of the step at 64 rollout workers in bench/scale_sim.py)."""
        sol, seed, sampler = self.recipe.sol, self.recipe.run.seed, self.recipe.sampler
        candidates = np.arange(len(prompts) * sol.pool_size)
        count = min(len(self.rollout) * self.recipe.cluster.explore_shards_per_worker, len(candidates))
        shards = []
        for i, shard in enumerate(np.array_split(candidates, count)):
            prompt_indices, js = np.divmod(shard, sol.pool_size)
            shard_prompts = [prompts[p] for p in prompt_indices.tolist()]
            seeds = seeds_for(seed, step, prompt_indices, js)
            request = ExploreRequest(shard_prompts, seeds, sol.explore_steps, sampler.solver, sampler.shift, self.version, self.weights_ref)
            shards.append((self.rollout.explore(i, request), shard_prompts))
        return shards

    def score_pool(self, shards: list[tuple[ray.ObjectRef, list[str]]], prompts: list[str], step: int, version: int) -> ExploredPool:
        """The proxy rewards [P, N, R] of the pools explored (`explore`'s shards) for `step` with the weights of `version`."""
        scores = self.score([ref for ref, _ in shards], [shard_prompts for _, shard_prompts in shards])
        pool_size = self.recipe.sol.pool_size
        pool_prompts, pool_groups = [prompt for prompt in prompts for _ in range(pool_size)], np.repeat(np.arange(len(prompts)), pool_size)
        scores, failed = apply_reward_failures(self.recipe, scores, pool_prompts, pool_groups.tolist(), step)
        return ExploredPool(step, version, scores.reshape(len(prompts), pool_size, -1), failed)

    def select(self, pool_scores: np.ndarray, step: int) -> list[list[int]]:
        """Per prompt, the K candidate indices to regenerate (from the weighted proxy reward; a candidate
        no reward applies to stays NaN and is picked last)."""
        k, mode = self.recipe.algorithm.group_size, self.recipe.sol.selection
        generator = torch.Generator().manual_seed(seed_for(self.recipe.run.seed, step, len(pool_scores), 0))
        proxy = weighted_reward(torch.from_numpy(pool_scores.reshape(-1, pool_scores.shape[2])), self.reward_weights)
        return [select_contrastive(row, k, mode, generator).tolist() for row in proxy.reshape(pool_scores.shape[:2])]

    def after_update(self, chosen: list[list[int]], rewards: np.ndarray) -> dict[str, float]:
        """Sync the new weights to the rollout workers; how the explore precision ranked the chosen seeds."""
        with self.timers("sync"):
            metrics = {"time/requantize": self.sync_weights(self.version + 1)}
        P, K = len(chosen), self.recipe.algorithm.group_size
        explored = np.stack([self.pool_scores[p, chosen[p], 0] for p in range(P)])
        return metrics | ranking_fidelity(explored, rewards[:, 0].reshape(P, K))

    def sync_weights(self, version: int) -> float:
        """Learner rank 0 publishes the sampling adapter's LoRA factors once as `version`; every rollout worker
        merges them into its base weights and re-quantizes. Returns the slowest worker's seconds for both."""
        self.weights_ref = self.learners.explore_weights()
        self.version = version
        return max(self.fetch(self.rollout.set_weights(self.weights_ref, version)))

    def state(self) -> dict[str, Any]:
        """With a pool explored ahead: its scores (waited for), so that a resume selects from the same pool."""
        return {} if self.ahead is None else {"explored_ahead": self.ahead.result().to_json()}

    def restore(self, version: int, state: dict[str, Any]) -> None:
        if version > 0:
            self.sync_weights(version)
        if "explored_ahead" in state:
            self.ahead = Future()
            self.ahead.set_result(ExploredPool.from_json(state["explored_ahead"]))

    def shutdown(self) -> None:
        if self.scorer is not None:
            self.scorer.shutdown(wait=False, cancel_futures=True)
        self.rollout.shutdown()


def apply_reward_failures(
    recipe: Recipe, rewards: np.ndarray, prompts: list[str], group_ids: list[int], step: int
) -> tuple[np.ndarray, int]:
    """rl.advantages.drop_failed_groups under the recipe's rewards.on_reward_error, logged; (rewards, dropped groups)."""
    names = [spec.name for spec in recipe.rewards.models]
    rewards, failed, dropped = drop_failed_groups(rewards, group_ids, recipe.rewards.on_reward_error, prompts, names, step)
    if dropped:
        logger.warning(
            "step %d: %d images got no reward from %s; skipped their %d prompt groups (rewards.on_reward_error: skip)",
            step,
            failed,
            names,
            dropped,
        )
    return rewards, dropped


def ranking_fidelity(explored: np.ndarray, regenerated: np.ndarray) -> dict[str, float]:
    """Mean Spearman over prompts between explore-precision and training-precision rewards [P, K] of
    the same seeds; prompts with a NaN or a constant reward row carry no ranking and are left out."""
    rho = spearman(torch.from_numpy(np.nan_to_num(explored)), torch.from_numpy(np.nan_to_num(regenerated)))
    valid = np.isfinite(explored).all(1) & np.isfinite(regenerated).all(1) & rho.isfinite().numpy()
    return {"explore/spearman_vs_regen": float(rho[torch.from_numpy(valid)].mean())} if valid.any() else {}
