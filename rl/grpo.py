"""Flow-GRPO's loss (Liu et al. 2025), also for Coefficients-Preserving Sampling (CPS; Wang & Yu 2025,
arXiv 2509.05952); DESIGN.md section 4. The SDE / CPS steps that sample the chains live in rollout.sde.

Notation
  code            paper
  mean, std       mu_theta and std of the Gaussian policy pi_theta(x_next | x_t)
  sigma           sigma_t = a sqrt(t / (1 - t)), the SDE's diffusion coefficient
  logp, logp_old  log pi_theta(x_next | x_t), and the same under the sampling policy
  ratio           exp(logp - logp_old)
  adv             A, clipped to [-adv_clip, adv_clip]
  clip_range      PPO's epsilon (1e-4 in Flow-GRPO)
  beta_kl         weight of the KL term mean((mu_theta - mu_ref)^2) / (2 s^2); as in the reference
                  code s = sigma_t for the SDE (not the step std) and s = std for CPS

The learner's step (`GRPO.train_step`, on a rl.trainer.Trainer):
  Trajectory of the SDE (or CPS) sampler + prompts + advantages [B]
  -> recompute log-probs of the first `timestep_fraction` of the recorded steps (or every step
     of the SDE window) under "policy" -> PPO-clip + KL -> clip -> AdamW -> "old" <- policy
  (the ratio divides by the sampler's log-probs, so the sampler must be the current policy)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import torch
from pydantic import Field

from rl.algorithm import Algorithm, Batch, flat_gradient, microbatches
from rl.schema import Section
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Conditioning
from rollout.samplers import seed_for
from rollout.sde import Trajectory, check_method, per_sample, sde_step, sde_window, step_log_prob

if TYPE_CHECKING:
    from rl.config import AlgorithmConfig, Recipe, SamplerConfig
    from rl.trainer import Trainer
    from rollout.policy import Policy
    from rollout.samplers import SampleOutput

__all__ = ["GRPO", "gaussian_kl", "grpo_kl", "grpo_loss", "sde_step"]  # sde_step: re-exported, DESIGN.md's public API names it here

GRPO_METRICS = ("loss/grpo", "grpo/kl", "grpo/approx_kl", "grpo/clipfrac")
SDE_WINDOW_STREAM = -1  # seed_for's prompt index of the SDE-window draw: no prompt has it


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_ref, std^2)) per dim = (mean - mean_ref)^2 / (2 std^2), averaged per sample [B]."""
    return ((mean.float() - mean_ref.detach().float()) ** 2 / (2 * std.float() ** 2)).flatten(1).mean(1)


def grpo_kl(
    method: str, mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor, t: float | torch.Tensor, t_next: float | torch.Tensor
) -> torch.Tensor:
    """mean((mu_theta - mu_ref)^2) / (2 s^2) per sample [B], s = sigma_t (SDE) or std (CPS)."""
    check_method(method)
    # Flow-GRPO divides by its std_dev_t, the diffusion coefficient sigma_t = std / sqrt(-dt), which
    # keeps beta_kl's scale independent of the step size; CPS's std_dev_t is the step std itself.
    scale = std / torch.sqrt(per_sample(t, mean) - per_sample(t_next, mean)) if method == "sde" else std
    return gaussian_kl(mean, mean_ref, scale)


def grpo_loss(
    logp: torch.Tensor,
    logp_old: torch.Tensor,
    adv: torch.Tensor,
    kl: torch.Tensor | None = None,
    clip_range: float = 1e-4,
    adv_clip: float = 5.0,
    beta_kl: float = 0.04,
) -> torch.Tensor:
    """L = max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps)) + beta_kl KL, per sample [B]."""
    adv = adv.clamp(-adv_clip, adv_clip)
    ratio = torch.exp(logp - logp_old.detach())
    pg_loss1 = -adv * ratio
    pg_loss2 = -adv * ratio.clamp(1 - clip_range, 1 + clip_range)
    policy_loss = torch.maximum(pg_loss1, pg_loss2)
    return policy_loss if kl is None else policy_loss + beta_kl * kl


class GRPOConfig(Section):
    """The recipe's algorithm.grpo: Flow-GRPO's (and CPS's) settings (DESIGN.md section 4)."""

    noise_level: float = Field(0.7, gt=0, description="SDE noise level a (CPS: eta)")
    clip_range: float = Field(1e-4, gt=0, description="PPO ratio clip")
    beta_kl: float = Field(0.04, ge=0, description="KL weight against the reference (adapters off)")
    cps: bool = Field(False, description="coefficients-preserving SDE step instead of Flow-GRPO's")
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="without an SDE window: train the first int(steps * fraction) steps of each chain, in order"
    )
    sde_window_size: int = Field(
        0, ge=0, description="steps of the SDE window (0 = every step stochastic); with one, only the window is stochastic and trained"
    )
    sde_window_range: tuple[Annotated[int, Field(ge=0)], Annotated[int, Field(ge=0)]] | None = Field(
        None, description="[lo, hi) where the window may start and end, its start drawn per (run seed, step); None = (0, sampler.steps)"
    )
    adv_clip: float = Field(5.0, gt=0, description="advantage clip inside the PPO loss")


class GRPO(Algorithm):
    """Flow-GRPO: trains on the trajectories of the SDE (or CPS) sampler (algorithm.grpo)."""

    name = "grpo"
    config_class = GRPOConfig

    def __init__(self, algorithm: AlgorithmConfig) -> None:
        """algorithm: the recipe's section (micro_batch, grpo)."""
        self.config = algorithm.grpo
        self.micro_batch = algorithm.micro_batch

    @classmethod
    def from_recipe(cls, recipe: Recipe, policy: Policy) -> GRPO:
        return cls(recipe.algorithm)

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Sol-RL needs an ODE regeneration; the SDE window is GRPO's and has to fit in the sampler's steps."""
        chosen, grpo, steps = recipe.algorithm.name == cls.name, recipe.algorithm.grpo, recipe.sampler.steps
        if recipe.sol.enabled and chosen:
            raise ValueError("sol.enabled with algorithm.name 'grpo' is not supported: Sol-RL regenerates with the ODE sampler; use nft")
        if grpo.sde_window_range is not None and not grpo.sde_window_size:
            raise ValueError("algorithm.grpo.sde_window_range is set but sde_window_size is 0: give the window a size, or drop the range")
        if not grpo.sde_window_size:
            return
        if not chosen:
            raise ValueError("algorithm.grpo.sde_window_size applies to algorithm.name 'grpo' only")
        low, high = grpo.sde_window_range or (0, steps)
        if not low < high <= steps or grpo.sde_window_size > high - low:
            raise ValueError(
                f"algorithm.grpo.sde_window_range {grpo.sde_window_range} must satisfy lo < hi <= sampler.steps ({steps}) "
                f"and hold sde_window_size ({grpo.sde_window_size}) steps"
            )
        if grpo.cps and high - grpo.sde_window_size >= steps - 1:
            raise ValueError(
                f"algorithm.grpo.sde_window_range {grpo.sde_window_range}: a CPS window may hold only the last step, "
                "which is deterministic (its std is 0): keep the latest start below sampler.steps - 1"
            )

    def sampling(self, sampler: SamplerConfig, seed: int, step: int) -> dict[str, Any]:
        """The SDE (or CPS) sampler, stochastic inside the SDE window drawn for (run seed, step) when the recipe has one."""
        window = None
        if self.config.sde_window_size:
            window = sde_window(
                seed_for(seed, step, SDE_WINDOW_STREAM, 0), self.config.sde_window_size, self.config.sde_window_range or (0, sampler.steps)
            )
        return {"solver": "cps" if self.config.cps else "sde", "noise_level": self.config.noise_level, "sde_window": window}

    def kept(self, out: SampleOutput) -> Trajectory:
        """The sampled chains."""
        return out.trajectory

    def train_step(self, trainer: Trainer, batch: Batch) -> dict[str, float]:
        """One Flow-GRPO optimizer step over the recorded stochastic steps `plan` picks, on a Trajectory of B chains."""
        config = self.config
        adv = torch.as_tensor(batch.advantages, dtype=torch.float32)
        if adv.ndim != 1:
            raise ValueError(f"GRPO trains one reward (advantages [B]), got shape {tuple(adv.shape)}; multi-reward balancing is NFT's")
        keep = torch.isfinite(adv)
        samples = int(trainer.counts_by_learner(int(keep.sum())).sum())
        if samples == 0:
            return {"train/skipped": 1.0}
        device, params = trainer.policy.device, list(trainer.params.values())
        adv = adv[keep].to(device)
        trajectory = batch.samples.index(keep.to(batch.samples.latents.device)).to(device)
        cond = trainer.policy.encode_prompts(batch.prompts).index(keep.cpu())
        chosen = self.plan(trajectory)
        share = 1.0 / (samples * len(chosen))  # weight of one (sample, step) in the mean over every learner's batch
        gradient = torch.zeros(sum(p.numel() for p in params), device=device)
        totals = torch.zeros(len(GRPO_METRICS), dtype=torch.float64)
        for i in chosen.tolist():
            for part in microbatches(len(adv), self.micro_batch):
                loss, kl, log_ratio = self._losses(trainer.policy, trajectory, i, part, cond.index(part), adv[part])
                gradient += flat_gradient(loss.sum() * share, params, retain_graph=False)
                totals += share * torch.tensor(
                    [
                        loss.detach().sum().item(),
                        0.0 if kl is None else kl.sum().item(),
                        0.5 * (log_ratio**2).sum().item(),
                        ((log_ratio.exp() - 1).abs() > config.clip_range).sum().item(),
                    ],
                    dtype=torch.float64,
                )
        (totals,) = trainer.all_reduce(totals)
        metrics = dict(zip(GRPO_METRICS, totals.tolist())) | trainer.apply_finite_gradient(gradient)
        trainer.policy.copy_adapter(TRAINABLE_ADAPTER, OLD_ADAPTER)
        return metrics | {"train/samples": float(samples)}

    def plan(self, trajectory: Trajectory) -> torch.Tensor:
        """The recorded steps GRPO trains, in order, as Flow-GRPO does (scripts/train_sd3.py, train_sd3_fast.py):
        with an SDE window every step of the window; without one the first int(S * timestep_fraction)
        steps of the S-step chain (never the last step into t = 0 at Flow-GRPO's 0.99)."""
        steps = trajectory.stochastic_steps()
        if trajectory.window is not None:
            return steps
        return steps[: max(1, int(trajectory.num_steps * self.config.timestep_fraction))]

    def _losses(
        self, policy: Policy, trajectory: Trajectory, i: int, part: slice, cond: Conditioning, adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-sample loss of recorded step i under "policy", with its KL term and log-ratio (both detached)."""
        config = self.config
        x, x_next, logp_old = trajectory.latents[i, part], trajectory.latents[i + 1, part], trajectory.log_probs[i, part]
        t, t_next = float(trajectory.timesteps[i]), float(trajectory.timesteps[i + 1])
        t_batch = torch.full((len(x),), t, device=x.device)
        with policy.adapter(TRAINABLE_ADAPTER):
            v = policy.velocity(x, t_batch, cond)
        logp, mean, std = step_log_prob(trajectory.method, x, v, x_next, t, t_next, trajectory.noise_level)
        kl = None
        if config.beta_kl > 0:
            with torch.no_grad(), policy.adapter(None):
                v_ref = policy.velocity(x, t_batch, cond)
            _, mean_ref, _ = step_log_prob(trajectory.method, x, v_ref, x_next, t, t_next, trajectory.noise_level)
            kl = grpo_kl(trajectory.method, mean, mean_ref, std, t, t_next)
        loss = grpo_loss(logp, logp_old, adv, kl, config.clip_range, config.adv_clip, config.beta_kl)
        return loss, None if kl is None else kl.detach(), logp.detach() - logp_old
