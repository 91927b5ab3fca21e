"""Explore precision: NVFP4 numerics, layer selection, calibrated explore copies, re-quantization, fidelity metrics."""

from quant.calibration import CalibrationSet, default_calibration_set
from quant.explore import BACKENDS, ExploreState, linear_weights, lora_merged_weights, lora_update, merge_lora_update, quantize_policy, requantize
from quant.layers import NVFP4Linear
from quant.nvfp4 import nvfp4_fake_quantize
from quant.selection import FAMILY_KEEP_PATTERNS, MIN_FEATURES, LayerSelection, select_layers

__all__ = [
    "BACKENDS",
    "FAMILY_KEEP_PATTERNS",
    "MIN_FEATURES",
    "CalibrationSet",
    "ExploreState",
    "LayerSelection",
    "NVFP4Linear",
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
