"""The three workers. Plain classes with keyword-only constructors taking the recipe: a group
(actors.groups, actors.learners) runs them in-process, or wraps them with ray.remote.

Workers are thin: they hold a model and call rollout/, rewards/, quant/ and rl/ functions. Arrays
(images, latents, weights) are their arguments and results, so between workers they travel
through the object store and the driver only ever holds references to them.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from actors.learners import DeepSpeedTrainer, free_address, join_world, learner_rows
from quant import DelayedScaling, linear_weights, lora_update, merge_lora_update, quantize_policy, requantize
from rewards import RewardError, build_reward
from rl.algorithm import Batch
from rl.algorithms import ALGORITHMS
from rl.balance import RewardBalancer
from rl.checkpoint import adapter_state_dict, load_adapter_state_dict, lora_config, weights_fingerprint
from rl.config import Recipe
from rl.trainer import Trainer
from rollout import load_policy
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER
from rollout.samplers import sample

SAMPLE_BATCH = 32  # images per forward pass when a worker samples: bounds activation memory whatever a call's size


class StaleWeightsError(RuntimeError):
    """A rollout worker was asked to generate with weights other than the version it holds."""


def worker_device(num_gpus: float) -> torch.device:
    """cuda:0 (Ray shows an actor only its own GPUs) when the recipe gives the worker GPUs, else the CPU."""
    if num_gpus == 0:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"the recipe gives this worker num_gpus={num_gpus}, but torch sees no CUDA device here (a CPU build of torch, or no GPU on the node)"
        )
    return torch.device("cuda", 0)


@dataclass(frozen=True)
class ExploreRequest:
    """One explore shard: the candidates (prompts[i], seeds[i]) sampled with the weights of `version`.

    weights: the ref of that version's LoRA factors, for a worker restarted after a crash (it holds the
    initial weights) to catch up; inside the request, Ray passes it unfetched to workers that need none.
    """

    prompts: list[str]
    seeds: list[int]
    steps: int
    solver: str
    shift: float | None
    version: int
    weights: ray.ObjectRef | None = None


class RolloutWorker:
    """An explore-precision copy of the policy; generates candidate pools with the ODE sampler."""

    def __init__(self, *, recipe: Recipe) -> None:
        """The recipe's model and sol sections (explore precision, quantization backend and coverage, activation scaling);
        the base weights load in the learners' precision (Recipe.base_precision), so that merged updates equal theirs."""
        cluster, sol = recipe.cluster, recipe.sol
        torch.set_num_threads(cluster.threads(cluster.rollout_resources))
        source = load_policy(recipe.model, recipe.base_precision, worker_device(cluster.rollout_resources.num_gpus))
        # The LoRA-targeted base weights, in host memory: a sync then ships only LoRA factors.
        self.base_weights = linear_weights(source.transformer, source.lora_target_modules)
        delayed = DelayedScaling(sol.amax_history_len, sol.amax_compute_algo) if sol.activation_scaling == "delayed" else None
        self.policy = quantize_policy(
            source,
            sol.explore_precision,
            sol.quant_backend,
            skip_modules=sol.skip_modules,
            min_dim=sol.min_dim,
            keep_patterns=sol.keep_high_precision,
            delayed=delayed,
            allow_fp8=sol.allow_fp8,
        )

    @property
    def version(self) -> int:
        return self.policy.explore_state.version

    def set_weights(self, update: dict[str, torch.Tensor], version: int) -> float:
        """Merge the LoRA factors of `version` (`quant.lora_update`) into the base weights and re-quantize; returns the seconds both took."""
        if version <= self.version:
            raise StaleWeightsError(f"refusing weights of version {version}: the rollout worker already holds version {self.version}")
        start = time.perf_counter()
        merged = merge_lora_update(self.base_weights, update, self.policy.device)
        return time.perf_counter() - start + requantize(self.policy, merged, version)

    def explore(self, request: ExploreRequest) -> np.ndarray:
        """uint8 images [B, H, W, 3] of the request's candidates, sampled with the weights of request.version.

        A worker restarted after a crash holds the initial weights and catches up from request.weights;
        any other mismatch (a request older than the weights held) is refused.
        """
        if request.weights is not None and request.version > self.version:
            self.set_weights(ray.get(request.weights), request.version)
        if request.version != self.version:
            raise StaleWeightsError(f"rollout worker holds weights v{self.version}, asked to explore with v{request.version}")
        return sample(
            self.policy, request.prompts, request.seeds, request.steps, solver=request.solver, shift=request.shift, batch_size=SAMPLE_BATCH
        ).images

    def describe(self) -> dict[str, Any]:
        """The explore copy's quantization report, version and timings, the worker's pid and placement group (hex id or None)."""
        placement = ray.get_runtime_context().get_placement_group_id() if ray.is_initialized() else None
        return self.policy.explore_state.to_dict() | {"pid": os.getpid(), "placement_group": placement}


class RewardWorker:
    """Hosts the recipe's reward models; scores a batch with every one of them."""

    def __init__(self, *, recipe: Recipe) -> None:
        """The training rewards (rewards.models, with their retries and on_reward_error) and those only evaluation
        scores (Recipe.eval_only_rewards)."""
        cluster = recipe.cluster
        torch.set_num_threads(cluster.threads(cluster.reward_resources))
        self.rewards = [build_reward(spec.name, **spec.kwargs) for spec in recipe.rewards.models]
        self.eval_rewards = [build_reward(name) for name in recipe.eval_only_rewards]
        self.retries = recipe.rewards.retries
        self.on_error = recipe.rewards.on_reward_error

    def describe(self) -> dict[str, Any]:
        """The hosted rewards' names and the worker's pid."""
        return {
            "rewards": [reward.name for reward in self.rewards],
            "eval_rewards": [reward.name for reward in self.eval_rewards],
            "pid": os.getpid(),
        }

    def score(self, images: np.ndarray, prompts: list[str], evaluation: bool = False) -> np.ndarray:
        """float64 [B, R], R the training rewards (then, with evaluation, the eval-only ones). A reward that still
        fails after `retries` retries raises RewardError, or with on_error "skip" gives a NaN column that the
        driver counts and drops (rewards.on_reward_error)."""
        columns = []
        for reward in self.rewards + (self.eval_rewards if evaluation else []):
            for attempt in range(self.retries + 1):
                try:
                    columns.append(reward.score(images, prompts))
                    break
                except RewardError:
                    if attempt < self.retries:
                        continue
                    if self.on_error == "fail":
                        raise
                    columns.append(np.full(len(prompts), np.nan))
        return np.stack(columns, axis=1)

    def eval_metrics(self, scores: np.ndarray, prompts: list[str]) -> dict[str, float]:
        """Each reward's extra evaluation metrics (Reward.eval_metrics) from its column of an evaluation's scores [B, R]."""
        metrics: dict[str, float] = {}
        for reward, column in zip(self.rewards + self.eval_rewards, scores.T):
            extra = reward.eval_metrics(column, prompts)
            if clash := extra.keys() & metrics.keys():
                raise ValueError(f"reward {reward.name!r} reports eval metrics {sorted(clash)} that another reward reports too")
            metrics |= extra
        return metrics


class LearnerWorker:
    """The trainable policy (LoRA on fp32/bf16 weights): regenerates the selected seeds, then trains on them.

    What training needs (NFT: x0; GRPO: the sampled trajectory) stays here between `regenerate` and
    `train`; only images leave. Alone it trains with the plain Trainer; after `init_distributed` it
    is one rank of a learner world (actors.learners) and works on its rows of every batch.
    """

    def __init__(self, *, recipe: Recipe) -> None:
        torch.set_num_threads(recipe.cluster.threads(recipe.cluster.learner_resources))
        self.recipe = recipe
        algorithm = self.recipe.algorithm
        self.policy = load_policy(
            self.recipe.model, self.recipe.base_precision, worker_device(self.recipe.cluster.learner_resources.num_gpus)
        )
        self._base_fingerprint = weights_fingerprint(self.policy.transformer)  # before LoRA wraps the linears
        self.policy.add_lora(algorithm.lora_rank, algorithm.lora_alpha, init_seed=self.recipe.run.seed)
        if algorithm.gradient_checkpointing:
            self.policy.transformer.enable_gradient_checkpointing()
        balance = self.recipe.balance
        # The weighted sum reaches the learner as one advantage column (the driver combines the rewards).
        balancer = (
            RewardBalancer(
                len(self.recipe.rewards.models),
                solve_every=balance.solve_every,
                ema=balance.ema,
                floor=balance.floor,
                amortized=balance.amortized,
            )
            if balance.mode == "qp"
            else None
        )
        self.algorithm = ALGORITHMS[algorithm.name].from_recipe(self.recipe, self.policy)
        self.trainer = Trainer(
            self.policy, optim=self.recipe.optim, evaluation=self.recipe.eval, balancer=balancer, seed=self.recipe.run.seed
        )
        self.rank, self.world_size = 0, 1
        # (what the algorithm kept, prompts, rows, whole-batch size) of this learner's rows of the last regenerate()
        self.regen: tuple[Any, list[str], slice, int] | None = None

    def base_fingerprint(self) -> str:
        """rl.checkpoint.weights_fingerprint of the base transformer as loaded: a resume refuses other base weights."""
        return self._base_fingerprint

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a free port: where rank 0 hosts the learner world's rendezvous."""
        return free_address()

    def init_distributed(self, rank: int, world_size: int, master_addr: str, master_port: int) -> None:
        """Join the learner world as `rank`; the optimizer step moves onto a DeepSpeed engine (ZeRO stage cluster.zero_stage)."""
        join_world(rank, world_size, master_addr, master_port)
        self.rank, self.world_size = rank, world_size
        self.trainer = DeepSpeedTrainer(
            self.policy,
            optim=self.recipe.optim,
            evaluation=self.recipe.eval,
            balancer=self.trainer.balancer,
            seed=self.recipe.run.seed,
            micro_batch=self.recipe.algorithm.micro_batch,
            zero_stage=self.recipe.cluster.zero_stage,
        )

    def regenerate(self, prompts: list[str], seeds: list[int], step: int) -> np.ndarray:
        """Sample this learner's rows of iteration `step`'s batch with the "old" (sampling) adapter at full steps;
        uint8 images [B_r, H, W, 3].

        What is sampled and kept is the algorithm's (rl.algorithm): NFT keeps x0 from the recipe's ODE solver;
        GRPO keeps the trajectory of the SDE (or CPS) sampler, stochastic inside its SDE window.
        """
        sampler = self.recipe.sampler
        rows = learner_rows(len(prompts), self.rank, self.world_size)
        out = sample(
            self.policy,
            prompts[rows],
            seeds[rows],
            sampler.steps,
            shift=sampler.shift,
            adapter=OLD_ADAPTER,
            batch_size=SAMPLE_BATCH,
            **self.algorithm.sampling(sampler, self.recipe.run.seed, step),
        )
        self.regen = (self.algorithm.kept(out), list(prompts[rows]), rows, len(prompts))
        return out.images

    def train(self, advantages: np.ndarray) -> dict[str, float]:
        """One optimizer step on the kept regen batch, given the whole batch's advantages [B] or [B, R]; this learner trains its rows."""
        if self.regen is None:
            raise RuntimeError("train() needs a regenerate() first: the learner trains on the samples it regenerated")
        samples, prompts, rows, batch_size = self.regen
        if len(advantages) != batch_size:
            raise ValueError(f"advantages for {len(advantages)} samples, but the regenerated batch has {batch_size}")
        adv = torch.tensor(advantages[rows], dtype=torch.float32)  # a copy: arrays from the object store are read-only
        metrics = self.algorithm.train_step(self.trainer, Batch(samples, prompts, adv))
        self.regen = None
        return metrics

    def explore_weights(self) -> dict[str, torch.Tensor]:
        """The sampling ("old") adapter's LoRA factors: rollout workers merge them into their base weights and re-quantize."""
        return lora_update(self.policy.transformer, OLD_ADAPTER)

    def sample_images(self, prompts: list[str], seeds: list[int], steps: int | None = None, solver: str | None = None) -> np.ndarray:
        """uint8 images of the adapter eval.adapter names, the EMA of the trainable one or that one itself (grids,
        evaluation); the recipe's sampler unless steps/solver are given. No state changes."""
        sampler = self.recipe.sampler
        weights = self.trainer.ema.swapped_into(self.trainer.params) if self.recipe.eval.adapter == "ema" else contextlib.nullcontext()
        with weights:
            return sample(
                self.policy,
                prompts,
                seeds,
                steps or sampler.steps,
                solver=solver or sampler.solver,
                shift=sampler.shift,
                adapter=TRAINABLE_ADAPTER,
                batch_size=SAMPLE_BATCH,
            ).images

    def checkpoint_state(self) -> dict[str, Any]:
        """Both adapters and the trainable one's EMA (peft keys), their LoRA config and the trainer state: what rl.checkpoint writes."""
        ema = {name.replace(f".{TRAINABLE_ADAPTER}.", "."): weight.cpu() for name, weight in self.trainer.ema.weights.items()}
        return {
            "adapters": {name: adapter_state_dict(self.policy, name) for name in (TRAINABLE_ADAPTER, OLD_ADAPTER)},
            "ema_lora": ema,
            "lora_config": lora_config(self.policy, TRAINABLE_ADAPTER),
            "trainer": self.trainer.state_dict(),
        }

    def restore_state(self, state: dict[str, Any]) -> None:
        """Load a checkpoint_state (as rl.checkpoint.load_checkpoint returns it)."""
        for name, weights in state["adapters"].items():
            load_adapter_state_dict(self.policy, name, weights)
        self.trainer.load_state_dict(state["trainer"])
