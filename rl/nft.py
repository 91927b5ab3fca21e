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

The learner's step (`NFT.train_step`, on a rl.trainer.Trainer):
  x0 [B, C, H, W] from the recipe's ODE solver + prompts + advantages [B] (or [B, K] with a RewardBalancer)
  -> per sample its own random `timestep_fraction` of the sampler's timesteps, fresh noise eps
     for each: x_t = (1 - t) x0 + t eps
  -> nft_loss of "policy" against "old" (+ KL against the reference, adapters off)
  -> clip the gradient norm -> AdamW -> soft update "old" <- eta old + (1 - eta) policy

Multi-reward NFT (MARBLE): on a full step (balancer.full_gradients_due) one backward per reward,
each a mean over the samples the reward applies to, gives G [K, D]; the balancer solves its QP and
the applied gradient is its direction plus the KL gradient. Between full steps a single backward on
the balancer's combined advantage (rl.balance: "marble" or "normalized") with the KL term folded in:
the NFT loss is affine in r and r is affine in A inside the advantage clip, so it back-propagates the
same combination of the per-reward gradients.

Samples whose advantages are all NaN (no applicable reward, or a dropped zero-variance group) are
left out of the batch before anything is drawn. Several learners: each sample's training plan
(timesteps, noise) comes from its own stream (run seed, step, index in the kept batch), so every
learner draws exactly its rows' plan (rl.trainer sums their gradients).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from rl.algorithm import Algorithm, Batch, flat_gradient, microbatches
from rl.balance import gradient_cosines
from rl.schema import Section
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Conditioning, Policy
from rollout.samplers import seed_for

if TYPE_CHECKING:
    from rl.config import AlgorithmConfig, Recipe, SamplerConfig
    from rl.trainer import Trainer
    from rollout.samplers import SampleOutput

NFT_PLAN_STREAM = -3  # seed_for's prompt index of the NFT plan streams: no prompt has it


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


class NFTConfig(Section):
    """The recipe's algorithm.nft: DiffusionNFT's settings (reference values, DESIGN.md section 4)."""

    beta: float = Field(1.0, gt=0, description="DiffusionNFT guidance strength (0.1 for multi-reward)")
    loss_scale: float = Field(5.0, gt=0, description="multiplies the mean NFT loss")
    kl_weight: float = Field(1e-4, ge=0, description="weight of mean((v_theta - v_ref)^2)")
    adv_clip: float = Field(5.0, gt=0, description="advantage clip inside optimality()")
    timestep_fraction: float = Field(0.6, gt=0, le=1, description="fraction of the sampler's timesteps trained per sample")
    old_eta_rate: float = Field(0.001, ge=0, description="eta = min(old_eta_rate * step, old_eta_max)")
    old_eta_max: float = Field(0.5, ge=0, lt=1, description="cap of the old-policy soft-update coefficient")


class NFT(Algorithm):
    """DiffusionNFT: trains on the x0 the sampler's ODE solver regenerates (algorithm.nft)."""

    name = "nft"
    config_class = NFTConfig

    def __init__(self, algorithm: AlgorithmConfig, sampler_timesteps: torch.Tensor) -> None:
        """algorithm: the recipe's section (micro_batch, nft); sampler_timesteps: policy.sigmas(steps, shift) of the
        regeneration sampler, whose timesteps NFT trains on."""
        self.config = algorithm.nft
        self.micro_batch = algorithm.micro_batch
        self.sampler_timesteps = sampler_timesteps

    @classmethod
    def from_recipe(cls, recipe: Recipe, policy: Policy) -> NFT:
        return cls(recipe.algorithm, policy.sigmas(recipe.sampler.steps, recipe.sampler.shift))

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Nothing to refuse: NFT runs with or without Sol-RL, on any sampler."""

    def sampling(self, sampler: SamplerConfig, seed: int, step: int) -> dict[str, Any]:
        """The recipe's deterministic solver."""
        return {"solver": sampler.solver}

    def kept(self, out: SampleOutput) -> torch.Tensor:
        """x0 [B, C, H, W]."""
        return out.x0

    def train_step(self, trainer: Trainer, batch: Batch) -> dict[str, float]:
        """One DiffusionNFT optimizer step on x0 [B, C, H, W]; multi-reward when batch.advantages is [B, K]."""
        adv = _as_matrix(batch.advantages)
        num_rewards = adv.shape[1]
        balancer = trainer.balancer
        if num_rewards > 1 and balancer is None:
            raise ValueError(f"advantages for {num_rewards} rewards need a RewardBalancer")
        keep = torch.isfinite(adv).any(dim=1)
        counts = trainer.counts_by_learner(int(keep.sum()))
        count = int(counts.sum())
        if count == 0:
            return {"train/skipped": 1.0}
        adv = adv[keep]
        x0 = batch.samples[keep.to(batch.samples.device)].to(trainer.policy.device, torch.float32)
        cond = trainer.policy.encode_prompts(batch.prompts).index(keep.cpu())
        start = int(counts[: trainer.rank].sum())
        t_values, noise = self.plan(trainer, range(start, start + len(x0)), x0.shape[1:])
        full = num_rewards > 1 and balancer.full_gradients_due(trainer.step)
        # each reward's count of applicable samples in the whole batch
        (reward_counts,) = trainer.all_reduce(torch.isfinite(adv).sum(0).float().cpu())
        if full:
            # MARBLE's loss mask: each reward's loss is a mean over the samples it applies to.
            grads, kl_grad, metrics = self.gradients(trainer, x0, cond, adv, t_values, noise, count, reward_counts)
            grads, kl_grad = trainer.all_reduce(grads, kl_grad)  # the QP weighs the whole batch's gradients
            balancer.update(grads)
            update = balancer.direction(grads) + kl_grad
            cosines = gradient_cosines(grads, update)
            balancer.record(cosines)
            metrics |= {f"balance/cos_{k}": float(c) for k, c in enumerate(cosines)}
            metrics["balance/conflict_fraction"] = balancer.conflict_fraction
            local_grad = update / trainer.world_size  # every learner holds the whole update
        else:
            train_adv, weights = (adv[:, 0], None) if num_rewards == 1 else balancer.amortized_advantages(adv, reward_counts)
            grads, _, metrics = self.gradients(trainer, x0, cond, train_adv[:, None], t_values, noise, count, sample_weights=weights)
            local_grad = grads[0]
        if num_rewards > 1:
            metrics |= {f"balance/weight_{k}": float(w) for k, w in enumerate(balancer.weights)}
            metrics["balance/full_step"] = float(full)
        metrics |= trainer.apply_finite_gradient(local_grad)
        # DiffusionNFT computes eta from the step counter after this step's increment.
        decay = old_policy_decay(trainer.step, rate=self.config.old_eta_rate, cap=self.config.old_eta_max)
        soft_update_(trainer.old_params, trainer.params, decay)
        return metrics | {"train/old_decay": decay, "train/samples": float(count)}

    def plan(self, trainer: Trainer, rows: range, sample_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, its own random `timestep_fraction` of the sampler's timesteps t [len(rows), n], and noise [n, len(rows), ...].

        As DiffusionNFT (scripts/train_nft_sd3.py) and Sol-RL draw it: each sample permutes the N
        timesteps the sampler visits (t = 0, where x_t = x0, is not one of them) and trains the
        first n = int(N * timestep_fraction) of its permutation; fresh noise for every (sample, timestep).
        rows: the samples' indices in the whole kept batch. Sample i draws from its own stream,
        seeded by (run seed, optimizer step, i), so a learner draws only its own rows.
        """
        pool = self.sampler_timesteps[self.sampler_timesteps > 0].float()
        n = max(1, int(len(pool) * self.config.timestep_fraction))
        orders, noises = [], []
        for i in rows:
            generator = torch.Generator().manual_seed(seed_for(trainer.seed, trainer.step, NFT_PLAN_STREAM, i))
            orders.append(torch.randperm(len(pool), generator=generator)[:n])
            noises.append(torch.randn((n, *sample_shape), generator=generator))
        if not orders:
            return torch.zeros(0, n), torch.zeros(n, 0, *sample_shape)
        return pool[torch.stack(orders)], torch.stack(noises, dim=1)

    def gradients(
        self,
        trainer: Trainer,
        x0: torch.Tensor,
        cond: Conditioning,
        adv: torch.Tensor,
        t_values: torch.Tensor,
        noise: torch.Tensor,
        count: int | None = None,
        reward_counts: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, float]]:
        """Local gradients [K, D] of each reward's batch loss loss_scale * mean(L), and the local KL gradient [D].

        adv [B, K] may hold NaN where a reward does not apply: such a sample is left out of that
        reward's mean, which runs over its `reward_counts[k]` applicable samples of the whole batch
        (default: all `count`). sample_weights [B] (K = 1 only) replaces the mean's 1 / count by a
        weight per sample (rl.balance's normalized amortisation). The KL mean runs over all `count`
        samples (None: this learner's x0 is the whole batch), so the whole-batch gradients are the
        sums of the learners' local gradients; the losses come back summed over the learners.
        t_values [B, n] are each sample's trained timesteps and noise [n, B, ...] their noise. With
        K = 1 the KL term is folded into the single gradient (one backward pass) and None is
        returned for it.
        """
        config, params = self.config, list(trainer.params.values())
        adv = adv.to(x0.device)
        num_rewards, steps = adv.shape[1], t_values.shape[1]
        count = len(x0) if count is None else count
        reward_counts = torch.full((num_rewards,), float(count)) if reward_counts is None else reward_counts
        applies = torch.isfinite(adv)
        # weight of one (sample, timestep) in each reward's mean; 0 where the reward does not apply
        if sample_weights is None:
            shares = applies / (reward_counts.to(x0.device).clamp_min(1) * steps)
        else:
            shares = (sample_weights.to(x0.device) / steps)[:, None] * applies
        r = optimality(torch.nan_to_num(adv, nan=0.0), config.adv_clip)
        kl_share = 1.0 / (count * steps)
        per_reward = torch.zeros(num_rewards, sum(p.numel() for p in params), device=x0.device)
        kl_grad = None if num_rewards == 1 else torch.zeros_like(per_reward[0])
        losses = torch.zeros(num_rewards + 1)  # per reward, then KL
        for j in range(steps):
            for part in microbatches(len(x0), self.micro_batch):
                x_t, t, v_theta, v_old, v_ref = self._forward(trainer.policy, x0[part], cond.index(part), t_values[part, j], noise[j, part])
                reward_losses = [
                    config.loss_scale * (shares[part, k] * nft_loss(v_theta, v_old, x_t, x0[part], t, r[part, k], config.beta)).sum()
                    for k in range(num_rewards)
                ]
                targets = list(reward_losses)
                if v_ref is not None:
                    kl_loss = config.kl_weight * kl_share * velocity_kl(v_theta, v_ref).sum()
                    # Nothing to balance with one reward: fold KL in and save a backward pass.
                    if num_rewards == 1:
                        targets[0] = targets[0] + kl_loss
                    else:
                        targets.append(kl_loss)
                    losses[-1] += kl_loss.item()
                losses[:num_rewards] += torch.tensor([loss.item() for loss in reward_losses])
                for i, target in enumerate(targets):
                    flat = flat_gradient(target, params, retain_graph=i < len(targets) - 1)
                    if i < num_rewards:
                        per_reward[i] += flat
                    else:
                        kl_grad += flat
        (losses,) = trainer.all_reduce(losses)
        metrics = {"loss/kl": float(losses[-1])}
        if num_rewards == 1:
            metrics["loss/nft"] = float(losses[0])
        else:
            metrics |= {f"loss/nft_{k}": float(loss) for k, loss in enumerate(losses[:-1])}
        return per_reward, kl_grad, metrics

    def _forward(
        self, policy: Policy, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x_t = (1 - t) x0 + t eps per sample (t [B]), then v_theta (with grad), v_old and v_ref (None when kl_weight = 0)."""
        t = t.to(x0.device, torch.float32)
        t_batch = t.reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_batch) * x0 + t_batch * eps.to(x0.device)
        with torch.no_grad(), policy.adapter(OLD_ADAPTER):
            v_old = policy.velocity(x_t, t, cond)
        v_ref = None
        if self.config.kl_weight > 0:
            with torch.no_grad(), policy.adapter(None):
                v_ref = policy.velocity(x_t, t, cond)
        with policy.adapter(TRAINABLE_ADAPTER):
            v_theta = policy.velocity(x_t, t, cond)
        return x_t, t, v_theta, v_old, v_ref


def _as_matrix(advantages: torch.Tensor) -> torch.Tensor:
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    if adv.ndim not in (1, 2):
        raise ValueError(f"advantages must be [B] or [B, K], got shape {tuple(adv.shape)}")
    return adv[:, None] if adv.ndim == 1 else adv
