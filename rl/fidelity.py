"""Ranking fidelity: does the explore precision rank a prompt's seeds as the reference (BF16) does?

Inputs are rewards of the same seeds under both precisions, shaped [P, N]: row p is prompt p,
column j its seed j. Each metric is computed per prompt (row) and returns a float64 tensor [P].

  spearman              Pearson correlation of the rows' average ranks (tied values share their mean rank)
  kendall               Kendall's tau-b (tie-corrected): (C - D) / sqrt((n0 - n1) (n0 - n2))
  topk_overlap          |top-k(explore) & top-k(reference)| / k; ties go to the lower index
  best_worst_agreement  share of the k contrastive slots that land in the same half under both:
                        (|best_e & best_r| + |worst_e & worst_r|) / k, with the halves chosen by
                        rl.selection.select_contrastive "best_worst" (top k//2, bottom k - k//2)
A prompt whose rewards are all equal under either precision has no ranking: its spearman and kendall
are NaN, and `fidelity_summary` averages over the other prompts and counts it as undefined.
"""

from __future__ import annotations

import torch

from rl.selection import select_contrastive


def spearman(explore: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    explore, reference = _check_rewards(explore, reference)
    return _pearson(average_ranks(explore), average_ranks(reference))


def kendall(explore: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    explore, reference = _check_rewards(explore, reference)
    # Over ordered pairs (i, j) every count of tau-b is doubled, which leaves the ratio unchanged.
    sign_e = torch.sign(explore.unsqueeze(-1) - explore.unsqueeze(-2))
    sign_r = torch.sign(reference.unsqueeze(-1) - reference.unsqueeze(-2))
    concordant_minus_discordant = (sign_e * sign_r).sum((-2, -1))
    untied_e, untied_r = sign_e.abs().sum((-2, -1)), sign_r.abs().sum((-2, -1))
    return concordant_minus_discordant / torch.sqrt(untied_e * untied_r)


def topk_overlap(explore: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    explore, reference = _check_rewards(explore, reference, k)
    top_e = torch.sort(explore, dim=-1, descending=True, stable=True).indices[:, :k]
    top_r = torch.sort(reference, dim=-1, descending=True, stable=True).indices[:, :k]
    return _common(top_e, top_r) / k


def best_worst_agreement(explore: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    explore, reference = _check_rewards(explore, reference, k)
    subset_e = torch.stack([select_contrastive(row, k, "best_worst") for row in explore])
    subset_r = torch.stack([select_contrastive(row, k, "best_worst") for row in reference])
    best = k // 2
    same_half = _common(subset_e[:, :best], subset_r[:, :best]) + _common(subset_e[:, best:], subset_r[:, best:])
    return same_half / k


def fidelity_summary(explore: torch.Tensor, reference: torch.Tensor, k: int) -> dict:
    """Means over prompts, for logs: k is the contrastive subset size K; top-K overlap uses its best half."""
    rho, tau = spearman(explore, reference), kendall(explore, reference)
    prompts, seeds = rho.numel(), torch.as_tensor(explore).shape[-1]
    return {
        "prompts": prompts,
        "seeds": seeds,
        "k": k,
        "undefined_prompts": int(rho.isnan().sum()),
        "spearman": _nanmean(rho),
        "kendall": _nanmean(tau),
        "topk": k // 2,
        "topk_overlap": topk_overlap(explore, reference, k // 2).mean().item(),
        "best_worst_agreement": best_worst_agreement(explore, reference, k).mean().item(),
    }


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dim; a group of tied values gets the mean of the ranks it spans."""
    below = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1).to(x.dtype)
    tied = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1).to(x.dtype)  # counts the value itself
    return below + (tied + 1) / 2


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))


def _common(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, how many indices of a [P, m] also appear in b [P, m'] (indices within a row are distinct)."""
    return (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).double()


def _nanmean(x: torch.Tensor) -> float:
    return x.nanmean().item() if not x.isnan().all() else float("nan")


def _check_rewards(explore, reference, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    explore = torch.as_tensor(explore, dtype=torch.float64)
    reference = torch.as_tensor(reference, dtype=torch.float64)
    if explore.ndim != 2 or explore.shape != reference.shape:
        raise ValueError(f"rewards must both be [prompts, seeds]; got {tuple(explore.shape)} and {tuple(reference.shape)}")
    if not (explore.isfinite().all() and reference.isfinite().all()):
        raise ValueError("fidelity metrics need finite rewards; drop prompts whose reward is NaN (not applicable)")
    if k is not None and not 1 <= k <= explore.shape[-1]:
        raise ValueError(f"k must be in [1, {explore.shape[-1]}], got {k}")
    return explore, reference
