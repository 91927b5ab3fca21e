"""EMA of the trainable LoRA weights: what evaluation samples with (eval.adapter: ema), as DiffusionNFT,
Sol-RL and Flow-GRPO evaluate. Reference: NVlabs/DiffusionNFT flow_grpo/ema.py (EMAModuleWrapper),
stepped after every optimizer step with the step count after its increment (scripts/train_nft_sd3.py).

Notation
  code       paper / reference
  step       s, optimizer steps taken, counted after this step's increment
  decay      the EMA decay cap (0.9 in all three references)
  every      update_step_interval (1 in DiffusionNFT and Sol-RL, 8 in Flow-GRPO)
  d          d_s = min((1 + s) / (10 + s), decay): a warm-up, 2/11 at s = 1, the cap from s = 80 on
  update     ema <- ema + (1 - d_s) (theta - ema), on steps with (s + 1) % every == 0
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch


class AdapterEMA:
    """The EMA copy of a set of named parameters (the "policy" adapter), kept in fp32 beside them."""

    def __init__(self, params: Mapping[str, torch.Tensor], decay: float = 0.9, every: int = 1) -> None:
        if not 0 <= decay < 1 or every < 1:
            raise ValueError(f"EMA needs 0 <= decay < 1 and every >= 1, got decay {decay}, every {every}")
        self.decay, self.every = decay, every
        self.weights = {name: param.detach().float().clone() for name, param in params.items()}

    def current_decay(self, step: int) -> float:
        """d_s = min((1 + s) / (10 + s), decay)."""
        return min((1 + step) / (10 + step), self.decay)

    @torch.no_grad()
    def update(self, params: Mapping[str, torch.Tensor], step: int) -> None:
        """ema <- ema + (1 - d_s) (theta - ema) when (step + 1) % every == 0."""
        if (step + 1) % self.every:
            return
        keep = 1 - self.current_decay(step)
        for name, ema in self.weights.items():
            ema.add_(keep * (params[name].detach().to(ema.device, ema.dtype) - ema))

    @contextlib.contextmanager
    def swapped_into(self, params: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Run a block with the EMA weights in `params`, the trained weights restored afterwards."""
        with torch.no_grad():
            trained = {name: param.detach().clone() for name, param in params.items()}
            for name, param in params.items():
                param.copy_(self.weights[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, param in params.items():
                    param.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: w.clone() for name, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.weights.keys():
            raise KeyError(f"EMA state for other parameters; differing: {sorted(state.keys() ^ self.weights.keys())[:5]}")
        # on the device the EMA lives on (a checkpoint loads on the CPU)
        self.weights = {name: w.detach().to(self.weights[name].device, torch.float32).clone() for name, w in state.items()}
