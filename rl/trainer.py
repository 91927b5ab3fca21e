"""Single-process learner step: DiffusionNFT or Flow-GRPO on the policy's LoRA adapter (no Ray here;
the LearnerWorker calls it). One call = one optimizer step on one regenerated batch.

NFT   x0 [B, C, H, W] + prompts + advantages [B] (or [B, K] with a RewardBalancer)
      -> per sample its own random `timestep_fraction` of the sampler's timesteps, fresh noise eps
         for each: x_t = (1 - t) x0 + t eps
      -> nft_loss of "policy" against "old" (+ KL against the reference, adapters off)
      -> clip the gradient norm -> AdamW -> soft update "old" <- eta old + (1 - eta) policy
GRPO  Trajectory + prompts + advantages [B]
      -> recompute log-probs of the first `timestep_fraction` of the recorded steps (or every step
         of the SDE window) under "policy" -> PPO-clip + KL -> clip -> AdamW -> "old" <- policy
         (the ratio divides by the sampler's log-probs, so the sampler must be the current policy)
After every optimizer step the EMA of "policy" (rl.ema) moves, for evaluation.

Multi-reward NFT (MARBLE): on a full step (balancer.full_gradients_due) one backward per reward,
each a mean over the samples the reward applies to, gives G [K, D]; the balancer solves its QP and
the applied gradient is its direction plus the KL gradient. Between full steps a single backward on
the balancer's combined advantage (rl.balance: "marble" or "normalized") with the KL term folded in:
the NFT loss is affine in r and r is affine in A inside the advantage clip, so it back-propagates the
same combination of the per-reward gradients.

Samples whose advantages are all NaN (no applicable reward, or a dropped zero-variance group) are
left out of the batch before anything is drawn.

Several learners: learner r holds the r-th contiguous block of the batch's rows. Each sample's
training plan (timesteps, noise) comes from its own stream (run seed, step, index in the kept
batch), so every learner draws exactly its rows' plan; losses weight each sample by 1 / (whole-batch count), so the whole-batch gradient
is the sum over the learners of their local gradients. `_apply_gradient` takes the local gradient
and steps along that sum; a multi-reward full step, whose QP needs the whole-batch gradients, sums
them first with `all_reduce`. So n learners take the step one learner takes on the whole batch, and
all take the same step. Here the world is one learner; actors.learners.DeepSpeedTrainer sets rank
and world_size and overrides `all_reduce` and `_apply_gradient`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from rl.balance import RewardBalancer, gradient_cosines
from rl.ema import AdapterEMA
from rl.grpo import grpo_kl, grpo_loss
from rl.nft import nft_loss, old_policy_decay, optimality, soft_update_, velocity_kl
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Conditioning, Policy
from rollout.samplers import seed_for
from rollout.sde import Trajectory, step_log_prob


@dataclass(frozen=True)
class TrainerSettings:
    """Optimizer and loss settings; defaults are the reference values of DESIGN.md section 4."""

    lr: float = 3e-4  # AdamW learning rate
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW (beta1, beta2)
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    microbatch_size: int = 8  # samples per forward pass; bounds memory, not the result
    timestep_fraction: float = 0.6  # NFT: share of the sampler's timesteps each sample trains; GRPO: the first share of the chain
    adv_clip: float = 5.0  # advantage clip (optimality() and the PPO loss)
    nft_beta: float = 1.0  # DiffusionNFT beta (0.1 for multi-reward)
    loss_scale: float = 5.0  # DiffusionNFT multiplier of mean(L)
    kl_weight: float = 1e-4  # DiffusionNFT weight of mean((v_theta - v_ref)^2)
    old_decay_flat: int = 0  # steps before the old policy starts to lag
    old_decay_rate: float = 0.001  # eta grows by this per step ...
    old_decay_cap: float = 0.5  # ... up to this cap
    clip_range: float = 1e-4  # Flow-GRPO PPO clip epsilon
    grpo_kl_weight: float = 0.04  # Flow-GRPO beta_kl
    ema_decay: float = 0.9  # EMA of the trainable adapter that evaluation samples with
    ema_every: int = 1  # EMA update every n optimizer steps
    nonfinite: str = "stop"  # a non-finite gradient: "stop" (raise NonFiniteTrainingError) or "skip_step"


class NonFiniteTrainingError(FloatingPointError):
    """The whole-batch gradient or the adapter became inf / NaN; the adapter is left as the last finite step made it."""


@dataclass
class NFTBatch:
    """Regenerated samples and their advantages ([B], or [B, K] for K rewards)."""

    x0: torch.Tensor
    prompts: Sequence[str]
    advantages: torch.Tensor


@dataclass
class GRPOBatch:
    """Sampled chains (under the current policy) and their advantages [B]."""

    trajectory: Trajectory
    prompts: Sequence[str]
    advantages: torch.Tensor


GRPO_METRICS = ("loss/grpo", "grpo/kl", "grpo/approx_kl", "grpo/clipfrac")
NFT_PLAN_STREAM = -3  # seed_for's prompt index of the NFT plan streams: no prompt has it


class Trainer:
    """Owns the optimizer over the "policy" LoRA adapter, its EMA, and the seed of the training plan's noise."""

    def __init__(
        self,
        policy: Policy,
        settings: TrainerSettings = TrainerSettings(),
        sampler_timesteps: torch.Tensor | None = None,
        balancer: RewardBalancer | None = None,
        seed: int = 0,
    ) -> None:
        self.policy = policy
        self.settings = settings
        # policy.sigmas(steps, shift): NFT trains on the timesteps the sampler visits.
        self.sampler_timesteps = sampler_timesteps
        self.balancer = balancer
        self.params = policy.adapter_parameters(TRAINABLE_ADAPTER)
        if not self.params:
            raise ValueError("the policy has no trainable LoRA adapter: call policy.add_lora(rank, alpha) first")
        self.old_params = {
            name.replace(f".{OLD_ADAPTER}.", f".{TRAINABLE_ADAPTER}."): param
            for name, param in policy.adapter_parameters(OLD_ADAPTER).items()
        }
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay)
        self.seed = seed
        self.ema = AdapterEMA(self.params, settings.ema_decay, settings.ema_every)
        self.step = 0
        self.skipped_nonfinite = 0  # optimizer steps skipped for a non-finite gradient (optim.nonfinite: skip_step)
        self.rank, self.world_size = 0, 1

    # --- DiffusionNFT ---------------------------------------------------------------------------

    def nft_step(self, batch: NFTBatch) -> dict[str, float]:
        """One DiffusionNFT optimizer step; multi-reward when batch.advantages is [B, K]."""
        adv = _as_matrix(batch.advantages)
        num_rewards = adv.shape[1]
        if num_rewards > 1 and self.balancer is None:
            raise ValueError(f"advantages for {num_rewards} rewards need a RewardBalancer")
        keep = torch.isfinite(adv).any(dim=1)
        counts = self._counts_by_learner(int(keep.sum()))
        count = int(counts.sum())
        if count == 0:
            return {"train/skipped": 1.0}
        adv = adv[keep]
        x0 = batch.x0[keep.to(batch.x0.device)].to(self.policy.device, torch.float32)
        cond = self.policy.encode_prompts(batch.prompts).index(keep.cpu())
        start = int(counts[: self.rank].sum())
        t_values, noise = self.nft_plan(range(start, start + len(x0)), x0.shape[1:])
        full = num_rewards > 1 and self.balancer.full_gradients_due(self.step)
        # each reward's count of applicable samples in the whole batch
        (reward_counts,) = self.all_reduce(torch.isfinite(adv).sum(0).float().cpu())
        if full:
            # MARBLE's loss mask: each reward's loss is a mean over the samples it applies to.
            grads, kl_grad, metrics = self.nft_gradients(x0, cond, adv, t_values, noise, count, reward_counts)
            grads, kl_grad = self.all_reduce(grads, kl_grad)  # the QP weighs the whole batch's gradients
            self.balancer.update(grads)
            update = self.balancer.direction(grads) + kl_grad
            cosines = gradient_cosines(grads, update)
            self.balancer.record(cosines)
            metrics |= {f"balance/cos_{k}": float(c) for k, c in enumerate(cosines)}
            metrics["balance/conflict_fraction"] = self.balancer.conflict_fraction
            local_grad = update / self.world_size  # every learner holds the whole update
        else:
            train_adv, weights = (adv[:, 0], None) if num_rewards == 1 else self.balancer.amortized_advantages(adv, reward_counts)
            grads, _, metrics = self.nft_gradients(x0, cond, train_adv[:, None], t_values, noise, count, sample_weights=weights)
            local_grad = grads[0]
        if num_rewards > 1:
            metrics |= {f"balance/weight_{k}": float(w) for k, w in enumerate(self.balancer.weights)}
            metrics["balance/full_step"] = float(full)
        metrics |= self._apply_finite_gradient(local_grad)
        # DiffusionNFT computes eta from the step counter after this step's increment.
        decay = old_policy_decay(self.step, self.settings.old_decay_flat, self.settings.old_decay_rate, self.settings.old_decay_cap)
        soft_update_(self.old_params, self.params, decay)
        return metrics | {"train/old_decay": decay, "train/samples": float(count)}

    def nft_plan(self, rows: range, sample_shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample, its own random `timestep_fraction` of the sampler's timesteps t [len(rows), n], and noise [n, len(rows), ...].

        As DiffusionNFT (scripts/train_nft_sd3.py) and Sol-RL draw it: each sample permutes the N
        timesteps the sampler visits (t = 0, where x_t = x0, is not one of them) and trains the
        first n = int(N * timestep_fraction) of its permutation; fresh noise for every (sample, timestep).
        rows: the samples' indices in the whole kept batch. Sample i draws from its own stream,
        seeded by (run seed, optimizer step, i), so a learner draws only its own rows.
        """
        if self.sampler_timesteps is None:
            raise ValueError("NFT needs the sampler's timesteps: Trainer(..., sampler_timesteps=policy.sigmas(steps))")
        pool = self.sampler_timesteps[self.sampler_timesteps > 0].float()
        n = max(1, int(len(pool) * self.settings.timestep_fraction))
        orders, noises = [], []
        for i in rows:
            generator = torch.Generator().manual_seed(seed_for(self.seed, self.step, NFT_PLAN_STREAM, i))
            orders.append(torch.randperm(len(pool), generator=generator)[:n])
            noises.append(torch.randn((n, *sample_shape), generator=generator))
        if not orders:
            return torch.zeros(0, n), torch.zeros(n, 0, *sample_shape)
        return pool[torch.stack(orders)], torch.stack(noises, dim=1)

    def nft_gradients(
        self,
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
        settings, params = self.settings, list(self.params.values())
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
        r = optimality(torch.nan_to_num(adv, nan=0.0), settings.adv_clip)
        kl_share = 1.0 / (count * steps)
        per_reward = torch.zeros(num_rewards, sum(p.numel() for p in params), device=x0.device)
        kl_grad = None if num_rewards == 1 else torch.zeros_like(per_reward[0])
        losses = torch.zeros(num_rewards + 1)  # per reward, then KL
        for j in range(steps):
            for part in _microbatches(len(x0), settings.microbatch_size):
                x_t, t, v_theta, v_old, v_ref = self._nft_forward(x0[part], cond.index(part), t_values[part, j], noise[j, part])
                reward_losses = [
                    settings.loss_scale
                    * (shares[part, k] * nft_loss(v_theta, v_old, x_t, x0[part], t, r[part, k], settings.nft_beta)).sum()
                    for k in range(num_rewards)
                ]
                targets = list(reward_losses)
                if v_ref is not None:
                    kl_loss = settings.kl_weight * kl_share * velocity_kl(v_theta, v_ref).sum()
                    # Nothing to balance with one reward: fold KL in and save a backward pass.
                    if num_rewards == 1:
                        targets[0] = targets[0] + kl_loss
                    else:
                        targets.append(kl_loss)
                    losses[-1] += kl_loss.item()
                losses[:num_rewards] += torch.tensor([loss.item() for loss in reward_losses])
                for i, target in enumerate(targets):
                    flat = _flat_gradient(target, params, retain_graph=i < len(targets) - 1)
                    if i < num_rewards:
                        per_reward[i] += flat
                    else:
                        kl_grad += flat
        (losses,) = self.all_reduce(losses)
        metrics = {"loss/kl": float(losses[-1])}
        if num_rewards == 1:
            metrics["loss/nft"] = float(losses[0])
        else:
            metrics |= {f"loss/nft_{k}": float(loss) for k, loss in enumerate(losses[:-1])}
        return per_reward, kl_grad, metrics

    def _nft_forward(
        self, x0: torch.Tensor, cond: Conditioning, t: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x_t = (1 - t) x0 + t eps per sample (t [B]), then v_theta (with grad), v_old and v_ref (None when kl_weight = 0)."""
        t = t.to(x0.device, torch.float32)
        t_batch = t.reshape(-1, *([1] * (x0.ndim - 1)))
        x_t = (1 - t_batch) * x0 + t_batch * eps.to(x0.device)
        with torch.no_grad(), self.policy.adapter(OLD_ADAPTER):
            v_old = self.policy.velocity(x_t, t, cond)
        v_ref = None
        if self.settings.kl_weight > 0:
            with torch.no_grad(), self.policy.adapter(None):
                v_ref = self.policy.velocity(x_t, t, cond)
        with self.policy.adapter(TRAINABLE_ADAPTER):
            v_theta = self.policy.velocity(x_t, t, cond)
        return x_t, t, v_theta, v_old, v_ref

    # --- Flow-GRPO ------------------------------------------------------------------------------

    def grpo_step(self, batch: GRPOBatch) -> dict[str, float]:
        """One Flow-GRPO optimizer step over a random subset of the recorded stochastic steps."""
        settings = self.settings
        adv = torch.as_tensor(batch.advantages, dtype=torch.float32)
        if adv.ndim != 1:
            raise ValueError(f"GRPO trains one reward (advantages [B]), got shape {tuple(adv.shape)}; multi-reward balancing is NFT's")
        keep = torch.isfinite(adv)
        samples = int(self._counts_by_learner(int(keep.sum())).sum())
        if samples == 0:
            return {"train/skipped": 1.0}
        device, params = self.policy.device, list(self.params.values())
        adv = adv[keep].to(device)
        trajectory = batch.trajectory.index(keep.to(batch.trajectory.latents.device)).to(device)
        cond = self.policy.encode_prompts(batch.prompts).index(keep.cpu())
        chosen = self.grpo_plan(trajectory)
        share = 1.0 / (samples * len(chosen))  # weight of one (sample, step) in the mean over every learner's batch
        gradient = torch.zeros(sum(p.numel() for p in params), device=device)
        totals = torch.zeros(len(GRPO_METRICS), dtype=torch.float64)
        for i in chosen.tolist():
            for part in _microbatches(len(adv), settings.microbatch_size):
                loss, kl, log_ratio = self._grpo_losses(trajectory, i, part, cond.index(part), adv[part])
                gradient += _flat_gradient(loss.sum() * share, params, retain_graph=False)
                totals += share * torch.tensor(
                    [
                        loss.detach().sum().item(),
                        0.0 if kl is None else kl.sum().item(),
                        0.5 * (log_ratio**2).sum().item(),
                        ((log_ratio.exp() - 1).abs() > settings.clip_range).sum().item(),
                    ],
                    dtype=torch.float64,
                )
        (totals,) = self.all_reduce(totals)
        metrics = dict(zip(GRPO_METRICS, totals.tolist())) | self._apply_finite_gradient(gradient)
        self.policy.copy_adapter(TRAINABLE_ADAPTER, OLD_ADAPTER)
        return metrics | {"train/samples": float(samples)}

    def grpo_plan(self, trajectory: Trajectory) -> torch.Tensor:
        """The recorded steps GRPO trains, in order, as Flow-GRPO does (scripts/train_sd3.py, train_sd3_fast.py):
        with an SDE window every step of the window; without one the first int(S * timestep_fraction)
        steps of the S-step chain (never the last step into t = 0 at Flow-GRPO's 0.99)."""
        steps = trajectory.stochastic_steps()
        if trajectory.window is not None:
            return steps
        return steps[: max(1, int(trajectory.num_steps * self.settings.timestep_fraction))]

    def _grpo_losses(
        self, trajectory: Trajectory, i: int, part: slice, cond: Conditioning, adv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Per-sample loss of recorded step i under "policy", with its KL term and log-ratio (both detached)."""
        x, x_next, logp_old = trajectory.latents[i, part], trajectory.latents[i + 1, part], trajectory.log_probs[i, part]
        t, t_next = float(trajectory.timesteps[i]), float(trajectory.timesteps[i + 1])
        t_batch = torch.full((len(x),), t, device=x.device)
        with self.policy.adapter(TRAINABLE_ADAPTER):
            v = self.policy.velocity(x, t_batch, cond)
        logp, mean, std = step_log_prob(trajectory.method, x, v, x_next, t, t_next, trajectory.noise_level)
        kl = None
        if self.settings.grpo_kl_weight > 0:
            with torch.no_grad(), self.policy.adapter(None):
                v_ref = self.policy.velocity(x, t_batch, cond)
            _, mean_ref, _ = step_log_prob(trajectory.method, x, v_ref, x_next, t, t_next, trajectory.noise_level)
            kl = grpo_kl(trajectory.method, mean, mean_ref, std, t, t_next)
        settings = self.settings
        loss = grpo_loss(logp, logp_old, adv, kl, settings.clip_range, settings.adv_clip, settings.grpo_kl_weight)
        return loss, None if kl is None else kl.detach(), logp.detach() - logp_old

    # --- shared -----------------------------------------------------------------------------------

    def all_reduce(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Each tensor summed over the learners (None stays None); a lone learner's sums are its own tensors."""
        return list(tensors)

    def _counts_by_learner(self, count: int) -> torch.Tensor:
        """Every learner's `count` [world_size], by rank."""
        counts = torch.zeros(self.world_size)
        counts[self.rank] = count
        return self.all_reduce(counts)[0]

    def _apply_finite_gradient(self, local_grad: torch.Tensor) -> dict[str, float]:
        """_apply_gradient when the whole batch's gradient is finite on every learner; otherwise stop or skip the step
        (settings.nonfinite). A step that leaves the adapter non-finite always stops: it cannot be skipped after the fact."""
        (nonfinite,) = self.all_reduce(torch.tensor([0.0 if bool(torch.isfinite(local_grad).all()) else 1.0]))
        if float(nonfinite[0]) > 0:
            if self.settings.nonfinite == "stop":
                raise NonFiniteTrainingError(
                    f"optimizer step {self.step + 1}: the gradient is inf or NaN (an overflowing loss, reward or learning rate); "
                    "the adapter is left as it was. Lower optim.lr, check the rewards, or set optim.nonfinite: skip_step"
                )
            self.skipped_nonfinite += 1
            return {"train/skipped_nonfinite": float(self.skipped_nonfinite)}
        metrics = self._apply_gradient(local_grad)
        if not all(bool(torch.isfinite(param).all()) for param in self.params.values()):
            raise NonFiniteTrainingError(
                f"optimizer step {self.step}: a finite gradient made the adapter inf or NaN (optim.lr {self.settings.lr:g}); lower optim.lr"
            )
        return metrics | {"train/skipped_nonfinite": float(self.skipped_nonfinite)}

    def _apply_gradient(self, local_grad: torch.Tensor) -> dict[str, float]:
        """Step along the whole-batch gradient, the sum over the learners of local_grad [D]: clip its norm, then AdamW."""
        (flat,) = self.all_reduce(local_grad)
        offset = 0
        for param in self.params.values():
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype).clone()
            offset += param.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.settings.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._stepped(float(grad_norm))

    def _stepped(self, grad_norm: float) -> dict[str, float]:
        """Count a step taken along a whole-batch gradient of norm grad_norm (before clipping), update the EMA; its metrics."""
        self.step += 1
        self.ema.update(self.params, self.step)
        return {"train/grad_norm": grad_norm, "train/step": float(self.step)}

    def state_dict(self) -> dict:
        """Everything beyond the adapter weights that a resumed run needs to continue identically."""
        return {
            "step": self.step,
            "seed": self.seed,
            "skipped_nonfinite": self.skipped_nonfinite,
            "optimizer": self.optimizer.state_dict(),
            "balancer": None if self.balancer is None else self.balancer.state_dict(),
            "ema": self.ema.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.seed = state.get("seed", self.seed)  # checkpoints from before the per-sample plan streams kept a generator instead
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        self.optimizer.load_state_dict(state["optimizer"])
        if self.balancer is not None:
            self.balancer.load_state_dict(state["balancer"])
        # Checkpoints written before the EMA was kept restart it from the adapter's weights.
        self.ema.load_state_dict(state["ema"] if "ema" in state else {name: param.detach() for name, param in self.params.items()})


def _as_matrix(advantages: torch.Tensor) -> torch.Tensor:
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    if adv.ndim not in (1, 2):
        raise ValueError(f"advantages must be [B] or [B, K], got shape {tuple(adv.shape)}")
    return adv[:, None] if adv.ndim == 1 else adv


def _microbatches(size: int, chunk: int) -> Iterator[slice]:
    for start in range(0, size, chunk):
        yield slice(start, min(start + chunk, size))


def _flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter], retain_graph: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
