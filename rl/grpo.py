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
"""

from __future__ import annotations

import torch

from rollout.sde import check_method, per_sample, sde_step

__all__ = ["gaussian_kl", "grpo_kl", "grpo_loss", "sde_step"]  # sde_step: re-exported, DESIGN.md's public API names it here


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
