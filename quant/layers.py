"""The emulated NVFP4 W4A4 linear layer, with a calibrated (static) activation amax.

y = fq(x; a) fq(W)^T + b, fq = nvfp4_fake_quantize along in_features, a = `input_amax`.

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

The GEMM: the dequantized operands are bf16 values, exact in fp32, and the product accumulates in
fp32 on every device (cuBLAS bf16 GEMMs and Blackwell's FP4 GEMMs accumulate in fp32 too); the
result is rounded once to the layer's dtype. On CUDA the GEMM runs in the layer's dtype; on CPU it
runs on fp32 copies of the operands, because CPU bf16 GEMMs without native bf16 units are about 6x
slower and, on strided inputs, take a kernel whose results depend on the batch size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from quant.nvfp4 import nvfp4_fake_quantize


class NVFP4Linear(nn.Linear):
    """nn.Linear in NVFP4 W4A4 (see the module docstring); inference only, parameters frozen."""

    weight_fq: torch.Tensor
    input_amax: torch.Tensor

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NVFP4Linear:
        """Take over `linear`'s parameters (no copy) and fake-quantize its weight; input_amax starts uncalibrated."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.requires_grad_(False)
        layer.register_buffer("weight_fq", torch.empty_like(linear.weight.detach()), persistent=False)
        layer.register_buffer("input_amax", torch.tensor(math.nan, device=linear.weight.device))
        layer.calibrating = False
        layer.calibrated = False
        layer.set_weight(linear.weight)
        return layer

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
        if not self.calibrated:
            raise RuntimeError("NVFP4Linear has no calibrated input amax: calibrate it first (quant.quantize_policy does)")
        return self._gemm(nvfp4_fake_quantize(x, amax=self.input_amax), self.weight_fq)

    def _gemm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x W^T + b accumulated in fp32 and rounded once to x.dtype (see the module docstring)."""
        if x.device.type != "cpu":
            return F.linear(x, weight, self.bias)
        bias = self.bias.float() if self.bias is not None else None
        return F.linear(x.float(), weight.float(), bias).to(x.dtype)
