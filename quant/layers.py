"""The emulated NVFP4 W4A4 linear layer, with a calibrated (static) or a delayed activation amax.

y = fq(x; a) fq(W)^T + b, fq = nvfp4_fake_quantize along in_features, a = `input_amax` (static) or
the delayed-scaling amax (below).

State, as in modelopt's QuantLinear (weight and input quantizers around an nn.Linear):
  weight       the high-precision weight, in the layer's dtype; weight syncs write it (state-dict key of nn.Linear)
  weight_fq    fq(weight), a cache outside the state dict, refreshed by `set_weight` (modelopt
               fake-quantizes the weight in every forward; the values are the same)
  input_amax   the static per-tensor amax of the inputs (fp32 scalar, in the state dict), set by max
               calibration; NaN until calibrated. A static amax makes a sample's output independent
               of its batch-mates, which a per-forward amax over the batch is not.
  calibrating  while True the forward is the plain high-precision linear and `input_amax` becomes
               the max |x| over every input seen: modelopt's "max" calibration, which disables every
               quantizer while it collects statistics.

Delayed scaling (`DelayedScaling`, sol.activation_scaling: delayed) replaces the calibrated amax by
Transformer Engine's DelayedScaling recipe, which Sol-RL's NVFP4 explore copies run under
(NVlabs/Sana train_scripts/sol_rl/train_utils.py: DelayedScaling(fp8_format=E2M1,
amax_history_len=16, amax_compute_algo="max")): each forward quantizes with the amax of the last
`history_len` forwards' inputs (their max, or the newest), then records its own input's amax. The
first forward, with nothing recorded, uses TE's initial scale of 1, i.e. a = 6 * 448. So a sample's
result depends on the forwards before it (its batch-mates and the batches earlier in the run).

The GEMM: the dequantized operands are bf16 values, exact in fp32, and the product accumulates in
fp32 on every device (cuBLAS bf16 GEMMs and Blackwell's FP4 GEMMs accumulate in fp32 too); the
result is rounded once to the layer's dtype. On CUDA the GEMM runs in the layer's dtype; on CPU it
runs on fp32 copies of the operands, because CPU bf16 GEMMs without native bf16 units are about 6x
slower and, on strided inputs, take a kernel whose results depend on the batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.nvfp4 import E2M1_MAX, E4M3_MAX, nvfp4_fake_quantize

DELAYED_ALGOS = ("max", "most_recent")
INITIAL_DELAYED_AMAX = E2M1_MAX * E4M3_MAX  # TE's initial scale 1: the per-tensor scale a / (6 * 448) = 1


@dataclass(frozen=True)
class DelayedScaling:
    """Transformer Engine's DelayedScaling recipe for the per-tensor activation amax (see the module docstring)."""

    history_len: int = 16
    algo: str = "max"  # "max" of the history, or its "most_recent" entry

    def __post_init__(self) -> None:
        if self.history_len < 1 or self.algo not in DELAYED_ALGOS:
            raise ValueError(f"delayed scaling needs history_len >= 1 and algo in {DELAYED_ALGOS}, got {self.history_len}, {self.algo!r}")


class DelayedAmax:
    """One quantized input's amax history under a DelayedScaling recipe."""

    def __init__(self, recipe: DelayedScaling) -> None:
        self.recipe = recipe
        self.history: list[float] = []  # newest last

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The amax to quantize x with (from the forwards before it); then x's own amax joins the history."""
        recorded = [a for a in self.history if a > 0]  # all-zero inputs leave the scale as it was, as in TE
        if not recorded:
            amax = INITIAL_DELAYED_AMAX
        else:
            amax = max(recorded) if self.recipe.algo == "max" else recorded[-1]
        self.history = [*self.history, float(x.detach().abs().amax())][-self.recipe.history_len :]
        return torch.tensor(amax, dtype=torch.float32, device=x.device)


class ExploreLinear(nn.Linear):
    """A high-precision linear of an explore copy on CPU: the GEMM of `_gemm` (fp32 accumulation, one rounding to
    the layer's dtype), which a bf16 nn.Linear on CPUs without native bf16 computes about 5x slower."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> ExploreLinear:
        """Take over `linear`'s parameters (no copy), frozen."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.requires_grad_(False)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._gemm(x, self.weight)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T + b accumulated in fp32 and rounded once to x.dtype (see the module docstring)."""
        if x.device.type != "cpu":
            return F.linear(x, weight, self.bias)
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), weight.float(), bias).to(x.dtype)


class NVFP4Linear(ExploreLinear):
    """nn.Linear in NVFP4 W4A4 (see the module docstring); inference only, parameters frozen."""

    weight_fq: torch.Tensor
    input_amax: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NVFP4Linear:
        """Take over `linear`'s parameters (no copy) and fake-quantize its weight; input_amax starts uncalibrated."""
        layer = super().from_linear(linear)
        layer.register_buffer("weight_fq", torch.empty_like(linear.weight.detach()), persistent=False)
        layer.register_buffer("input_amax", torch.tensor(math.nan, device=linear.weight.device))
        layer.calibrating = False
        layer.calibrated = False
        layer.delayed = None
        layer.set_weight(linear.weight)
        return layer

    def use_delayed_scaling(self, recipe: DelayedScaling) -> None:
        """Quantize inputs with a delayed amax (module docstring) instead of a calibrated one, from an empty history."""
        self.delayed = DelayedAmax(recipe)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (cast to the layer's dtype) and refresh fq(weight)."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the layer's {tuple(self.weight.shape)}")
        if weight is not self.weight:
            self.weight.copy_(weight)
        self.weight_fq = nvfp4_fake_quantize(self.weight.detach())

    @torch.no_grad()
    def start_calibration(self) -> None:
        self.calibrating, self.calibrated = True, False
        self.input_amax.fill_(0.0)

    def finish_calibration(self) -> None:
        """End calibration; `input_amax` must then be positive and finite (the caller checks, knowing the layer's name)."""
        self.calibrating, self.calibrated = False, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrating:
            with torch.no_grad():
                torch.maximum(self.input_amax, x.detach().abs().amax().float(), out=self.input_amax)
            return self._gemm(x, self.weight)
        if self.delayed is not None:
            return self._gemm(nvfp4_fake_quantize(x, amax=self.delayed(x)), self.weight_fq)
        if not self.calibrated:
            raise RuntimeError("NVFP4Linear has no calibrated input amax: calibrate it first (quant.quantize_policy does)")
        return self._gemm(nvfp4_fake_quantize(x, amax=self.input_amax), self.weight_fq)
