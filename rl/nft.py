"""DiffusionNFT: online diffusion RL on the forward process (Zheng et al. 2025; DESIGN.md section 4).

Flow matching: x_t = (1 - t) x0 + t eps, the model predicts v = eps - x0, so x0 = x_t - t v.

Notation
  code            paper
  adv             A, group-normalised advantage
  r               r = optimality(A), probability that a sample is "positive"
  v_theta         v_theta(x_t, t), the trainable policy ("policy" LoRA adapter)
  v_old           v_old(x_t, t), the sampling policy ("old" adapter), no gradient
  v_ref           the reference (base model, LoRA disabled), for the KL term
  v_pos, v_neg    implicit policies v+ = beta v_theta + (1 - beta) v_old, v- = (1 + beta) v_old - beta v_theta
  err_pos/neg     x0+- - x0, with x0+- = x_t - t v+-
  w_pos, w_neg    adaptive weights w+- = stopgrad(mean|x0+- - x0|), clipped at >= 1e-5
  beta            beta, strength of the implicit guidance (1.0; 0.1 for multi-reward)
  loss_scale      multiplies mean(L) (5.0 in the reference code, equal to the advantage clip)
  kl_weight       weight of mean((v_theta - v_ref)^2) (1e-4)
  decay           eta, old-policy soft update theta_old <- eta theta_old + (1 - eta) theta
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def optimality(adv: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """r = clamp(clip(A, -c, c) / c / 2 + 0.5, 0, 1)."""
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def nft_loss(
    v_theta: torch.Tensor,
    v_old: torch.Tensor,
    x_t: torch.Tensor,
    x0: torch.Tensor,
    t: torch.Tensor,
    r: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """L = ( r mean((x0+ - x0)^2) / w+ + (1 - r) mean((x0- - x0)^2) / w- ) / beta, per sample [B]."""
    # fp32: squares of small bf16 errors lose most of their bits.
    v_theta, v_old, x_t, x0 = v_theta.float(), v_old.detach().float(), x_t.float(), x0.float()
    t = _per_sample(t.float(), x_t)
    v_pos = beta * v_theta + (1 - beta) * v_old
    v_neg = (1 + beta) * v_old - beta * v_theta
    err_pos = x_t - t * v_pos - x0
    err_neg = x_t - t * v_neg - x0
    positive = _mean_per_sample(err_pos**2) / adaptive_weight(err_pos)
    negative = _mean_per_sample(err_neg**2) / adaptive_weight(err_neg)
    return (r * positive + (1 - r) * negative) / beta


def adaptive_weight(x0_error: torch.Tensor) -> torch.Tensor:
    """w = stopgrad(mean|x0_hat - x0|), clipped at >= 1e-5, per sample [B]."""
    return _mean_per_sample(x0_error.detach().abs()).clamp_min(1e-5)


def velocity_kl(v_theta: torch.Tensor, v_ref: torch.Tensor) -> torch.Tensor:
    """KL surrogate mean((v_theta - v_ref)^2) per sample [B]; v_ref carries no gradient."""
    return _mean_per_sample((v_theta.float() - v_ref.detach().float()) ** 2)


def nft_objective(loss: torch.Tensor, kl: torch.Tensor, loss_scale: float = 5.0, kl_weight: float = 1e-4) -> torch.Tensor:
    """Batch loss = mean(L) * loss_scale + kl_weight * mean(KL)."""
    return loss.mean() * loss_scale + kl_weight * kl.mean()


def old_policy_decay(step: int, flat: int = 0, rate: float = 0.001, cap: float = 0.5) -> float:
    """eta = min(rate * (step - flat), cap) from step `flat` on, 0 before (defaults: eta = min(0.001 step, 0.5))."""
    return 0.0 if step < flat else min(rate * (step - flat), cap)


@torch.no_grad()
def soft_update_(old: Mapping[str, torch.Tensor], new: Mapping[str, torch.Tensor], decay: float) -> None:
    """theta_old <- eta theta_old + (1 - eta) theta, in place on `old` (same keys as `new`)."""
    if old.keys() != new.keys():
        raise KeyError(f"soft update needs the same parameter names; differing: {sorted(old.keys() ^ new.keys())[:5]}")
    for name, param in old.items():
        param.mul_(decay).add_(new[name].to(param.dtype), alpha=1 - decay)


def _per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t [B] -> [B, 1, ..., 1] so it scales each sample of `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1)))


def _mean_per_sample(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(1)
