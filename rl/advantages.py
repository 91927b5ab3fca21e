"""Group-relative advantages (Flow-GRPO, DiffusionNFT; DESIGN.md section 4).

Notation
  code                 paper
  rewards [B] / [B,R]  R, one row per sample, one column per reward
  group_ids [B]        the prompt a sample was generated from (its group)
  group mean           mean_prompt(R)
  std                  std of R over the batch (global_std=True) or over the sample's group
  adv                  A = (R - mean_prompt(R)) / (std + eps)

NaN rewards mean "not applicable": they stay NaN in A and are left out of every mean and std.
std is the population std (ddof 0), as Flow-GRPO's np.std.

A group is zero-variance when all of its finite rewards are equal (a lone finite reward included).
Its advantages are exactly 0, or NaN with drop_zero_variance=True. NaN is the "no training signal"
flag the trainers already honour, so a dropped group leaves the loss. Keeping A = 0 is not the same
thing for DiffusionNFT: r = optimality(0) = 0.5 still trains both implicit policies towards x0.
"""

from __future__ import annotations

import numpy as np
import torch

from rewards import RewardError


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    global_std: bool = True,
    eps: float = 1e-4,
    drop_zero_variance: bool = False,
) -> torch.Tensor:
    """A = (R - mean_prompt(R)) / (std + eps), per reward column; NaN in -> NaN out."""
    rewards = _as_float(rewards)
    columns = rewards if rewards.ndim == 2 else rewards[:, None]
    group_index = _group_index(group_ids, columns.shape[0])
    adv = torch.stack([_column_advantages(column, group_index, global_std, eps, drop_zero_variance) for column in columns.T], dim=1)
    return adv if rewards.ndim == 2 else adv[:, 0]


def weighted_reward(rewards: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """R = sum_k w_k R_k [B] (DiffusionNFT's multi-reward score); NaN rewards left out and the rest rescaled.

    DiffusionNFT (flow_grpo/rewards.py, multi_score) sums the weighted raw scores, and its group
    advantage of R is the multi-reward baseline. A sample some reward does not apply to (NaN) gets
    the weighted mean of the rewards that do, times sum_k w_k (MARBLE's multi_score takes that mean),
    so that it stays on the scale of the others; NaN when no reward with a non-zero weight applies.
    """
    rewards = _as_float(rewards)
    if rewards.ndim != 2 or weights.shape != (rewards.shape[1],):
        raise ValueError(f"weighted_reward needs rewards [B, K] and weights [K], got {tuple(rewards.shape)} and {tuple(weights.shape)}")
    weights = weights.to(rewards.dtype)
    valid = ~torch.isnan(rewards)
    applicable = (valid * weights).sum(1)
    total = (torch.where(valid, rewards, 0.0) * weights).sum(1)
    return torch.where(applicable != 0, total * (weights.sum() / applicable), torch.nan)


def zero_variance_groups(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Number of groups whose finite rewards are all equal: a 0-dim tensor for [B] rewards, [R] for [B, R]."""
    rewards = _as_float(rewards)
    columns = rewards if rewards.ndim == 2 else rewards[:, None]
    group_index = _group_index(group_ids, columns.shape[0])
    counts = torch.stack([_group_stats(column, group_index)[2].sum() for column in columns.T])
    return counts if rewards.ndim == 2 else counts[0]


def _as_float(rewards: torch.Tensor) -> torch.Tensor:
    rewards = torch.as_tensor(rewards)
    if rewards.ndim not in (1, 2):
        raise ValueError(f"rewards must be [B] or [B, R], got shape {tuple(rewards.shape)}")
    return rewards if rewards.is_floating_point() else rewards.float()


def _group_index(group_ids: torch.Tensor, batch: int) -> torch.Tensor:
    """Group ids (any integers) -> dense indices 0..G-1."""
    group_ids = torch.as_tensor(group_ids)
    if group_ids.shape != (batch,):
        raise ValueError(f"group_ids must have shape [{batch}], got {tuple(group_ids.shape)}")
    return torch.unique(group_ids, return_inverse=True)[1]


def _group_stats(values: torch.Tensor, group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group: NaN-skipping mean [G], population variance [G], zero-variance flag [G]."""
    num_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    finite = ~torch.isnan(values)
    zeros = torch.zeros(num_groups, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, group_index, finite.to(values.dtype))
    mean = zeros.index_add(0, group_index, torch.where(finite, values, 0.0)) / count  # 0/0 = NaN for all-NaN groups
    squared_dev = torch.where(finite, (values - mean[group_index]) ** 2, 0.0)
    var = zeros.index_add(0, group_index, squared_dev) / count
    # Exact max == min, not var == 0: the mean of equal floats can differ from them in the last bit.
    high = torch.full_like(zeros, -torch.inf).scatter_reduce(0, group_index, torch.where(finite, values, -torch.inf), "amax")
    low = torch.full_like(zeros, torch.inf).scatter_reduce(0, group_index, torch.where(finite, values, torch.inf), "amin")
    constant = (count > 0) & (high == low)
    return mean, var, constant


def _column_advantages(
    values: torch.Tensor, group_index: torch.Tensor, global_std: bool, eps: float, drop_zero_variance: bool
) -> torch.Tensor:
    mean, var, constant = _group_stats(values, group_index)
    finite = ~torch.isnan(values)
    if global_std:
        std = values[finite].std(correction=0) if finite.any() else values.new_tensor(torch.nan)
    else:
        std = var.sqrt()[group_index]
    adv = (values - mean[group_index]) / (std + eps)
    flat = constant[group_index] & finite
    return torch.where(flat, torch.nan if drop_zero_variance else 0.0, adv)


def drop_failed_groups(
    rewards: np.ndarray, group_ids: list[int], on_error: str, prompts: list[str], reward_names: list[str], step: int
) -> tuple[np.ndarray, int, int]:
    """rewards.on_reward_error for samples that got no reward (every column of their row NaN).

    Returns (rewards, failed samples, dropped groups): "skip" sets the failed samples' whole groups to NaN
    (advantages skip them); "fail" raises RewardError naming the step and the first failed prompt.
    """
    failed = np.isnan(rewards).all(axis=1)
    if not failed.any():
        return rewards, 0, 0
    if on_error == "fail":
        first = int(np.argmax(failed))
        raise RewardError(
            f"step {step}: {int(failed.sum())} of {len(failed)} images got no reward from {reward_names} "
            f"(first: prompt {prompts[first]!r}); set rewards.on_reward_error: skip to drop their groups instead"
        )
    groups = np.asarray(group_ids)
    dropped = np.unique(groups[failed])
    rewards = rewards.copy()
    rewards[np.isin(groups, dropped)] = np.nan
    return rewards, int(failed.sum()), len(dropped)
