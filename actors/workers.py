"""The three workers. Plain classes: a group runs them in-process, or wraps them with ray.remote.

Workers are thin: they hold a model and call rollout/, rewards/, quant/ and rl/ functions. Arrays
(images, latents, weights) are their arguments and results, so between workers they travel
through the object store and the driver only ever holds references to them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from quant import lora_merged_weights, quantize_policy, requantize
from rewards import RewardError, build_reward
from rl.advantages import group_advantages
from rl.balance import RewardBalancer
from rl.config import Recipe
from rl.trainer import NFTBatch, Trainer, TrainerSettings
from rollout import ModelConfig, load_policy
from rollout.policy import OLD_ADAPTER
from rollout.samplers import sample, timesteps


class StaleWeightsError(RuntimeError):
    """A rollout worker was asked to generate with weights other than the version it holds."""


class RolloutWorker:
    """An explore-precision copy of the policy; generates candidate pools with the ODE sampler."""

    def __init__(self, model: dict[str, Any], precision: str, backend: str, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.policy = quantize_policy(load_policy(ModelConfig(**model), "fp32"), precision, backend)

    @property
    def version(self) -> int:
        return self.policy.explore_state.version

    def set_weights(self, weights: dict[str, torch.Tensor], version: int) -> float:
        """Load merged weights of `version` and re-quantize; returns the seconds it took."""
        return requantize(self.policy, weights, version)

    def explore(self, prompts: list[str], seeds: list[int], steps: int, solver: str, version: int) -> np.ndarray:
        """uint8 images [B, H, W, 3], refusing to run on weights other than `version`."""
        if version != self.version:
            raise StaleWeightsError(f"rollout worker holds weights v{self.version}, asked to explore with v{version}")
        return sample(self.policy, prompts, seeds, steps, solver=solver).images

    def describe(self) -> dict[str, Any]:
        return self.policy.explore_state.to_dict()


class RewardWorker:
    """Hosts the recipe's reward models; scores a batch with every one of them."""

    def __init__(self, specs: list[dict[str, Any]], retries: int = 1, torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.rewards = [build_reward(spec["name"], **spec.get("kwargs", {})) for spec in specs]
        self.retries = retries

    def score(self, images: np.ndarray, prompts: list[str]) -> np.ndarray:
        """float64 [B, R]; a reward that keeps failing after `retries` retries raises RewardError."""
        columns = []
        for reward in self.rewards:
            for attempt in range(self.retries + 1):
                try:
                    columns.append(reward.score(images, prompts))
                    break
                except RewardError:
                    if attempt == self.retries:
                        raise
        return np.stack(columns, axis=1)


class LearnerWorker:
    """The trainable policy (LoRA on fp32/bf16 weights): regenerates the selected seeds, then trains on them.

    The regenerated x0 stays here between `regenerate` and `train`; only images leave.
    """

    def __init__(self, recipe: dict[str, Any], torch_threads: int = 1) -> None:
        torch.set_num_threads(torch_threads)
        self.recipe = Recipe.model_validate(recipe)
        algorithm, optim = self.recipe.algorithm, self.recipe.optim
        self.policy = load_policy(self.recipe.model, "fp32")
        self.policy.add_lora(algorithm.lora_rank, algorithm.lora_alpha, init_seed=self.recipe.run.seed)
        rewards = self.recipe.rewards.models
        balancer = None
        if len(rewards) > 1:
            balance = self.recipe.balance
            method = "qp" if balance.mode == "qp" else "weighted_sum"
            balancer = RewardBalancer(len(rewards), method, balance.solve_every, balance.ema, balance.floor, [r.weight for r in rewards])
        settings = TrainerSettings(
            lr=optim.lr,
            weight_decay=optim.weight_decay,
            grad_clip=optim.grad_clip,
            microbatch_size=algorithm.micro_batch,
            timestep_fraction=algorithm.nft.timestep_fraction,
            adv_clip=algorithm.nft.adv_clip,
            nft_beta=algorithm.nft.beta,
            loss_scale=algorithm.nft.loss_scale,
            kl_weight=algorithm.nft.kl_weight,
            old_decay_rate=algorithm.nft.old_eta_rate,
            old_decay_cap=algorithm.nft.old_eta_max,
        )
        self.sampler_timesteps = timesteps(self.recipe.sampler.steps, self.recipe.sampler.shift or self.policy.shift)
        self.trainer = Trainer(self.policy, settings, self.sampler_timesteps, balancer, seed=self.recipe.run.seed)
        self.regen: tuple[torch.Tensor, list[str]] | None = None

    def regenerate(self, prompts: list[str], seeds: list[int]) -> np.ndarray:
        """Sample the chosen seeds with the "old" (sampling) adapter at full steps; keep x0 for training."""
        sampler = self.recipe.sampler
        out = sample(self.policy, prompts, seeds, sampler.steps, solver=sampler.solver, shift=sampler.shift, adapter=OLD_ADAPTER, batch_size=32)
        self.regen = (out.x0, list(prompts))
        return out.images

    def train(self, rewards: np.ndarray, group_ids: list[int]) -> dict[str, float]:
        """Advantages from rewards [B, R] (per prompt group), then one NFT step on the kept regen batch."""
        if self.regen is None:
            raise RuntimeError("train() needs a regenerate() first: the learner trains on the x0 it regenerated")
        x0, prompts = self.regen
        scores = torch.tensor(rewards, dtype=torch.float32)  # a copy: arrays from the object store are read-only
        adv = group_advantages(
            scores if scores.shape[1] > 1 else scores[:, 0],
            torch.as_tensor(group_ids),
            global_std=self.recipe.algorithm.global_std,
            drop_zero_variance=self.recipe.algorithm.drop_zero_variance,
        )
        metrics = self.trainer.nft_step(NFTBatch(x0, prompts, adv))
        self.regen = None
        return metrics

    def explore_weights(self) -> dict[str, torch.Tensor]:
        """The sampling ("old") adapter merged into the base weights: what rollout workers re-quantize."""
        return {name: w.detach().clone() for name, w in lora_merged_weights(self.policy.transformer, OLD_ADAPTER).items()}
