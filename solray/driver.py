"""The driver: one iteration of DESIGN.md section 1 per step, each phase in a named timer.

The driver holds ObjectRefs and scalars (rewards, advantages, metrics); images, latents and weights
go worker -> object store -> worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.groups import WorkerGroup
from actors.learners import LearnerGroup
from actors.workers import LearnerWorker, RewardWorker, RolloutWorker
from rewards import RewardError
from rewards.base import mean_and_se
from rl.advantages import group_advantages, weighted_reward, zero_variance_groups
from rl.checkpoint import CHECKPOINTS, latest_checkpoint, newest_valid_checkpoint, save_checkpoint
from rl.config import Recipe, RecipeError, recipe_changes
from rl.fidelity import spearman
from rl.selection import select_contrastive
from rl.trainer import NonFiniteTrainingError
from rollout.prompts import PromptSource, load_prompts
from rollout.samplers import EVAL_SEED_BASE, seed_for
from solray.tracking import Tracker

logger = logging.getLogger(__name__)
GRID_PROMPTS, GRID_SEEDS = 4, 4  # the image-grid probe: eval prompts x seeds, the same at every grid


@dataclass
class RunResult:
    output_dir: Path
    history: list[dict] = field(default_factory=list)
    evaluations: list[dict] = field(default_factory=list)


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
        check_cluster_fits(recipe)
        self.prompt_source = PromptSource(recipe.run.prompts, recipe.run.seed)
        model = recipe.model.model_dump()
        self.rollout = None
        if recipe.sol.enabled:
            self.rollout = WorkerGroup(
                RolloutWorker,
                cluster.rollout_workers,
                cluster.rollout_resources,
                cluster.max_restarts,
                model,
                recipe.sol.model_dump(),
                recipe.base_precision,
                cluster.rollout_resources.num_gpus,
                cluster.threads(cluster.rollout_resources),
            )
        specs = [spec.model_dump() for spec in recipe.rewards.models]
        self.reward = WorkerGroup(
            RewardWorker,
            cluster.reward_workers,
            cluster.reward_resources,
            cluster.max_restarts,
            specs,
            recipe.rewards.retries,
            recipe.rewards.on_reward_error,
            cluster.threads(cluster.reward_resources),
            recipe.eval_only_rewards,
        )
        self.learner = LearnerGroup(
            LearnerWorker,
            cluster.learners,
            cluster.remote_learners,
            cluster.learner_resources,
            recipe.model_dump(),
            cluster.threads(cluster.learner_resources),
        )
        self.base_fingerprint = ray.get(self.learner.call(0, "base_fingerprint"))
        self.weights_ref = None
        self.version = 0
        self.timers = Timers()
        self.fetched_bytes = 0
        self.reward_weights = torch.tensor([spec.weight for spec in recipe.rewards.models], dtype=torch.float32)

    # --- phases ------------------------------------------------------------------------------

    def explore(self, prompts: list[str], step: int) -> list[list[ray.ObjectRef]]:
        """Per prompt, shards of N candidate images from the rollout workers (refs)."""
        sol, shards = self.recipe.sol, self.recipe.cluster.shards_per_prompt
        pool = np.array_split(np.arange(sol.pool_size), shards)
        refs = []
        for p, prompt in enumerate(prompts):
            refs.append(
                [
                    self.rollout.call(
                        p * shards + s,
                        "explore",
                        [prompt] * len(js),
                        [seed_for(self.recipe.run.seed, step, p, int(j)) for j in js],
                        sol.explore_steps,
                        self.recipe.sampler.solver,
                        self.recipe.sampler.shift,
                        self.version,
                        self.catch_up_weights,
                    )
                    for s, js in enumerate(pool)
                ]
            )
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
            scores[i] = self.fetch(ref)
        return np.concatenate(scores)

    def select(self, pool_scores: np.ndarray, step: int) -> list[list[int]]:
        """Per prompt, the K candidate indices to regenerate (from the weighted proxy reward; a candidate
        no reward applies to stays NaN and is picked last)."""
        k, mode = self.recipe.algorithm.group_size, self.recipe.sol.selection
        generator = torch.Generator().manual_seed(seed_for(self.recipe.run.seed, step, len(pool_scores), 0))
        proxy = weighted_reward(torch.from_numpy(pool_scores.reshape(-1, pool_scores.shape[2])), self.reward_weights).reshape(
            pool_scores.shape[:2]
        )
        return [select_contrastive(row, k, mode, generator).tolist() for row in proxy]

    # --- one iteration ------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        """One iteration (DESIGN.md section 1); returns its metrics and per-phase seconds."""
        recipe, timer = self.recipe, self.timers
        P, K = recipe.algorithm.prompts_per_step, recipe.algorithm.group_size
        metrics: dict[str, float] = {}
        with timer("prompts"):
            prompts = self.prompt_source.batch(step, P)
        if recipe.sol.enabled:
            with timer("explore"):
                pool_refs = self.explore(prompts, step)
            with timer("score"):
                pool_scores, metrics["explore/failed_prompts"] = self.score_pool(pool_refs, prompts, step)
            with timer("select"):
                chosen = self.select(pool_scores, step)
            metrics["explore/reward_mean"] = float(np.nanmean(pool_scores[..., 0]))
        else:
            chosen = [list(range(K))] * P
        seeds = [[seed_for(recipe.run.seed, step, p, j) for j in chosen[p]] for p in range(P)]
        flat_prompts = [prompt for prompt in prompts for _ in range(K)]
        group_ids = [p for p in range(P) for _ in range(K)]
        with timer("regen"):
            regen_refs = self.learner.regenerate(flat_prompts, [s for row in seeds for s in row], step)
        with timer("rescore"):
            rewards = self.score(regen_refs, self.learner.split(flat_prompts))
            metrics |= unscored_shares(rewards, [spec.name for spec in recipe.rewards.models])
            rewards, metrics["rewards/failed_groups"] = self.check_rewards(rewards, flat_prompts, group_ids, step)
        with timer("advantage"):
            # Over the whole batch (global std), before the learners split it: QP balances one advantage per
            # reward; the weighted sum (DiffusionNFT's baseline) is one advantage of sum_k w_k R_k.
            table = torch.tensor(rewards, dtype=torch.float32)
            trained = table if recipe.balance.mode == "qp" else weighted_reward(table, self.reward_weights)
            advantages = group_advantages(
                trained,
                torch.tensor(group_ids),
                global_std=recipe.algorithm.global_std,
                drop_zero_variance=recipe.algorithm.drop_zero_variance,
            )
        with timer("update"):
            metrics |= self.fetch(self.learner.train(advantages.numpy()))[0]
        if self.rollout is not None:
            with timer("sync"):
                metrics["time/requantize"] = self.sync_weights(self.version + 1)
            metrics |= ranking_fidelity(np.stack([pool_scores[p, chosen[p], 0] for p in range(P)]), rewards[:, 0].reshape(P, K))
        metrics |= {f"reward/{spec.name}": float(np.nanmean(rewards[:, r])) for r, spec in enumerate(recipe.rewards.models)}
        metrics["train/zero_variance_groups"] = float(
            zero_variance_groups(trained if trained.ndim == 1 else trained[:, 0], torch.tensor(group_ids))
        )
        metrics["driver/fetched_bytes"], self.fetched_bytes = float(self.fetched_bytes), 0
        return metrics | self.timers.pop()

    def score_pool(self, pool_refs: list[list[ray.ObjectRef]], prompts: list[str], step: int) -> tuple[np.ndarray, int]:
        """Proxy rewards [P, N, R] of the explored pools, and how many prompts' pools failed to score."""
        shard_prompts = [[prompt] * n for prompt, n in self._shard_sizes(prompts)]
        scores = self.score([ref for shards in pool_refs for ref in shards], shard_prompts)
        pool_size = self.recipe.sol.pool_size
        scores, failed = self.check_rewards(
            scores, [prompt for prompt in prompts for _ in range(pool_size)], np.repeat(np.arange(len(prompts)), pool_size).tolist(), step
        )
        return scores.reshape(len(prompts), pool_size, -1), failed

    def sync_weights(self, version: int) -> float:
        """Learner rank 0 publishes the sampling adapter's LoRA factors once as `version`; every rollout worker
        merges them into its base weights and re-quantizes.

        Returns the slowest worker's load + re-quantization seconds.
        """
        self.weights_ref = self.learner.call(0, "explore_weights")
        self.version = version
        return max(self.fetch(ref) for ref in self.rollout.call_all("set_weights", self.weights_ref, self.version))

    @property
    def catch_up_weights(self) -> list[ray.ObjectRef] | None:
        """The current weights' ref in a list: Ray passes it through unfetched, for workers that must catch up."""
        return None if self.weights_ref is None else [self.weights_ref]

    def fetch(self, ref: ray.ObjectRef) -> Any:
        """ray.get for the driver, which may only hold scalars, metric dicts and [B, R] score tables."""
        value = ray.get(ref)
        self.fetched_bytes += _driver_sized(value)
        return value

    def check_rewards(self, rewards: np.ndarray, prompts: list[str], group_ids: list[int], step: int) -> tuple[np.ndarray, int]:
        """Apply rewards.on_reward_error to samples that got no reward (every column NaN).

        fail: raise naming the prompt; skip: set the samples' whole groups to NaN (advantages skip
        them) and return how many groups were dropped.
        """
        failed = np.isnan(rewards).all(axis=1)
        if not failed.any():
            return rewards, 0
        names = [spec.name for spec in self.recipe.rewards.models]
        if self.recipe.rewards.on_reward_error == "fail":
            first = int(np.argmax(failed))
            raise RewardError(
                f"step {step}: {int(failed.sum())} of {len(failed)} images got no reward from {names} "
                f"(first: prompt {prompts[first]!r}); set rewards.on_reward_error: skip to drop their groups instead"
            )
        groups = np.asarray(group_ids)
        dropped = np.unique(groups[failed])
        rewards = rewards.copy()
        rewards[np.isin(groups, dropped)] = np.nan
        logger.warning(
            "step %d: %d images got no reward from %s; skipped their %d prompt groups (rewards.on_reward_error: skip)",
            step,
            int(failed.sum()),
            names,
            len(dropped),
        )
        return rewards, len(dropped)

    def _shard_sizes(self, prompts: list[str]) -> list[tuple[str, int]]:
        sizes = [len(js) for js in np.array_split(np.arange(self.recipe.sol.pool_size), self.recipe.cluster.shards_per_prompt)]
        return [(prompt, n) for prompt in prompts for n in sizes]

    # --- checkpoints and image grids ------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop every actor and free the learners' placement group (a process may train again after)."""
        for group in (self.rollout, self.reward):
            for actor in [] if group is None else group.actors:
                ray.kill(actor)
        self.learner.shutdown()

    def save_checkpoint(self, steps_done: int) -> Path:
        """The learners' adapters, optimizer states and noise generators, and the run's position after `steps_done` iterations."""
        learner_states = ray.get(self.learner.call_all("checkpoint_state"))
        root = Path(self.recipe.run.output_dir) / CHECKPOINTS
        run_state = {
            "step": steps_done,
            "version": self.version,
            "recipe": self.recipe.public_dump(),
            "base_fingerprint": self.base_fingerprint,
        }
        return save_checkpoint(root, learner_states, run_state, self.recipe.checkpoint.keep)

    def restore(self, path: Path, learner_states: list[dict[str, Any]], run_state: dict[str, Any]) -> int:
        """Load the checkpoint read from `path` (rl.checkpoint.load_checkpoint) into the learners and bring the rollout
        workers to its weights; returns the step to continue at."""
        saved = run_state.get("base_fingerprint")  # None in checkpoints written before it was recorded
        if saved is not None and saved != self.base_fingerprint:
            raise RecipeError(
                f"{path} was trained on other base weights: model.path {self.recipe.model.path!r} now loads a transformer with "
                f"fingerprint {self.base_fingerprint}, the checkpoint's had {saved}. Its LoRA and optimizer state belong to "
                "those weights: point model.path at them again, or start a new run.output_dir"
            )
        if len(learner_states) != len(self.learner):
            # Optimizer states may be ZeRO shards, one per rank: they only fit a world of the same size.
            raise RecipeError(
                f"{path} holds the state of {len(learner_states)} learners, this run has {len(self.learner)} (cluster.learners)"
            )
        ray.get([self.learner.call(rank, "restore_state", state) for rank, state in enumerate(learner_states)])
        if self.rollout is not None and run_state["version"] > 0:
            self.sync_weights(run_state["version"])
            self.fetched_bytes = 0  # the restore's traffic belongs to no step
        return run_state["step"]

    def evaluate(self) -> dict[str, float]:
        """Probes of eval.adapter (the EMA of the trained LoRA, or the LoRA) with the eval protocol's sampler:
        the held-out eval.prompts (metrics eval/) and, with eval.train_prompts, the prompts the run trains
        on (eval_train/), each prompt with fixed eval seeds. Per probe: every training and eval.rewards
        reward's mean and standard error; with the tiny verifier also strict accuracy, overall and per task."""
        config = self.recipe.eval
        metrics = self.probe("eval", config.prompts, config.seeds_per_prompt)
        if config.train_prompts is not None:
            metrics |= self.probe("eval_train", config.train_prompts, config.train_seeds_per_prompt)
        return metrics

    def probe(self, prefix: str, source: str, seeds_per_prompt: int) -> dict[str, float]:
        config = self.recipe.eval
        prompt_list = load_prompts(source)
        prompts = [prompt for prompt in prompt_list for _ in range(seeds_per_prompt)]
        seeds = [EVAL_SEED_BASE + j for j in range(seeds_per_prompt)] * len(prompt_list)
        images_ref = self.learner.call(0, "sample_images", prompts, seeds, config.steps, config.solver)
        rewards = self.fetch(self.reward.call(0, "score", images_ref, prompts, True))
        names = [spec.name for spec in self.recipe.rewards.models] + list(config.rewards)
        metrics = {}
        for r, name in enumerate(names):
            metrics |= _mean_and_se(f"{prefix}/{name}", rewards[:, r])
        extra = self.fetch(self.reward.call(0, "eval_metrics", rewards, prompts))
        return metrics | {f"{prefix}/{key}": value for key, value in extra.items()}

    def grid_samples(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """A fixed probe, GRID_PROMPTS prompts (of eval.train_prompts when set: where training shows first, else
        eval.prompts) x GRID_SEEDS seeds, sampled with eval.adapter: images, prompts, first reward."""
        config = self.recipe.eval
        probe = PromptSource(config.train_prompts or config.prompts, self.recipe.run.seed).batch(0, GRID_PROMPTS)
        prompts = [prompt for prompt in probe for _ in range(GRID_SEEDS)]
        images_ref = self.learner.call(0, "sample_images", prompts, list(range(GRID_SEEDS)) * len(probe))
        rewards = self.fetch(self.reward.call(0, "score", images_ref, prompts))
        # The one place the driver fetches images: a few, every logging.grid_every steps.
        return ray.get(images_ref), prompts, rewards[:, 0]


def train(recipe: Recipe) -> RunResult:
    """Run recipe.run.steps iterations; with run.resume "auto", continue after output_dir's newest checkpoint.

    Before the first step: an evaluation and an image grid (grids/step_000000.png). After each step:
    its metrics row, an image grid every logging.grid_every steps and after the last one
    (grids/step_N.png: after N steps), and a checkpoint every checkpoint.every steps and after the
    last one (the grid's and the checkpoint's seconds show up in the next step's time/ keys). The row is written before the checkpoint, so a resumed run
    finds the rows of every step its checkpoint covers.
    """
    output_dir = Path(recipe.run.output_dir)
    latest = latest_checkpoint(output_dir / CHECKPOINTS)
    if latest is not None and recipe.run.resume == "never":
        raise FileExistsError(
            f"{output_dir} holds a checkpoint of an earlier run ({latest.name}): set run.resume=auto to continue it, or another run.output_dir"
        )
    latest, saved, unreadable = newest_valid_checkpoint(output_dir / CHECKPOINTS)
    for path, reason in unreadable:
        # Moved aside, not deleted (it may be worth a look), and out of the way of this run's own save of that step.
        aside = path.with_name(f"unreadable-{path.name}")
        os.rename(path, aside)
        logger.warning("skipping checkpoint %s: %s; moved to %s", path.name, reason, aside)
    if saved is not None and (changes := recipe_changes(saved[1]["recipe"], recipe)):
        raise RecipeError(
            f"{latest} was written by a run with another recipe ({'; '.join(changes)}); resuming would mix the two. "
            "Restore those values, or use another run.output_dir"
        )
    driver = Driver(recipe)
    tracker = None
    grid_every, checkpoint_every, eval_every = recipe.logging.grid_every, recipe.checkpoint.every, recipe.eval.every
    try:
        start = 0 if saved is None else driver.restore(latest, *saved)
        tracker = Tracker(recipe, start)
        if start == 0 and recipe.eval.enabled:
            tracker.log_eval(0, driver.evaluate())
        if start == 0 and grid_every:
            tracker.log_grid(0, *driver.grid_samples())
        for step in range(start, recipe.run.steps):
            try:
                row = driver.step(step)
            except FloatingPointError as error:  # NonFiniteTrainingError, or an explore copy whose calibration overflowed
                newest = latest_checkpoint(output_dir / CHECKPOINTS)
                kept = f"the newest checkpoint, {newest}, holds finite weights" if newest else "no checkpoint had been written"
                raise NonFiniteTrainingError(f"{getattr(error, 'cause', error)}. Training stopped in step {step + 1}; {kept}.") from None
            tracker.log({"step": step} | row)
            last = step + 1 == recipe.run.steps
            if recipe.eval.enabled and (last or (eval_every and (step + 1) % eval_every == 0)):
                with driver.timers("eval"):
                    tracker.log_eval(step + 1, driver.evaluate())
            if grid_every and ((step + 1) % grid_every == 0 or last):
                with driver.timers("grid"):
                    tracker.log_grid(step + 1, *driver.grid_samples())
            if (checkpoint_every and (step + 1) % checkpoint_every == 0) or last:
                with driver.timers("checkpoint"):
                    driver.save_checkpoint(step + 1)
    finally:
        if tracker is not None:
            tracker.close()
        driver.shutdown()
    return RunResult(output_dir, tracker.history, tracker.evaluations)


def check_cluster_fits(recipe: Recipe) -> None:
    """Refuse a recipe whose actors need more CPUs or GPUs than the Ray cluster has (Ray would wait forever)."""
    cluster = recipe.cluster
    groups = [(cluster.reward_workers, cluster.reward_resources)]
    if recipe.sol.enabled:
        groups.append((cluster.rollout_workers, cluster.rollout_resources))
    if cluster.remote_learners:
        groups.append((cluster.learners, cluster.learner_resources))
    available = ray.cluster_resources()
    for kind, key in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
        needed = sum(n * getattr(resources, kind) for n, resources in groups)
        if needed > available.get(key, 0.0) + 1e-9:
            raise ValueError(
                f"{recipe.run.name}: the actors need {needed:g} {key}s (cluster.*_workers x cluster.*_resources.{kind}) "
                f"but the Ray cluster has {available.get(key, 0.0):g}; lower the resources or the worker counts"
            )


def ranking_fidelity(explored: np.ndarray, regenerated: np.ndarray) -> dict[str, float]:
    """Mean Spearman over prompts between explore-precision and training-precision rewards [P, K] of
    the same seeds; prompts with a NaN or a constant reward row carry no ranking and are left out."""
    rho = spearman(torch.from_numpy(np.nan_to_num(explored)), torch.from_numpy(np.nan_to_num(regenerated)))
    valid = np.isfinite(explored).all(1) & np.isfinite(regenerated).all(1) & rho.isfinite().numpy()
    return {"explore/spearman_vs_regen": float(rho[torch.from_numpy(valid)].mean())} if valid.any() else {}


def _mean_and_se(key: str, values: np.ndarray) -> dict[str, float]:
    """{key: mean, key_se: standard error of the mean} over the finite values."""
    mean, se = mean_and_se(values)
    return {key: mean, f"{key}_se": se}


def unscored_shares(rewards: np.ndarray, names: list[str]) -> dict[str, float]:
    """Per reward, the share of a batch's images [B, R] it gave no score (NaN: not applicable, an unparsable
    VLM answer, or a failed call under on_reward_error "skip")."""
    return {f"rewards/{name}/unscored": float(np.isnan(rewards[:, r]).mean()) for r, name in enumerate(names)}


def _driver_sized(value: Any) -> int:
    """Bytes of a value the driver fetched; raises if it is an image or latent array."""
    if isinstance(value, dict):
        return sum(_driver_sized(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_driver_sized(v) for v in value)
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim > 2 or value.dtype in (np.uint8, torch.uint8):
            raise TypeError(
                f"the driver fetched a {tuple(value.shape)} {value.dtype} array: images and latents must stay in the object store"
            )
        return value.nbytes
    if value is None or isinstance(value, (bool, int, float, str, np.floating, np.integer)):
        return 8
    raise TypeError(f"the driver fetched a {type(value).__name__}: it only handles refs, scalars and score tables")
