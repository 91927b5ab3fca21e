"""FP8 (E4M3) quantization with per-tensor scales, in pure torch on any device: what an FP8 GEMM multiplies.

Format
  E4M3  torch.float8_e4m3fn: 1 sign, 4 exponent, 3 mantissa bits; largest 448, smallest subnormal
        2^-9; no inf, and a cast of anything beyond 448 + 16 is NaN, so values are clamped first

Notation (one scale per tensor, for the activation and for the weight alike)
  code name    symbol  dtype      meaning
  amax         a       fp32       max |x| of the tensor, or a static (calibrated) amax for activations
  scale        s       fp32       a / 448: the decoding scale, maps E4M3's largest value onto a
  values       q       E4M3       E4M3(clamp(x / s, -448, 448)), rounded to nearest even by the cast
  dequantized  x_hat   fp32       q * s

Why per-tensor scales (and not rows or 1x128 blocks): the activation scale is then one static,
calibrated amax per linear, exactly as NVFP4's (quant.calibration), so a row's result depends on that
row alone; tensorwise is the scaling torch's scaled matmul runs on every FP8 GPU (Ada 8.9, Hopper 9.0,
Blackwell) with any output dtype, while rowwise needs Hopper or newer and a bf16 output; and it is
Transformer Engine's default FP8 recipe. E4M3 keeps 3 mantissa bits over 2^17 of range, so one scale
per tensor loses little to outliers (NVFP4's 1 mantissa bit over 6 / 0.5 needs 16-blocks).

An all-zero tensor gets s = 1 (any positive s gives zeros). A static amax must be positive and finite;
inputs beyond it saturate at +-amax. There is no straight-through gradient: explore copies only run inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

E4M3_MAX = 448.0
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class FP8Codes:
    """x in FP8 E4M3 with one decoding scale: x_hat = values * scale."""

    values: torch.Tensor  # q: torch.float8_e4m3fn, x's shape
    scale: torch.Tensor  # s: fp32 scalar

    def dequantize(self) -> torch.Tensor:
        """x_hat = q * s in fp32."""
        return self.values.float() * self.scale


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """s = a / 448 as an fp32 scalar; 1 for a = 0 (an all-zero tensor)."""
    amax = amax.float()
    return torch.where(amax == 0, 1.0, amax / E4M3_MAX)


def fp8_quantize(x: torch.Tensor, amax: torch.Tensor | float | None = None) -> FP8Codes:
    """x's E4M3 values and scale (module notation); amax: a static per-tensor amax, None = max |x| of x itself."""
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fp8_quantize takes {', '.join(map(str, SUPPORTED_DTYPES))}; got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"fp8_quantize needs a non-empty tensor, got shape {tuple(x.shape)}")
    tensor_amax = x.detach().abs().amax() if amax is None else torch.as_tensor(amax, device=x.device)
    scale = fp8_scale(tensor_amax)
    values = (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return FP8Codes(values, scale)


def fp8_fake_quantize(x: torch.Tensor, amax: torch.Tensor | float | None = None) -> torch.Tensor:
    """x rounded to E4M3 with a per-tensor scale and dequantized back to x.dtype."""
    return fp8_quantize(x, amax).dequantize().to(x.dtype)
