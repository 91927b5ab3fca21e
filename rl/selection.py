"""Contrastive subset selection: which K of a prompt's N explored seeds are regenerated (Sol-RL).

Notation
  code     paper
  scores   proxy rewards of the N candidates of one prompt (NVFP4 explore stage)
  k        K, the regenerated subset size (24 of N = 96 in Sol-RL)

Modes
  best_worst       top k//2 and bottom k - k//2 (Sol-RL's default); best first (descending),
                   then worst (ascending); the two halves never share an index
  random           k uniformly at random (the ablation without selection)
  extremes_random  the single best and the single worst, then k - 2 uniformly from the rest
  mean_deviation   the k scores farthest from the prompt's mean score, |s - mean(s)|

Ties go to the lower index. Random modes need a torch.Generator so that a run is reproducible.
NaN scores (reward not applicable, or failed) carry no ranking information: every mode chooses
among the finite scores first, and NaN-scored candidates only fill the slots left when fewer than
k scores are finite, in index order. So the result always has k indices.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

MODES = ("best_worst", "random", "extremes_random", "mean_deviation")
RANDOM_MODES = ("random", "extremes_random")


def select_contrastive(scores: torch.Tensor, k: int, mode: str = "best_worst", generator: torch.Generator | None = None) -> torch.Tensor:
    """Indices [k] of the candidates to regenerate, chosen by `mode` from the proxy scores [N]."""
    scores = torch.as_tensor(scores)
    if scores.ndim != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    if mode not in MODES:
        raise ValueError(f"unknown selection mode {mode!r}; valid modes: {', '.join(MODES)}")
    if not 0 <= k <= scores.numel():
        raise ValueError(f"cannot select k={k} of N={scores.numel()} candidates")
    if mode in RANDOM_MODES and generator is None:
        raise ValueError(f"mode {mode!r} needs a torch.Generator so that the selection is reproducible")
    finite = torch.nonzero(~torch.isnan(scores)).flatten()
    missing = torch.nonzero(torch.isnan(scores)).flatten()
    take = min(k, finite.numel())
    chosen = finite[_SELECTORS[mode](scores[finite].double(), take, generator)]
    return torch.cat([chosen, missing[: k - take]])


def _best_worst(scores: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Top k//2 by score, then bottom k - k//2 of the rest; stable sorts break ties by lower index."""
    best = torch.sort(scores, descending=True, stable=True).indices[: k // 2]
    ascending = torch.sort(scores, stable=True).indices
    worst = ascending[~torch.isin(ascending, best)][: k - k // 2]
    return torch.cat([best, worst])


def _random(scores: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randperm(scores.numel(), generator=generator)[:k]


def _extremes_random(scores: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """Best and worst (keeps the group's reward range), then k - 2 uniformly from the middle."""
    extremes = _best_worst(scores, min(k, 2), generator)
    rest = torch.nonzero(~torch.isin(torch.arange(scores.numel()), extremes)).flatten()
    middle = rest[torch.randperm(rest.numel(), generator=generator)[: k - extremes.numel()]]
    return torch.cat([extremes, middle])


def _mean_deviation(scores: torch.Tensor, k: int, generator: torch.Generator | None) -> torch.Tensor:
    """The k largest |s - mean(s)|."""
    deviation = (scores - scores.mean()).abs()
    return torch.sort(deviation, descending=True, stable=True).indices[:k]


_SELECTORS: dict[str, Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]] = {
    "best_worst": _best_worst,
    "random": _random,
    "extremes_random": _extremes_random,
    "mean_deviation": _mean_deviation,
}
