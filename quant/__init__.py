"""Explore precision: NVFP4 and FP8 numerics, their GEMMs, layer selection, calibrated explore copies, re-quantization."""

from quant.calibration import CalibrationSet, default_calibration_set
from quant.coverage import FAMILY_RULES, LayerSelection, QuantRule, select_layers
from quant.explore import (
    BACKENDS,
    ExploreState,
    linear_weights,
    lora_merged_weights,
    lora_update,
    merge_lora_update,
    quantize_policy,
    requantize,
    resolve_explore_path,
)
from quant.fp8 import fp8_fake_quantize
from quant.kernels import kernel_support
from quant.layers import DelayedScaling, FP8Linear, NVFP4KernelLinear, NVFP4Linear, QuantLinear
from quant.nvfp4 import nvfp4_fake_quantize

__all__ = [
    "BACKENDS",
    "FAMILY_RULES",
    "CalibrationSet",
    "DelayedScaling",
    "ExploreState",
    "FP8Linear",
    "LayerSelection",
    "NVFP4KernelLinear",
    "NVFP4Linear",
    "QuantLinear",
    "QuantRule",
    "default_calibration_set",
    "fp8_fake_quantize",
    "kernel_support",
    "linear_weights",
    "lora_merged_weights",
    "lora_update",
    "merge_lora_update",
    "nvfp4_fake_quantize",
    "quantize_policy",
    "requantize",
    "resolve_explore_path",
    "select_layers",
]
