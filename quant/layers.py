"""Explore linears: fp32-accumulating high-precision ones, and quantized ones with a calibrated (static) or a
delayed activation amax.

Layers (y = x W^T + b with the operands quantized along in_features, a = the input's per-tensor amax)
  ExploreLinear       no quantization: the high-precision linear of an explore copy on CPU (GEMM below)
  NVFP4Linear         NVFP4 W4A4 by fake quantization, modelopt's numerics: y = fq(x; a) fq(W)^T + b with
                      fq = nvfp4_fake_quantize (dequantized operands rounded to the layer's dtype)
  FP8Linear           FP8 W8A8 (E4M3, per-tensor scales, quant.fp8) on a scaled-matmul GEMM, or its reference formula
  NVFP4KernelLinear   NVFP4 W4A4 on the FP4 GEMM, or its reference formula: NVFP4Linear's codes and scales,
                      multiplied without rounding the dequantized operands (quant.kernels)

State, as in modelopt's QuantLinear (weight and input quantizers around an nn.Linear):
  weight       the high-precision weight, in the layer's dtype; weight syncs write it (state-dict key of nn.Linear)
  quantized    fq(weight) (`weight_fq`), or the weight's codes and scales: buffers outside the state dict,
               refreshed by `set_weight` (modelopt fake-quantizes the weight in every forward; same values)
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

The GEMM of ExploreLinear and NVFP4Linear: the dequantized operands are bf16 values, exact in fp32, and the product accumulates in
fp32 on every device (cuBLAS bf16 GEMMs and Blackwell's FP4 GEMMs accumulate in fp32 too); the
result is rounded once to the layer's dtype. On CUDA the GEMM runs in the layer's dtype; on CPU it
runs on fp32 copies of the operands, because CPU bf16 GEMMs without native bf16 units are about 6x
slower and, on strided inputs, take a kernel whose results depend on the batch size.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quant.fp8 import FP8Codes, fp8_quantize
from quant.kernels import PackedNVFP4, dequantize_nvfp4, fp8_gemm, input_quantizer, kernel_shape_problem, nvfp4_gemm, pack_nvfp4
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
    """One quantized input's amax history under a DelayedScaling recipe, kept on the input's device (no host sync).

    initial: the amax of TE's initial scale 1 for the format (NVFP4: 6 * 448, FP8 E4M3: 448), used until a
    forward has recorded one; an all-zero input leaves the amax as it was, as in TE. `paused` stops
    recording (a calibration loop's forwards are not explore forwards).
    """

    def __init__(self, recipe: DelayedScaling, initial: float = INITIAL_DELAYED_AMAX) -> None:
        self.recipe = recipe
        self.initial = initial
        self.history: torch.Tensor | None = None  # [history_len], slot (count % history_len) is the newest
        self.count = 0
        self.last: torch.Tensor | None = None
        self.paused = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The amax to quantize x with (from the forwards before it); then x's own amax joins the history."""
        if self.history is None:
            self.history = torch.zeros(self.recipe.history_len, device=x.device)
            self.last = torch.tensor(self.initial, device=x.device)
        if self.count:
            newest = self.history[(self.count - 1) % self.recipe.history_len]
            candidate = self.history.max() if self.recipe.algo == "max" else newest
            self.last = torch.where(candidate > 0, candidate, self.last)
        if not self.paused:
            self.history[self.count % self.recipe.history_len] = x.detach().abs().amax().float()
            self.count += 1
        return self.last


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


class QuantLinear(ExploreLinear, abc.ABC):
    """A quantized explore linear (inference only, parameters frozen): the high-precision weight, its quantized form,
    and the per-tensor input amax, static (`input_amax`, calibrated) or delayed (`use_delayed_scaling`).
    Subclasses quantize the weight (`_quantize_weight`) and compute the quantized product (`_quantized_forward`)."""

    input_amax: torch.Tensor
    initial_delayed_amax: float = INITIAL_DELAYED_AMAX  # TE's initial scale 1 in this format

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> QuantLinear:
        """Take over `linear`'s parameters (no copy) and quantize its weight; input_amax starts uncalibrated."""
        layer = super().from_linear(linear)
        layer.register_buffer("input_amax", torch.tensor(math.nan, device=linear.weight.device))
        layer.calibrating = False
        layer.calibrated = False
        layer.delayed = None
        layer._quantize_weight()
        return layer

    def use_delayed_scaling(self, recipe: DelayedScaling) -> None:
        """Quantize inputs with a delayed amax (module docstring) instead of a calibrated one, from an empty history."""
        self.delayed = DelayedAmax(recipe, self.initial_delayed_amax)

    @torch.no_grad()
    def set_weight(self, weight: torch.Tensor) -> None:
        """Store `weight` (cast to the layer's dtype) and re-quantize it."""
        if weight.shape != self.weight.shape:
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match the layer's {tuple(self.weight.shape)}")
        if weight is not self.weight:
            self.weight.copy_(weight)
        self._quantize_weight()

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
            return self._quantized_forward(x, self.delayed(x))
        if not self.calibrated:
            raise RuntimeError(f"{type(self).__name__} has no calibrated input amax: calibrate it first (quant.quantize_policy does)")
        return self._quantized_forward(x, self.input_amax)

    @abc.abstractmethod
    def dequantized_weight(self) -> torch.Tensor:
        """The weight values the quantized product multiplies, in fp32 (reports and checks)."""

    @abc.abstractmethod
    def dequantized_input(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """The input values the quantized product multiplies for input x, in fp32 (reports and checks)."""

    @abc.abstractmethod
    def _quantize_weight(self) -> None:
        """Refresh the quantized form of `weight`."""

    @abc.abstractmethod
    def _quantized_forward(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        """y for input x quantized against the per-tensor amax."""


class NVFP4Linear(QuantLinear):
    """NVFP4 W4A4 by fake quantization, modelopt's numerics (module docstring): y = fq(x; a) fq(W)^T + b."""

    weight_fq: torch.Tensor

    def _quantize_weight(self) -> None:
        """Refresh the cache fq(weight), outside the state dict (modelopt fake-quantizes in every forward; same values)."""
        self.register_buffer("weight_fq", nvfp4_fake_quantize(self.weight.detach()), persistent=False)

    def _quantized_forward(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return self._gemm(nvfp4_fake_quantize(x, amax=amax), self.weight_fq)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_fq.float()

    def dequantized_input(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return nvfp4_fake_quantize(x, amax=amax).float()


class KernelLinear(QuantLinear):
    """A quantized linear whose product is a scaled-matmul GEMM (quant.kernels) when `kernel` is set, else the
    GEMM's reference formula (the same numerics up to fp32 summation order, on any device). A shape the GEMM
    cannot take (quant.kernels.kernel_shape_problem) runs the reference formula."""

    precision: str

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: bool = False, compiled_quantizer: bool = False) -> KernelLinear:
        """kernel: run the GEMM (where the shape allows); compiled_quantizer: quantize inputs with one compiled kernel."""
        layer = super().from_linear(linear)
        layer.kernel = kernel and kernel_shape_problem(cls.precision, linear.in_features, linear.out_features) is None
        layer.quantize_input = input_quantizer(cls.precision, compiled=layer.kernel and compiled_quantizer)
        return layer

    def _quantized_forward(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).contiguous()
        y = self._product(self.quantize_input(rows, amax), self.bias, x.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    @abc.abstractmethod
    def _product(self, x_operand: FP8Codes | PackedNVFP4, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The GEMM of the quantized input rows [M, K] with the quantized weight, plus bias, in out_dtype."""


class FP8Linear(KernelLinear):
    """FP8 W8A8 (E4M3, per-tensor scales; quant.fp8): y = (q_x q_W^T) s_x s_W + b in fp32, rounded once."""

    precision = "fp8"
    initial_delayed_amax = E4M3_MAX
    weight_codes: torch.Tensor
    weight_scale: torch.Tensor

    def _quantize_weight(self) -> None:
        codes = fp8_quantize(self.weight.detach())
        self.register_buffer("weight_codes", codes.values, persistent=False)
        self.register_buffer("weight_scale", codes.scale, persistent=False)

    def _product(self, x_operand: FP8Codes, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        return fp8_gemm(x_operand, FP8Codes(self.weight_codes, self.weight_scale), bias, out_dtype, self.kernel)

    def dequantized_weight(self) -> torch.Tensor:
        return FP8Codes(self.weight_codes, self.weight_scale).dequantize()

    def dequantized_input(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return fp8_quantize(x, amax).dequantize()


class NVFP4KernelLinear(KernelLinear):
    """NVFP4 W4A4 on the FP4 GEMM (quant.kernels): y = (sum_k q_x d_x q_W d_W) s_x s_W + b in fp32, rounded once.
    The codes and scales are NVFP4Linear's; its fake quantization also rounds the dequantized operands to bf16."""

    precision = "nvfp4"
    weight_data: torch.Tensor
    weight_block_scales: torch.Tensor
    weight_tensor_scale: torch.Tensor

    def _quantize_weight(self) -> None:
        packed = pack_nvfp4(self.weight.detach())
        self.register_buffer("weight_data", packed.data, persistent=False)
        self.register_buffer("weight_block_scales", packed.block_scales, persistent=False)
        self.register_buffer("weight_tensor_scale", packed.tensor_scale, persistent=False)

    def _packed_weight(self) -> PackedNVFP4:
        return PackedNVFP4(self.weight_data, self.weight_block_scales, self.weight_tensor_scale, self.out_features, self.in_features)

    def _product(self, x_operand: PackedNVFP4, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        return nvfp4_gemm(x_operand, self._packed_weight(), bias, out_dtype, self.kernel)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_nvfp4(self._packed_weight())

    def dequantized_input(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return dequantize_nvfp4(pack_nvfp4(x.reshape(-1, self.in_features), amax)).view(x.shape)
