"""The driver: one iteration of DESIGN.md section 1 per step, each phase in a named timer.

The driver holds ObjectRefs and scalars (rewards, advantages, metrics); images, latents and weights
go worker -> object store -> worker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from actors.groups import REAL_WORKERS, LearnerGroup, RewardGroup, WorkerClasses
from rewards import RewardError
from rl.advantages import group_advantages, weighted_reward, zero_variance_groups
from rl.checkpoint import CHECKPOINTS, check_restorable, latest_checkpoint, newest_valid_checkpoint, run_state, save_checkpoint
from rl.config import Recipe, RecipeError, recipe_changes
from rl.trainer import NonFiniteTrainingError
from rollout.loading import model_family
from rollout.prompts import PromptSource, load_prompts
from rollout.samplers import seeds_for
from solray.evaluation import evaluate, grid_samples
from solray.exploration import OnPolicy, SolExploration, apply_reward_failures
from solray.tracking import Tracker

logger = logging.getLogger(__name__)


class ActorLostError(RuntimeError):
    """An actor died and could not be restarted (a learner, or one past cluster.max_restarts); the run stopped."""


class RewardFailedError(RuntimeError):
    """A reward still failed after rewards.retries, with rewards.on_reward_error fail; the run stopped."""


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
    """The iteration's named phases over the actor groups: prompts, choose (exploration), regen, rescore,
    advantage, update, then exploration's after-update work (Sol-RL: the weight sync)."""

    def __init__(self, recipe: Recipe, workers: WorkerClasses = REAL_WORKERS) -> None:
        """Start the groups of `recipe.cluster`, running `workers` (the real worker classes unless a simulator substitutes its own)."""
        self.recipe = recipe
        check_inputs(recipe)
        if not ray.is_initialized():
            ray.init(address=recipe.cluster.address, include_dashboard=False, log_to_driver=False)
        check_cluster_fits(recipe)
        self.prompt_source = PromptSource(recipe.run.prompts, recipe.run.seed)
        self.timers = Timers()
        self.fetched_bytes = 0
        self.fetch_lock = threading.Lock()  # fetch also runs on exploration's thread (algorithm.pipeline_depth 1)
        self.reward_names = [spec.name for spec in recipe.rewards.models]
        self.reward_weights = torch.tensor([spec.weight for spec in recipe.rewards.models], dtype=torch.float32)
        started = []  # the groups to stop if a later one fails to start
        try:
            # Largest GPU shares first: Ray places fractional GPUs first-fit, so reward workers (0.25 GPU) created
            # before the rollout workers (0.75) would split GPUs that a rollout worker then cannot fit on.
            self.learners = LearnerGroup(recipe, workers.learner)
            started.append(self.learners)
            self.exploration = (
                SolExploration(recipe, self.learners, self.score, self.fetch, self.timers, workers, self.prompts)
                if recipe.sol.enabled
                else OnPolicy(recipe)
            )
            started.append(self.exploration)
            self.rewards = RewardGroup(recipe, workers.reward)
            started.append(self.rewards)
            self.base_fingerprint = ray.get(self.learners.base_fingerprint())  # after every group started: their loads overlap
        except BaseException:
            for group in reversed(started):
                group.shutdown()
            raise

    def step(self, step: int) -> dict[str, float]:
        """One iteration (DESIGN.md section 1); returns its metrics and per-phase seconds."""
        recipe, timer = self.recipe, self.timers
        P, K = recipe.algorithm.prompts_per_step, recipe.algorithm.group_size
        with timer("prompts"):
            prompts = self.prompts(step)
        chosen, metrics = self.exploration.choose(prompts, step)
        flat_prompts = [prompt for prompt in prompts for _ in range(K)]
        group_ids = [p for p in range(P) for _ in range(K)]
        with timer("regen"):
            seeds = seeds_for(recipe.run.seed, step, np.repeat(np.arange(P), K), np.concatenate(chosen))
            regen_refs = self.learners.regenerate(flat_prompts, seeds, step)
        with timer("rescore"):
            rewards = self.score(regen_refs, self.learners.split(flat_prompts))
            metrics |= unscored_shares(rewards, self.reward_names)
            rewards, metrics["rewards/failed_groups"] = apply_reward_failures(recipe, rewards, flat_prompts, group_ids, step)
        with timer("advantage"):
            trained, advantages = self.advantages(rewards, group_ids)
        with timer("update"):
            metrics |= self.fetch(self.learners.train(advantages.numpy()))[0]  # every rank's step must finish; their metrics are equal
        metrics |= self.exploration.after_update(chosen, rewards)
        metrics |= {f"reward/{name}": float(np.nanmean(rewards[:, r])) for r, name in enumerate(self.reward_names)}
        metrics["train/zero_variance_groups"] = float(
            zero_variance_groups(trained if trained.ndim == 1 else trained[:, 0], torch.tensor(group_ids))
        )
        metrics["driver/fetched_bytes"], self.fetched_bytes = float(self.fetched_bytes), 0
        return metrics | self.timers.pop()

    def prompts(self, step: int) -> list[str]:
        """Iteration `step`'s P prompts (a function of the run seed and the step alone)."""
        return self.prompt_source.batch(step, self.recipe.algorithm.prompts_per_step)

    def advantages(self, rewards: np.ndarray, group_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(the rewards trained on, their group advantages) over the whole batch (global std), before the learners split it:
        QP balances one advantage per reward; the weighted sum (DiffusionNFT's baseline) is one advantage of sum_k w_k R_k."""
        table = torch.tensor(rewards, dtype=torch.float32)
        trained = table if self.recipe.balance.mode == "qp" else weighted_reward(table, self.reward_weights)
        algorithm = self.recipe.algorithm
        return trained, group_advantages(
            trained, torch.tensor(group_ids), global_std=algorithm.global_std, drop_zero_variance=algorithm.drop_zero_variance
        )

    def score(self, image_refs: list[ray.ObjectRef], prompts: list[list[str]]) -> np.ndarray:
        """Rewards [B, R] of the concatenated shards, each scored as it lands."""
        # Every shard's scoring is submitted at once with its images as a ref argument: Ray starts each call when
        # its images exist and moves them from the rollout worker to the reward worker, never through the driver.
        # (Waiting on the pending shards once per landed one was quadratic in the shards: 5-7% of the step at 64
        # rollout workers in bench/scale_sim.py.)
        return np.concatenate(self.fetch([self.rewards.score(i, ref, prompts[i]) for i, ref in enumerate(image_refs)]))

    def fetch(self, ref: ray.ObjectRef | list[ray.ObjectRef]) -> Any:
        """ray.get for the driver, which may only hold scalars, metric dicts and [B, R] score tables."""
        value = ray.get(ref)
        with self.fetch_lock:
            self.fetched_bytes += _driver_sized(value)
        return value

    def evaluate(self) -> dict[str, float]:
        """solray.evaluation.evaluate of the run's current adapter."""
        return evaluate(self.recipe, self.learners, self.rewards, self.fetch)

    def grid_samples(self) -> tuple[np.ndarray, list[str], np.ndarray]:
        """solray.evaluation.grid_samples of the run's current adapter."""
        return grid_samples(self.recipe, self.learners, self.rewards, self.fetch)

    def save_checkpoint(self, steps_done: int) -> Path:
        """The learners' adapters and trainer states (optimizer, EMA, balancer, step), and the run's position after `steps_done` iterations."""
        learner_states = ray.get(self.learners.checkpoint_states())
        state = run_state(steps_done, self.exploration.version, self.exploration.state(), self.recipe, self.base_fingerprint)
        return save_checkpoint(Path(self.recipe.run.output_dir) / CHECKPOINTS, learner_states, state, self.recipe.checkpoint.keep)

    def restore(self, path: Path, learner_states: list[dict[str, Any]], state: dict[str, Any]) -> int:
        """Load the checkpoint read from `path` (rl.checkpoint.load_checkpoint) into the learners and bring exploration
        to its weights; returns the step to continue at."""
        check_restorable(path, state, learner_states, self.base_fingerprint, self.recipe)
        ray.get(self.learners.restore(learner_states))
        self.exploration.restore(state["version"], state.get("exploration", {}))
        self.fetched_bytes = 0  # the restore's traffic belongs to no step
        return state["step"]

    def shutdown(self) -> None:
        """Stop every actor and free the learners' placement group (a process may train again after)."""
        self.exploration.shutdown()
        self.rewards.shutdown()
        self.learners.shutdown()


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
    where = "before the first step"
    try:
        start = 0 if saved is None else driver.restore(latest, *saved)
        tracker = Tracker(recipe, start)
        if start == 0 and recipe.eval.enabled:
            tracker.log_eval(0, driver.evaluate())
        if start == 0 and grid_every:
            tracker.log_grid(0, *driver.grid_samples())
        for step in range(start, recipe.run.steps):
            where = f"in step {step + 1}"
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
    except ray.exceptions.RayActorError as error:  # a learner (never restarted) or an actor past cluster.max_restarts
        raise ActorLostError(actor_lost_message(error, where, output_dir, recipe.run.resume)) from None
    except RewardError as error:  # raised in a reward worker (Ray's wrapper is a RewardError too) or by the driver
        cause = str(getattr(error, "cause", error)).strip().splitlines()[0]
        raise RewardFailedError(f"{cause}; training stopped {where}, {how_to_continue(output_dir, recipe.run.resume)}") from None
    finally:
        if tracker is not None:
            tracker.close()
        driver.shutdown()
    return RunResult(output_dir, tracker.history, tracker.evaluations)


def actor_lost_message(error: Exception, where: str, output_dir: Path, resume: str) -> str:
    """What stopped the run, and how to continue it from its newest checkpoint."""
    return (
        f"an actor of the run died {where} ({str(error).strip().splitlines()[0]}); training stopped, {how_to_continue(output_dir, resume)}"
    )


def how_to_continue(output_dir: Path, resume: str) -> str:
    """How a stopped run continues from its newest checkpoint (or that it has none)."""
    newest = latest_checkpoint(output_dir / CHECKPOINTS)
    if newest is None:
        return "no checkpoint had been written"
    if resume == "auto":
        return f"run the same command again: run.resume auto continues from {newest}"
    return f"run it again with run.resume=auto to continue from {newest}"


def check_inputs(recipe: Recipe) -> None:
    """Refuse a prompt source the driver will read, and on a local run a model path, that does not load, before any
    actor starts (the recipe schema cannot: production recipes name files that exist only where they are launched; on
    a cluster the model may exist only on the GPU nodes, whose workers then say what is wrong)."""
    evaluated = recipe.eval.enabled or recipe.logging.grid_every > 0
    sources = {"run.prompts": recipe.run.prompts} | (
        {"eval.prompts": recipe.eval.prompts, "eval.train_prompts": recipe.eval.train_prompts} if evaluated else {}
    )
    try:
        if _single_machine(recipe):
            model_family(recipe.model)
    except ValueError as error:
        raise RecipeError(f"model.path: {error}") from None
    for key, source in sources.items():
        try:
            if source is not None:
                load_prompts(source)
        except ValueError as error:
            raise RecipeError(f"{key}: {error}") from None


def _single_machine(recipe: Recipe) -> bool:
    """Whether every actor runs on this machine: a Ray started here, or one already joined that has a single node."""
    if ray.is_initialized():
        return sum(node["Alive"] for node in ray.nodes()) == 1
    return recipe.cluster.address is None and "RAY_ADDRESS" not in os.environ


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
            raise RecipeError(
                f"{recipe.run.name}: the actors need {needed:g} {key}s (cluster.*_workers x cluster.*_resources.{kind}) "
                f"but the Ray cluster has {available.get(key, 0.0):g}; lower the resources or the worker counts"
            )


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
