"""The learner's generic half of an optimizer step (no Ray here; the LearnerWorker calls it): the AdamW
optimizer over the policy's LoRA adapter, the adapter's EMA, sums over the learners, and stepping along
a gradient with the non-finite checks. What the gradient is comes from the algorithm (rl.algorithm:
rl.nft's DiffusionNFT, rl.grpo's Flow-GRPO), which calls this Trainer from its train_step.
After every optimizer step the EMA of "policy" (rl.ema) moves, for evaluation.

Several learners: learner r holds the r-th contiguous block of the batch's rows, and its losses weight
each sample by 1 / (whole-batch count), so the whole-batch gradient is the sum over the learners of
their local gradients. `apply_finite_gradient` takes the local gradient and steps along that sum;
what needs whole-batch values first (counts, a multi-reward QP's gradients) sums them with
`all_reduce`. So n learners take the step one learner takes on the whole batch, and all take the
same step. Here the world is one learner; actors.learners.DeepSpeedTrainer sets rank and world_size
and overrides `all_reduce` and `_apply_gradient`.
"""

from __future__ import annotations

import torch

from rl.balance import RewardBalancer
from rl.config import EvalConfig, OptimConfig
from rl.ema import AdapterEMA
from rollout.policy import OLD_ADAPTER, TRAINABLE_ADAPTER, Policy


class NonFiniteTrainingError(FloatingPointError):
    """The whole-batch gradient or the adapter became inf / NaN; the adapter is left as the last finite step made it."""


class Trainer:
    """Owns the optimizer over the "policy" LoRA adapter, its EMA, the step counter, and the run seed of the training plans."""

    def __init__(
        self,
        policy: Policy,
        *,
        optim: OptimConfig | None = None,
        evaluation: EvalConfig | None = None,
        balancer: RewardBalancer | None = None,
        seed: int = 0,
    ) -> None:
        """optim: the recipe's optim section; evaluation: its eval section (ema_decay, ema_every of the EMA that
        evaluation samples with), both the recipe's defaults when None; balancer: multi-reward NFT's (balance.mode qp); seed: run.seed."""
        optim, evaluation = optim or OptimConfig(), evaluation or EvalConfig()
        self.policy = policy
        self.optim = optim
        self.balancer = balancer
        self.params = policy.adapter_parameters(TRAINABLE_ADAPTER)
        if not self.params:
            raise ValueError("the policy has no trainable LoRA adapter: call policy.add_lora(rank, alpha) first")
        self.old_params = {
            name.replace(f".{OLD_ADAPTER}.", f".{TRAINABLE_ADAPTER}."): param
            for name, param in policy.adapter_parameters(OLD_ADAPTER).items()
        }
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        self.seed = seed
        self.ema = AdapterEMA(self.params, evaluation.ema_decay, evaluation.ema_every)
        self.step = 0
        self.skipped_nonfinite = 0  # optimizer steps skipped for a non-finite gradient (optim.nonfinite: skip_step)
        self.rank, self.world_size = 0, 1

    def all_reduce(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """Each tensor summed over the learners (None stays None); a lone learner's sums are its own tensors."""
        return list(tensors)

    def counts_by_learner(self, count: int) -> torch.Tensor:
        """Every learner's `count` [world_size], by rank."""
        counts = torch.zeros(self.world_size)
        counts[self.rank] = count
        return self.all_reduce(counts)[0]

    def apply_finite_gradient(self, local_grad: torch.Tensor) -> dict[str, float]:
        """_apply_gradient when the whole batch's gradient is finite on every learner; otherwise stop or skip the step
        (optim.nonfinite). A step that leaves the adapter non-finite always stops: it cannot be skipped after the fact."""
        (nonfinite,) = self.all_reduce(torch.tensor([0.0 if bool(torch.isfinite(local_grad).all()) else 1.0]))
        if float(nonfinite[0]) > 0:
            if self.optim.nonfinite == "stop":
                raise NonFiniteTrainingError(
                    f"optimizer step {self.step + 1}: the gradient is inf or NaN (an overflowing loss, reward or learning rate); "
                    "the adapter is left as it was. Lower optim.lr, check the rewards, or set optim.nonfinite: skip_step"
                )
            self.skipped_nonfinite += 1
            return {"train/skipped_nonfinite": float(self.skipped_nonfinite)}
        metrics = self._apply_gradient(local_grad)
        if not all(bool(torch.isfinite(param).all()) for param in self.params.values()):
            raise NonFiniteTrainingError(
                f"optimizer step {self.step}: a finite gradient made the adapter inf or NaN (optim.lr {self.optim.lr:g}); lower optim.lr"
            )
        return metrics | {"train/skipped_nonfinite": float(self.skipped_nonfinite)}

    def _apply_gradient(self, local_grad: torch.Tensor) -> dict[str, float]:
        """Step along the whole-batch gradient, the sum over the learners of local_grad [D]: clip its norm, then AdamW."""
        (flat,) = self.all_reduce(local_grad)
        offset = 0
        for param in self.params.values():
            param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype).clone()
            offset += param.numel()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.optim.grad_clip)
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
