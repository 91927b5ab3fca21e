"""What an RL algorithm is to a learner: how it regenerates the batch, what it keeps of each sample to
train on, and its optimizer step on a Trainer (rl.trainer, which owns the optimizer, the EMA and the
sums over the learners). rl.nft and rl.grpo implement it; rl.algorithms registers them by algorithm.name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from rl.schema import Section

if TYPE_CHECKING:
    from rl.config import Recipe, SamplerConfig
    from rl.trainer import Trainer
    from rollout.policy import Policy
    from rollout.samplers import SampleOutput


@dataclass
class Batch:
    """Regenerated samples (what Algorithm.kept keeps of them), their prompts and advantages ([B], or [B, K] for K rewards)."""

    samples: Any
    prompts: Sequence[str]
    advantages: torch.Tensor


class Algorithm(ABC):
    """One RL algorithm on a learner: its regeneration sampler, what a sample keeps, and its update step."""

    name: ClassVar[str]  # algorithm.name in a recipe
    config_class: ClassVar[type[Section]]  # its recipe subsection, algorithm.<name> (rl.config builds AlgorithmConfig from these)

    @classmethod
    @abstractmethod
    def from_recipe(cls, recipe: Recipe, policy: Policy) -> Algorithm:
        """The algorithm with the recipe's settings, training `policy`."""

    @classmethod
    @abstractmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """Refuse settings this algorithm cannot run; the Recipe validator asks every registered algorithm, chosen or not."""

    @abstractmethod
    def sampling(self, sampler: SamplerConfig, seed: int, step: int) -> dict[str, Any]:
        """rollout.samplers.sample's solver options (solver, noise_level, sde_window) to regenerate iteration `step` of run `seed`."""

    @abstractmethod
    def kept(self, out: SampleOutput) -> Any:
        """What the learner keeps of a regenerated batch to train on."""

    @abstractmethod
    def train_step(self, trainer: Trainer, batch: Batch) -> dict[str, float]:
        """One optimizer step of `trainer` on `batch`; its metrics."""


def microbatches(size: int, chunk: int) -> Iterator[slice]:
    """Consecutive slices of at most `chunk` rows covering `size` rows."""
    for start in range(0, size, chunk):
        yield slice(start, min(start + chunk, size))


def flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter], retain_graph: bool) -> torch.Tensor:
    """d loss / d params as one fp32 vector [D]; zeros for parameters the loss does not reach."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params)])
