"""The emulated NVFP4 W4A4 linear layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.nvfp4 import nvfp4_fake_quantize


class NVFP4Linear(nn.Linear):
    """y = fq(x) fq(W)^T + b, with fq = nvfp4_fake_quantize along in_features, computed in the layer's dtype.

    `weight` holds fq(W) itself: the weight is fake-quantized once, when it is set, so a forward
    only quantizes its input activations. The bias stays in the layer's dtype (as in modelopt).
    State-dict keys are those of the nn.Linear it replaces.
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> NVFP4Linear:
        """Take over `linear`'s parameters (no copy) and fake-quantize its weight in place."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        layer.requires_grad_(False)
        layer.set_weight(linear.weight)
        return layer

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Store fq(weight), with weight first cast to the layer's dtype (quantize what the layer computes in)."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the layer's {tuple(self.weight.shape)}")
        self.weight.copy_(nvfp4_fake_quantize(weight.to(device=self.weight.device, dtype=self.weight.dtype)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(nvfp4_fake_quantize(x), self.weight, self.bias)
