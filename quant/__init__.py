"""Explore precision: NVFP4 numerics, layer selection, calibrated explore copies, re-quantization, fidelity metrics."""

from quant.calibration import CalibrationSet, default_calibration_set
from quant.explore import BACKENDS, ExploreState, linear_weights, lora_merged_weights, lora_update, merge_lora_update, quantize_policy, requantize
from quant.layers import DelayedScaling, NVFP4Linear
from quant.nvfp4 import nvfp4_fake_quantize
from quant.selection import FAMILY_RULES, LayerSelection, QuantRule, select_layers

__all__ = [
    "BACKENDS",
    "FAMILY_RULES",
    "CalibrationSet",
    "DelayedScaling",
    "ExploreState",
    "LayerSelection",
    "NVFP4Linear",
    "QuantRule",
    "default_calibration_set",
    "linear_weights",
    "lora_merged_weights",
    "lora_update",
    "merge_lora_update",
    "nvfp4_fake_quantize",
    "quantize_policy",
    "requantize",
    "select_layers",
]
