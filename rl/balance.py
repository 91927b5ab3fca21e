"""MARBLE multi-reward balancing: a min-norm QP over normalised per-reward gradients (MGDA);
DESIGN.md section 4. Reference: aim-uofa/MARBLE at 1bf9543, train.py and pareto_balancer/.

Notation
  code        paper
  grads       G [K, D]; row k is g_k, the gradient of reward k's NFT loss (flattened LoRA parameters),
              each a mean over the samples reward k applies to (MARBLE's loss mask)
  usable      g_k finite and non-zero; the others get weight 0 and stay out of every sum
  norms       n_k = ||g_k|| of the last full step (0 where unusable)
  unit        gh_k = g_k / ||g_k||
  gram        Gh Gh^T [K, K]
  weights     a, solving min_a 1/2 a^T (Gh Gh^T) a  s.t. sum a = 1, a >= floor (over usable rewards)
  direction   (sum_k a_k gh_k) * mean_k ||g_k||, the balanced update (the KL gradient is added by the trainer)
  ema         a <- ema a + (1 - ema) a_solved between amortised solves (0.7)
  cosines     cos(g_k, applied update), MARBLE's conflict diagnostic

Amortised steps (between full solves) back-propagate one NFT loss on a combined advantage:
  marble      A_c = sum_k a_k nan_to_num(A_k), loss scale 1: MARBLE's code. The weights were solved
              for unit gradients and here weigh raw ones, so the reward with the largest gradient
              norm dominates.
  normalized  b_k = a_k mean(n) / n_k; sample i weighs C_i = sum_k b_k / N_k over the rewards that apply
              to it (N_k of them in the batch) and trains A_c = sum_k (b_k / N_k) A_ik / C_i; the KL
              term keeps its plain mean. The NFT loss is affine in A inside the advantage clip, so
              this back-propagates sum_k b_k g_k = (sum_k a_k gh_k) mean(n): the full step's
              direction (each g_k a mean over its N_k samples), with the last full step's norms.
"""

from __future__ import annotations

import torch

AMORTIZED = ("marble", "normalized")
_MAX_ITERATIONS = 2000
_TOLERANCE = 1e-12


def min_norm_weights(grads: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """a = argmin_{sum a = 1, a >= floor} ||sum_k a_k g_k / ||g_k||||^2; weight 0 for zero or non-finite g_k.

    Falls back to uniform weights over the usable rewards if the solver returns non-finite values;
    returns all zeros when no gradient is usable (there is nothing to balance).
    """
    usable = usable_gradients(grads)
    weights = torch.zeros(grads.shape[0], dtype=torch.float64)
    if not usable.any():
        return weights.float()
    g = grads[usable].double().cpu()
    unit = g / torch.linalg.vector_norm(g, dim=1, keepdim=True)
    solved = min_norm_on_simplex(unit @ unit.T, floor)
    if not torch.isfinite(solved).all():
        solved = torch.full_like(solved, 1.0 / solved.numel())
    weights[usable.cpu()] = solved.double()
    return weights.float()


def min_norm_on_simplex(gram: torch.Tensor, floor: float = 0.0) -> torch.Tensor:
    """argmin_a 1/2 a^T M a on {sum a = 1, a >= floor}, by projected gradient descent (step 1 / lambda_max(M))."""
    k = gram.shape[0]
    slack = 1.0 - k * floor  # mass left to distribute once every weight has its floor
    if slack < -1e-12:
        raise ValueError(f"floor {floor} is infeasible for {k} rewards (needs floor <= 1/{k})")
    gram = gram.double()
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    lipschitz = torch.linalg.eigvalsh(gram).max()
    if slack <= 0 or not lipschitz > 0:
        return weights  # the floor pins every weight, or M = 0 and every point is optimal
    for _ in range(_MAX_ITERATIONS):
        stepped = weights - gram @ weights / lipschitz
        updated = floor + slack * project_to_simplex((stepped - floor) / slack)
        if (updated - weights).abs().max() < _TOLERANCE:
            return updated
        weights = updated
    return weights


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Euclidean projection onto {a >= 0, sum a = 1} (sort-based, Duchi et al. 2008)."""
    u = torch.sort(v, descending=True).values
    cumulative = torch.cumsum(u, 0) - 1
    ranks = torch.arange(1, v.numel() + 1, dtype=v.dtype)
    support = torch.nonzero(u - cumulative / ranks > 0).flatten()[-1]
    theta = cumulative[support] / (support + 1)
    return (v - theta).clamp_min(0)


def usable_gradients(grads: torch.Tensor) -> torch.Tensor:
    """Mask [K] of gradients that are finite and not all zero."""
    return torch.isfinite(grads).all(dim=1) & (grads != 0).any(dim=1)


def balanced_direction(grads: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """d = (sum_k a_k g_k / ||g_k||) * mean_k ||g_k||, over usable gradients [D]."""
    usable = usable_gradients(grads)
    if not usable.any():
        return torch.zeros_like(grads[0])
    g = grads[usable]
    norms = torch.linalg.vector_norm(g, dim=1)
    return (weights[usable].to(g.dtype) @ (g / norms[:, None])) * norms.mean()


def gradient_cosines(grads: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """cos(g_k, update) [K]; NaN where g_k is unusable or the update is zero."""
    g, u = grads.double(), update.double()
    cosines = (g @ u) / (torch.linalg.vector_norm(g, dim=1) * torch.linalg.vector_norm(u))
    return torch.where(usable_gradients(grads) & (u != 0).any(), cosines, torch.nan)


def combine_advantages(adv: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A_c = sum_k a_k nan_to_num(A_k) [B]; NaN where every A_k is NaN (no reward applies)."""
    combined = torch.nan_to_num(adv, nan=0.0) @ weights.to(adv.dtype)
    return torch.where(torch.isnan(adv).all(dim=1), torch.nan, combined)


class RewardBalancer:
    """QP weights for multi-reward NFT (MARBLE), plus its conflict diagnostics.

    A full solve of min_norm_weights every `solve_every` steps, EMA-smoothed weights in between; the
    amortised steps between solves back-propagate one loss on `amortized_advantages` (module notation).
    The parameters are the recipe's balance.solve_every, balance.ema, balance.floor and balance.amortized.
    """

    def __init__(self, num_rewards: int, solve_every: int = 10, ema: float = 0.7, floor: float = 0.0, amortized: str = "marble") -> None:
        if amortized not in AMORTIZED:
            raise ValueError(f"unknown amortisation {amortized!r}; valid: {', '.join(AMORTIZED)}")
        if solve_every < 1:
            raise ValueError(f"solve_every must be >= 1, got {solve_every}")
        self.solve_every = solve_every
        self.ema = ema
        self.floor = floor
        self.amortized = amortized
        self.weights = torch.full((num_rewards,), 1.0 / num_rewards)
        self.norms = torch.zeros(num_rewards)
        self.solves = 0
        self.measured = 0  # batches with per-reward gradients (full steps)
        self.conflicts = 0  # of those, batches whose worst cosine was negative

    def full_gradients_due(self, step: int) -> bool:
        """Whether this step computes one gradient per reward and solves the QP."""
        return step % self.solve_every == 0

    def update(self, grads: torch.Tensor) -> torch.Tensor:
        """Solve the QP on G [K, D], fold it into the EMA and keep the gradient norms."""
        solved = min_norm_weights(grads, self.floor).float().cpu()
        self.weights = solved if self.solves == 0 else self.ema * self.weights + (1 - self.ema) * solved
        self.norms = torch.where(usable_gradients(grads), torch.linalg.vector_norm(grads.float(), dim=1), 0.0).cpu()
        self.solves += 1
        return self.weights

    def direction(self, grads: torch.Tensor) -> torch.Tensor:
        """The balanced update direction [D] for per-reward gradients G [K, D] under the current weights."""
        return balanced_direction(grads, self.weights.to(grads.device))

    def amortized_advantages(self, adv: torch.Tensor, reward_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(A_c [B], per-sample loss weights [B] or None for the plain batch mean) for an amortised step.

        adv [B, K] (NaN where a reward does not apply); reward_counts [K]: each reward's applicable
        samples in the whole batch, as the full step's per-reward means count them (module notation).
        """
        if self.amortized == "marble":
            return combine_advantages(adv, self.weights.to(adv.device)), None
        usable = self.norms > 0
        mean_norm = self.norms[usable].mean() if usable.any() else torch.tensor(0.0)
        b = torch.where(usable, self.weights * mean_norm / torch.where(usable, self.norms, 1.0), 0.0)
        # sample i's share of reward k's mean, c_ik = b_k / n_k where k applies; the NFT loss is affine in A,
        # so sum_k c_ik L(A_ik) = C_i L(sum_k c_ik A_ik / C_i) with C_i = sum_k c_ik
        c = torch.where(torch.isfinite(adv), (b / reward_counts.clamp_min(1)).to(adv.device), 0.0)
        weights = c.sum(1)
        combined = torch.where(weights > 0, (c * torch.nan_to_num(adv, nan=0.0)).sum(1) / weights.clamp_min(1e-30), 0.0)
        return combined, weights

    def record(self, cosines: torch.Tensor) -> None:
        """Count one measured batch, and a conflict if the worst finite cosine is negative."""
        finite = cosines[torch.isfinite(cosines)]
        self.measured += 1
        self.conflicts += int(finite.numel() > 0 and bool(finite.min() < 0))

    @property
    def conflict_fraction(self) -> float:
        """Running fraction of measured batches in which some reward's gradient opposed the update."""
        return self.conflicts / self.measured if self.measured else 0.0

    def state_dict(self) -> dict:
        return {
            "weights": self.weights.clone(),
            "norms": self.norms.clone(),
            "solves": self.solves,
            "measured": self.measured,
            "conflicts": self.conflicts,
        }

    def load_state_dict(self, state: dict) -> None:
        self.weights = state["weights"].clone()
        # Checkpoints written before the norms were kept: the next full solve sets them.
        self.norms = state["norms"].clone() if "norms" in state else torch.zeros_like(self.weights)
        self.solves, self.measured, self.conflicts = state["solves"], state["measured"], state["conflicts"]
